"""ddnn_jax.cpu.batchnorm against flax's BatchNorm (+ residual) (+ ReLU) under autodiff."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddnn_jax.cpu import batchnorm
from ddnn_jax.nn import architectures, layers, models
from ddnn_jax.training import steps


def _reference(x, scale, bias, residual, epsilon, relu):
  """flax's train-mode BatchNorm, then the residual add and the ReLU, as the models had
  them; returns the output and the batch moments (what the running averages take)."""
  bn = nn.BatchNorm(use_running_average=False, epsilon=epsilon, momentum=0.0)
  variables = {'params': {'scale': scale, 'bias': bias},
               'batch_stats': {'mean': jnp.zeros_like(scale), 'var': jnp.ones_like(scale)}}
  y, updated = bn.apply(variables, x, mutable=['batch_stats'])
  if residual is not None:
    y = residual + y
  return (nn.relu(y) if relu else y), updated['batch_stats']['mean'], updated[
      'batch_stats']['var']


def _inputs(shape=(4, 5, 3, 6), seed=0):
  kx, ks, kb, kr = jax.random.split(jax.random.key(seed), 4)
  c = shape[-1]
  x = 2.0 * jax.random.normal(kx, shape) + jnp.arange(c)  # Channels of different means.
  return (x, 1.0 + 0.3 * jax.random.normal(ks, (c,)), 0.2 * jax.random.normal(kb, (c,)),
          jax.random.normal(kr, shape))


def test_a_hand_computed_channel():
  # One channel, values 1 and 3: mean 2, variance 1, so bn = +-1 / sqrt(1 + eps), then
  # scale 2 and bias 0.5; the residual 1 and the ReLU: relu(1 + 0.5 -+ 2 / sqrt(1 + eps)).
  x = jnp.array([1.0, 3.0]).reshape(2, 1, 1, 1)
  out, mean, var = batchnorm.batch_norm_act(x, jnp.array([2.0]), jnp.array([0.5]),
                                            jnp.ones_like(x), 1e-5, True)
  chex.assert_shape(out, (2, 1, 1, 1))
  chex.assert_shape((mean, var), (1,))
  r = 2.0 / np.sqrt(1.0 + 1e-5)
  np.testing.assert_allclose(out.ravel(), [0.0, 1.5 + r], rtol=1e-6)
  np.testing.assert_allclose(mean, [2.0], rtol=1e-7)
  np.testing.assert_allclose(var, [1.0], rtol=1e-6)


@pytest.mark.parametrize('with_residual', [False, True])
@pytest.mark.parametrize('relu', [False, True])
def test_values_and_gradients_equal_flax(with_residual, relu):
  x, scale, bias, residual = _inputs()
  residual = residual if with_residual else None
  # Weights on every output, the moments included (the running averages read them).
  kw = jax.random.split(jax.random.key(1), 3)
  w_out = jax.random.normal(kw[0], x.shape)
  w_mean, w_var = jax.random.normal(kw[1], scale.shape), jax.random.normal(kw[2], scale.shape)

  def objective(fn):
    def f(x, scale, bias, residual):
      out, mean, var = fn(x, scale, bias, residual, 1e-5, relu)
      return jnp.sum(out * w_out) + jnp.sum(mean * w_mean) + jnp.sum(var * w_var)
    return f

  ours = batchnorm.batch_norm_act(x, scale, bias, residual, 1e-5, relu)
  theirs = _reference(x, scale, bias, residual, 1e-5, relu)
  chex.assert_trees_all_equal_shapes_and_dtypes(ours, theirs)
  chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-6)
  argnums = (0, 1, 2, 3) if with_residual else (0, 1, 2)
  g_ours = jax.grad(objective(batchnorm.batch_norm_act), argnums)(x, scale, bias, residual)
  g_theirs = jax.grad(objective(_reference), argnums)(x, scale, bias, residual)
  assert len(g_ours) == len(g_theirs) == len(argnums)
  for a, b in zip(g_ours, g_theirs):
    chex.assert_equal_shape((a, b))
    assert float(jnp.max(jnp.abs(b))) > 1e-3  # A gradient that could differ.
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  if relu:  # Some outputs clipped: the mask mattered.
    assert 0 < int(jnp.sum(ours[0] == 0)) < ours[0].size


def test_a_constant_channel_passes_finite_gradients():
  # A channel whose variance is 0 (or clipped to 0 from a rounding below it).
  x, scale, bias, _ = _inputs(shape=(8, 2, 2, 3))
  x = x.at[..., 1].set(0.7)

  def f(fn):
    return lambda x, s, b: jnp.sum(jnp.sin(fn(x, s, b, None, 1e-5, True)[0]))

  g_ours = jax.grad(f(batchnorm.batch_norm_act), (0, 1, 2))(x, scale, bias)
  g_theirs = jax.grad(f(_reference), (0, 1, 2))(x, scale, bias)
  # There x - mean is rounding (1e-7) times 1/sqrt(eps): both gradients carry noise of
  # that size in that channel, so they agree to it, not to float32 rounding.
  for a, b in zip(g_ours, g_theirs, strict=True):
    assert bool(jnp.all(jnp.isfinite(a)))
    chex.assert_trees_all_close(a, b, rtol=1e-4, atol=1e-3 * float(jnp.max(jnp.abs(b))))


def test_the_module_keeps_flax_variables_and_running_averages():
  x, _, _, residual = _inputs()
  fused = layers.TrainBatchNorm(momentum=0.9)
  reference = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  v_fused = fused.init(jax.random.key(0), x)
  v_ref = reference.init(jax.random.key(0), x)
  chex.assert_trees_all_equal_structs(v_fused, v_ref)
  chex.assert_trees_all_equal_shapes_and_dtypes(v_fused, v_ref)
  chex.assert_trees_all_equal(v_fused, v_ref)
  y, new_fused = fused.apply(v_fused, x, residual=residual, relu=True, mutable=['batch_stats'])
  z, new_ref = reference.apply(v_ref, x, mutable=['batch_stats'])
  chex.assert_trees_all_close(y, nn.relu(residual + z), rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(new_fused, new_ref, rtol=1e-6, atol=1e-6)
  # 0.9 * (0, 1) + 0.1 * the batch's moments: the running averages moved.
  assert float(jnp.max(jnp.abs(new_fused['batch_stats']['mean']))) > 0.05


@pytest.mark.parametrize('arch,subnets,image', [
    ('resnet20', [(2, 2, 2), (1, 1, 1)], (8, 8, 3)),
    ('vgg16', ['vgg11'], (16, 16, 3)),  # BatchNorm, then a separate ReLU.
])
def test_an_ekd_step_computes_what_flax_batchnorm_computes(monkeypatch, arch, subnets, image):
  model = models.create_model(arch, 5, width=4)
  depths = architectures.depth_set(arch, subnets)
  state = steps.create_train_state(jax.random.key(0), model, depths,
                                   optax.sgd(0.1, momentum=0.9), image)
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(16, *image)).astype(np.float32),
           'label': rng.integers(0, 5, 16).astype(np.int32)}
  results = []
  for switch in ('1', '0'):  # Read when the step is traced.
    monkeypatch.setenv('DDNN_JAX_FUSED_BN', switch)
    results.append(jax.jit(lambda s, b: steps.loss_and_grads(
        s, b, depths=depths, mode='ekd', weights=steps.LossWeights(alpha=100.0)))(state, batch))
  fused, reference = results
  # The switch took: the train-mode forward pass calls the custom-gradient function.
  forward = []
  for switch in ('1', '0'):
    monkeypatch.setenv('DDNN_JAX_FUSED_BN', switch)
    forward.append(str(jax.make_jaxpr(lambda v, x: model.apply(
        v, x, depths, method=models.DDNN.batch_moments, mutable=['batch_stats']))(
            {'params': state.params}, batch['image'])))
  assert 'custom_vjp_call' in forward[0] and 'custom_vjp_call' not in forward[1]
  chex.assert_trees_all_equal_structs(fused, reference)
  # The new statistics of every depth, the logits, the loss and its parts, the gradient:
  # each leaf within 1e-5 of the reference's largest value.
  leaves_a, leaves_b = jax.tree.leaves(fused), jax.tree.leaves(reference)
  assert len(leaves_a) == len(leaves_b) > 10
  for a, b in zip(leaves_a, leaves_b):
    chex.assert_equal_shape((a, b))
    scale = max(1.0, float(np.max(np.abs(b))))
    assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) <= 1e-5 * scale


def test_enabled_follows_the_switch(monkeypatch):
  monkeypatch.setenv('DDNN_JAX_FUSED_BN', '0')
  assert not batchnorm.enabled()
  monkeypatch.setenv('DDNN_JAX_FUSED_BN', '1')
  assert batchnorm.enabled()
  monkeypatch.delenv('DDNN_JAX_FUSED_BN')
  assert batchnorm.enabled() == (jax.default_backend() == 'cpu')


def _activation_sized_broadcasts(hlo_text: str, batch: int, per_image: int) -> list[str]:
  """The compiled program's broadcasts written out as NHWC tensors of the batch with at
  least ``per_image`` elements per image (XLA CPU names an unfused broadcast
  ``wrapped_broadcast``; the loss's small ones, (batch, K, 1, 1), stay below)."""
  found = re.findall(rf'%(wrapped_broadcast[.\d]*) = f32\[{batch},(\d+),(\d+),(\d+)\]',
                     hlo_text)
  return [name for name, h, w, c in found if int(h) * int(w) * int(c) >= per_image]


def test_the_compiled_step_writes_no_activation_sized_broadcast():
  # XLA CPU's YNNPACK fusions write out a broadcast that several of them share (a block's
  # bias in every branch, the ReLU's zero, the backward's factor) as a full-size tensor and
  # read it back: ResNet-20's default step had 42 such (docs/performance-notes.md).
  arch, image, batch_size = 'resnet20', (8, 8, 1), 16
  model = models.create_model(arch, 5, width=4)
  depths = architectures.depth_set(arch, [(2, 2, 2), (1, 1, 1)])
  state = steps.create_train_state(jax.random.key(0), model, depths,
                                   optax.sgd(0.1, momentum=0.9), image)
  batch = {'image': np.zeros((batch_size, *image), np.float32),
           'label': np.zeros((batch_size,), np.int32)}
  train, _ = steps.jit_steps(depths, 'ekd', steps.LossWeights(alpha=100.0))
  # The CLI tools' fusion flag (defaults.YNN_FUSION) and full optimisation, for this
  # compile only (conftest.py lowers the optimisation level for the whole session).
  compiled = train.lower(state, batch).compile(compiler_options={
      'xla_cpu_experimental_ynn_fusion_type':
          'LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE',
      'xla_backend_optimization_level': 3})
  hlo = compiled.as_text()
  assert 'ynn_fusion' in hlo  # The flag took.
  # The smallest activation of this net is stage 3's, 2 x 2 x 16 per image.
  assert _activation_sized_broadcasts(hlo, batch_size, per_image=2 * 2 * 16) == []
