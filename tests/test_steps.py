"""The jitted train/eval steps: learning, traces, private BN statistics, masking."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddnn_jax import models, steps

ARCH, SUBNETS, IMAGE = 'resnet20', [(1, 1, 1), (2, 2, 2)], (8, 8, 3)
NUM_CLASSES = 4


def toy_batch(seed=0, batch=32):
  """A learnable batch: each class is a fixed random pattern plus noise."""
  rng = np.random.default_rng(seed)
  patterns = np.random.default_rng(123).normal(size=(NUM_CLASSES, *IMAGE))
  labels = rng.integers(0, NUM_CLASSES, batch)
  images = patterns[labels] + 0.5 * rng.normal(size=(batch, *IMAGE))
  return {'image': images.astype(np.float32), 'label': labels.astype(np.int32)}


def new_state(mode='ekd', subnets=SUBNETS, lr=0.05):
  model = models.create_model(ARCH, NUM_CLASSES, width=4)
  depths = models.depth_set(ARCH, subnets if mode != 'individual' else [])
  state = steps.create_train_state(jax.random.key(0), model, depths,
                                   optax.sgd(lr, momentum=0.9), IMAGE)
  return state, depths


def test_ekd_training_drives_every_subnet_loss_down():
  state, depths = new_state('ekd')
  train, evaluate = steps.jit_steps(depths, 'ekd', steps.LossWeights(w=1.0, alpha=10.0))
  batch = toy_batch()
  ce_start = evaluate(state, batch)['ce_sum'] / 32
  history = []
  for _ in range(200):
    state, metrics = train(state, batch)
    history.append(metrics['ce'])
  history = np.asarray(history)
  chex.assert_shape(history, (200, 3))
  # Training CE of every depth (full, [2,2,2], [1,1,1]) falls by >10x ...
  assert np.all(history[-10:].mean(0) < 0.1 * history[:10].mean(0)), history[[0, -1]]
  # ... and so does the eval CE with each depth's own running statistics.
  result = evaluate(state, batch)
  ce_end = result['ce_sum'] / 32
  assert np.all(ce_end < 0.1 * ce_start), (ce_start, ce_end)
  np.testing.assert_array_equal(result['correct'], [32, 32, 32])
  assert np.isfinite(metrics['loss']) and float(metrics['kl_full']) >= 0


@pytest.mark.parametrize('mode,subnets', [('individual', []), ('ddnn', [(1, 1, 1)]),
                                          ('ipkd', [(1, 1, 1)]), ('ipkd_ta', SUBNETS)])
def test_every_mode_trains(mode, subnets):
  state, depths = new_state(mode, subnets)
  train, _ = steps.jit_steps(depths, mode)
  batch = toy_batch(1)
  first = None
  for _ in range(30):
    state, metrics = train(state, batch)
    first = metrics['ce'] if first is None else first
  chex.assert_shape(metrics['ce'], (len(depths),))
  chex.assert_shape(metrics['accuracy'], (len(depths),))
  assert np.all(np.asarray(metrics['ce']) < 0.5 * np.asarray(first)), (first, metrics['ce'])


def test_train_step_traces_once_per_depth_set():
  state, depths = new_state('ekd')
  train, _ = steps.jit_steps(depths, 'ekd', max_traces=1)
  for seed in range(3):  # New data each call, same shapes: no retrace.
    state, _ = train(state, toy_batch(seed))
  # A new batch shape would retrace, which the guard turns into an error.
  with pytest.raises(AssertionError, match='traced 2 times'):
    train(state, toy_batch(0, batch=16))
  # Another depth set is another jitted function with its own single trace.
  other_state, other_depths = new_state('ddnn', subnets=[(1, 1, 1)])
  other, _ = steps.jit_steps(other_depths, 'ddnn', max_traces=1)
  for seed in range(2):
    other_state, _ = other(other_state, toy_batch(seed))


def test_each_depth_keeps_its_own_batch_norm_statistics():
  state, depths = new_state('ddnn')
  keys = [models.depth_name(d) for d in depths]
  assert keys == ['3-3-3', '2-2-2', '1-1-1']
  # A sub-net's statistics cover exactly the blocks it runs.
  assert set(state.batch_stats['1-1-1']) == {'stem_bn', 'stage0_block0', 'stage1_block0',
                                             'stage2_block0'}
  train, evaluate = steps.jit_steps(depths, 'ddnn')
  state, _ = train(state, toy_batch())
  # Same module, different inputs (the deeper blocks were skipped): different statistics.
  full = state.batch_stats['3-3-3']['stage1_block0']['bn1']['mean']
  sub = state.batch_stats['1-1-1']['stage1_block0']['bn1']['mean']
  assert not np.allclose(full, sub)
  # Eval of a depth uses its own statistics: replacing another depth's changes nothing.
  batch = toy_batch(5)
  before = evaluate(state, batch)
  swapped = state.replace(batch_stats={**state.batch_stats,
                                       '3-3-3': jax.tree.map(jnp.zeros_like,
                                                             state.batch_stats['3-3-3'])})
  after = evaluate(swapped, batch)
  np.testing.assert_array_equal(before['ce_sum'][1:], after['ce_sum'][1:])
  assert before['ce_sum'][0] != after['ce_sum'][0]


def test_eval_step_ignores_padding():
  state, depths = new_state('ddnn')
  _, evaluate = steps.jit_steps(depths, 'ddnn')
  batch = toy_batch(3, batch=8)
  padded = {k: np.concatenate([v, v[:3]]) for k, v in batch.items()}
  padded['mask'] = np.array([1.0] * 8 + [0.0] * 3, np.float32)
  full, masked = evaluate(state, batch), evaluate(state, padded)
  assert float(masked['count']) == 8
  chex.assert_trees_all_close(full, masked, rtol=1e-5)


def test_bfloat16_mixed_precision_trains():
  model = models.create_model(ARCH, NUM_CLASSES, width=4, dtype=jnp.bfloat16)
  depths = models.depth_set(ARCH, [(1, 1, 1)])
  state = steps.create_train_state(jax.random.key(0), model, depths,
                                   optax.sgd(0.05, momentum=0.9), IMAGE)
  train, _ = steps.jit_steps(depths, 'ekd')
  batch = toy_batch(2)
  first = None
  for _ in range(30):
    state, metrics = train(state, batch)
    first = metrics['ce'] if first is None else first
  # Parameters and optimizer state stay float32; the loss is computed in float32.
  chex.assert_trees_all_equal_dtypes(state.params, jax.tree.map(
      lambda p: p.astype(jnp.float32), state.params))
  chex.assert_type(metrics['loss'], jnp.float32)
  assert np.all(np.asarray(metrics['ce']) < 0.5 * np.asarray(first)), (first, metrics['ce'])
