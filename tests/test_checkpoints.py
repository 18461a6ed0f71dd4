"""Checkpoint bookkeeping: finite states, the best checkpoint across restarts, clear errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from ddnn_jax import checkpoints


class _State:
  """The fields of a TrainState a checkpoint holds."""

  def __init__(self, value):
    self.step = jnp.asarray(int(value))
    self.params = {'w': jnp.full((3,), value, jnp.float32)}
    self.opt_state = ()
    self.batch_stats = {'3-3-3': {'mean': jnp.zeros(2)}}


def test_is_finite_checks_every_float_leaf():
  assert checkpoints.is_finite({'a': jnp.ones(3), 'n': jnp.arange(3), 'b': [jnp.zeros(())]})
  assert not checkpoints.is_finite({'a': jnp.ones(3), 'b': [jnp.array([0.0, jnp.nan])]})
  assert not checkpoints.is_finite({'a': jnp.array([jnp.inf]), 'n': jnp.arange(3)})
  assert checkpoints.is_finite({'n': np.arange(3)})  # No float leaf: nothing to check.


def test_best_checkpoint_survives_a_restart(tmp_path):
  accuracies = {1: 0.5, 2: 0.9, 3: None, 4: 0.7}
  manager = checkpoints.create_manager(tmp_path, keep=1)
  for step, accuracy in accuracies.items():
    checkpoints.save(manager, step, _State(step), {'position': step},
                     None if accuracy is None else {'mean_accuracy': accuracy})
  checkpoints.wait(manager)
  assert manager.all_steps() == [2, 4]  # The latest and the best.
  manager.close()
  # A resumed run: its first saves must not drop step 2, the best so far.
  manager = checkpoints.create_manager(tmp_path, keep=1)
  assert checkpoints.resolve_step(manager, 'best') == 2
  for step, accuracy in ((5, 0.1), (6, None)):
    checkpoints.save(manager, step, _State(step), {'position': step},
                     None if accuracy is None else {'mean_accuracy': accuracy})
  checkpoints.wait(manager)
  assert manager.all_steps() == [2, 6]
  assert checkpoints.resolve_step(manager, 'latest') == 6
  with pytest.raises(checkpoints.CheckpointError, match='has no checkpoint 3; it has 2, 6'):
    checkpoints.resolve_step(manager, 3)
  manager.close()
  step, params, stats = checkpoints.restore_variables(tmp_path, 'best')
  assert step == 2
  np.testing.assert_array_equal(params['w'], [2.0, 2.0, 2.0])
  assert set(stats) == {'3-3-3'}


def test_no_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match='holds no checkpoint: train first'):
    checkpoints.restore_variables(tmp_path)
