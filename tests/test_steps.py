"""The jitted train/eval steps: learning, traces, private BN statistics, masking."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddnn_jax.nn import architectures, flops, models, notation
from ddnn_jax.training import losses, steps

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
  depths = architectures.depth_set(ARCH, subnets if mode != 'individual' else [])
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


@pytest.mark.parametrize('mode,subnets,weights', [
    ('individual', [], steps.LossWeights()),
    ('ddnn', [(1, 1, 1)], steps.LossWeights()),
    ('ipkd', [(1, 1, 1)], steps.LossWeights()),
    ('ipkd_ta', SUBNETS, steps.LossWeights(w=(0.5, 2.0))),
    # The ablations: no ensemble teacher; per-sub-net weights; attention of one stage.
    ('ekd_no_ensemble', SUBNETS, steps.LossWeights(alpha=10.0)),
    ('ekd', SUBNETS, steps.LossWeights(w=(1.0, 0.5), alpha=(10.0, 30.0),
                                       attention_stages=(2,))),
])
def test_every_mode_trains(mode, subnets, weights):
  state, depths = new_state(mode, subnets)
  train, _ = steps.jit_steps(depths, mode, weights)
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
  keys = [notation.depth_name(d) for d in depths]
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
  depths = architectures.depth_set(ARCH, [(1, 1, 1)])
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
  momentum = [leaf for leaf in jax.tree.leaves(state.opt_state)
              if jnp.issubdtype(leaf.dtype, jnp.floating)]
  assert len(momentum) == len(jax.tree.leaves(state.params))  # SGD: one trace per parameter.
  assert {leaf.dtype for leaf in momentum} == {jnp.dtype(jnp.float32)}
  chex.assert_type(metrics['loss'], jnp.float32)
  assert np.all(np.asarray(metrics['ce']) < 0.5 * np.asarray(first)), (first, metrics['ce'])


def _assert_close_to_scale(actual, expected, tol=1e-5):
  """Every leaf within ``tol`` of the expected one, relative to the leaf's largest value.

  Summing the depths' cotangents once at a branch point instead of per depth reorders
  float32 additions; the differences are rounding, of the size of the leaf times eps.
  """
  chex.assert_trees_all_equal_shapes_and_dtypes(actual, expected)
  for path, a, b in zip(*zip(*jax.tree_util.tree_leaves_with_path(actual)),
                        jax.tree.leaves(expected), strict=True):
    scale = max(1.0, float(np.max(np.abs(b))))
    error = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    assert error <= tol * scale, (jax.tree_util.keystr(path), error, scale)


@pytest.mark.parametrize('arch,subnets,mode,image,width,dtype', [
    *[('resnet20', [(2, 2, 2), (1, 1, 1)], mode, (8, 8, 3), 4, 'float32')
      for mode in ('ddnn', 'ekd', 'ipkd', 'ipkd_ta')],
    ('resnet20', [(1, 2, 1)], 'individual', (8, 8, 3), 4, 'float32'),
    # Branches inside stage 0 and regroups: [1,3,2] and [1,1,3] share stage 0.
    ('resnet20', [(1, 3, 2), (3, 1, 1), (1, 1, 3)], 'ekd', (8, 8, 3), 4, 'float32'),
    ('vgg16', ['vgg13', 'vgg11'], 'ekd', (16, 16, 3), 4, 'float32'),
    # ImageNet ResNets take half a minute each to compile here.
    pytest.param('resnet34', ['resnet18'], 'ekd', (32, 32, 3), 4, 'float32',
                 marks=pytest.mark.slow),
    pytest.param('resnet50', [(3, 4, 4, 3), (3, 3, 3, 3)], 'ekd', (32, 32, 3), 8, 'float32',
                 marks=pytest.mark.slow),
    # In float64 the two orders of summation agree to rounding (1e-16): the same function.
    pytest.param('resnet50', [(3, 4, 4, 3), (3, 3, 3, 3)], 'ekd', (32, 32, 3), 4, 'float64',
                 marks=pytest.mark.slow),
])
def test_shared_trunk_equals_a_forward_per_depth(arch, subnets, mode, image, width, dtype):
  with jax.enable_x64(dtype == 'float64'):
    model = models.create_model(arch, 5, width=width, dtype=jnp.dtype(dtype))
    if mode == 'individual':
      depths = (architectures.resolve_depth(subnets[0], arch),)
    else:
      depths = architectures.depth_set(arch, subnets)
    state = steps.create_train_state(jax.random.key(0), model, depths,
                                     optax.sgd(0.1, momentum=0.9), image)
    state = state.replace(params=jax.tree.map(lambda a: a.astype(dtype), state.params),
                          batch_stats=jax.tree.map(lambda a: a.astype(dtype), state.batch_stats))
    rng = np.random.default_rng(0)
    batch = {'image': rng.normal(size=(16, *image)).astype(dtype),
             'label': rng.integers(0, 5, 16).astype(np.int32)}
    shared, per_depth = [jax.jit(lambda s, b, shared=shared: steps.loss_and_grads(
        s, b, depths=depths, mode=mode, weights=steps.LossWeights(alpha=100.0),
        shared_trunk=shared))(state, batch) for shared in (True, False)]
  # The new statistics of every depth, the logits, the loss and its parts, the gradient.
  chex.assert_trees_all_equal_structs(shared, per_depth)
  _assert_close_to_scale(shared, per_depth, tol=1e-5 if dtype == 'float32' else 1e-12)
  assert set(shared[0][1]['batch_stats']) == {notation.depth_name(d) for d in depths}
  # The statistics moved: comparing untouched initial statistics would pass trivially.
  for name, new in shared[0][1]['batch_stats'].items():
    old = jax.tree.leaves(state.batch_stats[name])
    assert len(old) == len(jax.tree.leaves(new))
    assert not any(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new), old)), name


def test_remat_changes_no_result():
  """model.remat recomputes each block in the backward pass: the same loss, gradients and
  new BN statistics (its memory and time trade-off is measured in docs/performance-notes.md)."""
  depths = architectures.depth_set(ARCH, SUBNETS)
  results = []
  for remat in (False, True):
    model = models.create_model(ARCH, NUM_CLASSES, width=4, remat=remat)
    state = steps.create_train_state(jax.random.key(0), model, depths,
                                     optax.sgd(0.1, momentum=0.9), IMAGE)
    results.append(jax.jit(lambda s, b: steps.loss_and_grads(s, b, depths=depths, mode='ekd'))(
        state, toy_batch(0)))
  chex.assert_trees_all_equal_structs(*results)
  _assert_close_to_scale(results[1], results[0], tol=1e-5)
  # The step did train: the gradient is not zero (equal zeros would pass trivially).
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(results[0][1]))


def test_shared_trunk_step_costs_what_its_blocks_predict():
  """The compiled EKD step of ResNet-20 + [2,2,2] + [1,1,1] against its three depths alone.

  Counting each depth's unshared blocks predicts the forward cost ratio (0.79 at 8x8); the
  compiled step (forward and backward, per XLA's cost analysis) must come within 0.03.
  Without the shared trunk, it costs 0.91 (XLA merges part of the forward only).
  """
  model = models.create_model(ARCH, NUM_CLASSES, width=4)
  depths = architectures.depth_set(ARCH, SUBNETS)

  def step_flops(depths, mode):
    state = jax.eval_shape(lambda: steps.create_train_state(
        jax.random.key(0), model, depths, optax.sgd(0.1, momentum=0.9), IMAGE))
    batch = {'image': jax.ShapeDtypeStruct((8, *IMAGE), jnp.float32),
             'label': jax.ShapeDtypeStruct((8,), jnp.int32)}
    train, _ = steps.jit_steps(depths, mode)
    return train.lower(state, batch).compile().cost_analysis()['flops']

  measured = step_flops(depths, 'ekd') / sum(step_flops((d,), 'individual') for d in depths)
  predicted = flops.shared_trunk_flops(model, IMAGE, depths) / sum(
      flops.profile_subnet(model, IMAGE, d).flops for d in depths)
  assert 0.7 < predicted < 0.85, predicted
  assert abs(measured - predicted) < 0.03, (measured, predicted)


@pytest.mark.parametrize('mode', ['ekd', 'ipkd_ta', 'ddnn'])
def test_term_gradient_norms_are_each_terms_own_gradient(mode):
  """Each term's norm equals the norm of jax.grad of that term alone; 'total' equals the
  train step's gradient; on the shared parameters, only what the smallest depth uses."""
  state, depths = new_state(mode)
  depths = tuple(depths)
  weights = steps.LossWeights(w=(0.5, 2.0), alpha=30.0, temperature=2.0)
  batch = toy_batch()
  model = state.apply_fn.__self__
  shared = models.variable_shapes(model, IMAGE, depths[-1])['params']
  out = jax.jit(lambda s, b: steps.term_gradient_norms(s, b, depths=depths, mode=mode,
                                                       weights=weights, shared=shared))(
      state, batch)
  kinds = {'ekd': {'ce', 'kl', 'attention'}, 'ipkd_ta': {'ce', 'kl'}, 'ddnn': {'ce'}}[mode]
  names = [k.removeprefix('term/') for k in out if k.startswith('term/')]
  assert {n.split('/')[0] for n in names} == kinds
  assert len(names) == {'ekd': 9, 'ipkd_ta': 5, 'ddnn': 3}[mode]

  def term(params, name):
    logits, attention, _ = steps._train_forward(state, params, batch['image'], depths,
                                                mode == 'ekd', True)
    _, parts = losses.ddnn_objective(mode, logits, attention, batch['label'], w=weights.w,
                                     alpha=weights.alpha, temperature=weights.temperature)
    return losses.weighted_terms(mode, parts, w=weights.w, alpha=weights.alpha)[name]

  for name in names:
    grads = jax.grad(term)(state.params, name)
    np.testing.assert_allclose(out[f'grad_norm/{name}'], optax.global_norm(grads), rtol=1e-4)
    np.testing.assert_allclose(out[f'grad_norm_shared/{name}'],
                               optax.global_norm(models.select_used(grads, shared)), rtol=1e-4)
    np.testing.assert_allclose(out[f'term/{name}'], term(state.params, name), rtol=1e-5)
  (_, _), grads = steps.loss_and_grads(state, batch, depths=depths, mode=mode, weights=weights)
  np.testing.assert_allclose(out['grad_norm/total'], optax.global_norm(grads), rtol=1e-4)
  # The smallest depth's CE pulls only on shared parameters; the full net's does not.
  smallest = f'ce/{len(depths) - 1}'
  np.testing.assert_allclose(out[f'grad_norm_shared/{smallest}'], out[f'grad_norm/{smallest}'],
                             rtol=1e-5)
  assert out['grad_norm_shared/ce/0'] < out['grad_norm/ce/0']
