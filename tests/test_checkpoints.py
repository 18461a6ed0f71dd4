"""Checkpoint bookkeeping: finite states, the best checkpoint across restarts, clear errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from ddnn_jax.training import checkpoints, divergence


class _State:
  """The fields of a TrainState a checkpoint holds."""

  def __init__(self, step, value=None):
    self.step = jnp.asarray(step)
    self.params = {'w': jnp.full((3,), step if value is None else value, jnp.float32)}
    self.opt_state = ()
    self.batch_stats = {'3-3-3': {'mean': jnp.zeros(2)}}


def test_is_finite_checks_every_float_leaf():
  assert checkpoints.is_finite({'a': jnp.ones(3), 'n': jnp.arange(3), 'b': [jnp.zeros(())]})
  assert not checkpoints.is_finite({'a': jnp.ones(3), 'b': [jnp.array([0.0, jnp.nan])]})
  assert not checkpoints.is_finite({'a': jnp.array([jnp.inf]), 'n': jnp.arange(3)})
  assert checkpoints.is_finite({'n': np.arange(3)})  # No float leaf: nothing to check.


def test_best_checkpoint_survives_a_restart(tmp_path):
  accuracies = {1: 0.5, 2: 0.9, 3: None, 4: 0.7}
  checkpointer = checkpoints.Checkpointer(tmp_path, keep=1)
  for step, accuracy in accuracies.items():
    checkpointer.save(step, _State(step), {'position': step},
                      None if accuracy is None else {'mean_accuracy': accuracy})
  checkpointer.wait()
  assert checkpointer.manager.all_steps() == [2, 4]  # The latest and the best.
  checkpointer.close()
  # A resumed run: its first saves must not drop step 2, the best so far.
  checkpointer = checkpoints.Checkpointer(tmp_path, keep=1)
  assert checkpoints.resolve_step(checkpointer.manager, 'best') == 2
  for step, accuracy in ((5, 0.1), (6, None)):
    checkpointer.save(step, _State(step), {'position': step},
                      None if accuracy is None else {'mean_accuracy': accuracy})
  checkpointer.wait()
  assert checkpointer.manager.all_steps() == [2, 6]
  assert checkpoints.resolve_step(checkpointer.manager, 'latest') == 6
  with pytest.raises(checkpoints.CheckpointError, match='has no checkpoint 3; it has 2, 6'):
    checkpoints.resolve_step(checkpointer.manager, 3)
  # A state that is not finite is never saved.
  with pytest.raises(divergence.Diverged, match='non-finite train state; the last good '
                     'checkpoint is step 6'):
    checkpointer.save(7, _State(7, float('nan')), {'position': 7})
  checkpointer.close()
  assert checkpointer.manager.all_steps() == [2, 6]
  step, params, stats = checkpoints.restore_variables(tmp_path, 'best')
  assert step == 2
  np.testing.assert_array_equal(params['w'], [2.0, 2.0, 2.0])
  assert set(stats) == {'3-3-3'}


def test_no_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match='holds no checkpoint: train first'):
    checkpoints.restore_variables(tmp_path)
