"""oneDNN convolutions as XLA FFI calls: the same values and gradients as XLA's own
convolution, only where they apply, per device under a mesh, and a readable reason when
they cannot be built."""

import contextlib
import logging
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddnn_jax.core import parallel
from ddnn_jax.cpu import onednn
from ddnn_jax.nn import models
from ddnn_jax.training import steps

NUMBERS = ('NHWC', 'HWIO', 'NHWC')


@pytest.fixture(autouse=True)
def built(monkeypatch):
  """oneDNN asked for; skips where it is not installed, unless CI says it must be
  (DDNN_JAX_EXPECT_ONEDNN=1)."""
  monkeypatch.setenv('DDNN_JAX_ONEDNN', '1')
  reason = onednn.unavailable_reason()
  if reason is not None:
    if os.environ.get('DDNN_JAX_EXPECT_ONEDNN') == '1':
      pytest.fail(f'oneDNN convolutions expected but unavailable: {reason}')
    pytest.skip(reason)


def one_device_mesh():
  return parallel.create_mesh(jax.devices()[:1]).abstract_mesh


def custom_calls(fn, *args) -> int:
  return jax.jit(fn).lower(*args).as_text().count(onednn.HANDLERS['forward'])


@pytest.mark.parametrize('kernel,stride,size', [(3, 1, 8), (3, 2, 9), (3, 2, 8), (1, 2, 8),
                                                (1, 1, 5)])
def test_forward_and_both_gradients_equal_xla(kernel, stride, size):
  pad = kernel // 2
  kx, kw, kg = jax.random.split(jax.random.key(kernel * 10 + stride), 3)
  x = jax.random.normal(kx, (4, size, size, 6))
  w = jax.random.normal(kw, (kernel, kernel, 6, 10))
  args = ((stride, stride), ((pad, pad), (pad, pad)))

  def loss(conv):
    return lambda x, w: jnp.sum(jnp.sin(conv(x, w, *args, dimension_numbers=NUMBERS)))

  with jax.sharding.use_abstract_mesh(one_device_mesh()):
    assert custom_calls(lambda x, w: onednn.conv_general_dilated(
        x, w, *args, dimension_numbers=NUMBERS), x, w) == 1
    y = jax.jit(lambda x, w: onednn.conv_general_dilated(x, w, *args,
                                                         dimension_numbers=NUMBERS))(x, w)
    grads = jax.jit(jax.grad(loss(onednn.conv_general_dilated), (0, 1)))(x, w)
  want = jax.lax.conv_general_dilated(x, w, *args, dimension_numbers=NUMBERS)
  want_grads = jax.grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)
  out = (size + 2 * pad - kernel) // stride + 1
  chex.assert_shape(y, (4, out, out, 10))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert len(grads) == len(want_grads) == 2
  for got, expected in zip(grads, want_grads):
    chex.assert_equal_shape((got, expected))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('case', ['bfloat16', 'groups', 'SAME', 'asymmetric', 'dilated',
                                  'strides'])
def test_other_convolutions_stay_with_xla(case):
  x = jnp.ones((2, 8, 8, 4), jnp.bfloat16 if case == 'bfloat16' else jnp.float32)
  w = jnp.ones((3, 3, 1 if case == 'groups' else 4, 4), x.dtype)
  kwargs = dict(window_strides=(1, 2) if case == 'strides' else (1, 1),
                padding='SAME' if case == 'SAME' else
                ((0, 1), (1, 1)) if case == 'asymmetric' else ((1, 1), (1, 1)),
                dimension_numbers=NUMBERS, feature_group_count=4 if case == 'groups' else 1,
                rhs_dilation=(2, 2) if case == 'dilated' else None)
  with jax.sharding.use_abstract_mesh(one_device_mesh()):
    assert custom_calls(lambda x, w: onednn.conv_general_dilated(x, w, **kwargs), x, w) == 0
    got = jax.jit(lambda x, w: onednn.conv_general_dilated(x, w, **kwargs))(x, w)
  np.testing.assert_array_equal(got, jax.lax.conv_general_dilated(x, w, **kwargs))


def test_disabled_and_unplaceable_calls_stay_with_xla():
  x, w = jnp.ones((8, 6, 6, 4)), jnp.ones((3, 3, 4, 4))

  def conv(x, w):
    return onednn.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=NUMBERS)

  mesh8 = parallel.create_mesh().abstract_mesh
  assert jax.device_count() == 8  # conftest: without a mesh, no device may run it alone.
  assert custom_calls(conv, x, w) == 0
  with jax.sharding.use_abstract_mesh(mesh8):
    assert custom_calls(conv, x, w) == 1
    assert custom_calls(conv, x[:6], w) == 0  # 6 images do not split over 8 devices.
  explicit = jax.make_mesh((8,), (parallel.DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Explicit,)).abstract_mesh
  with jax.sharding.use_abstract_mesh(explicit):
    assert custom_calls(conv, x, w) == 0  # A typed sharding: shard_map would need a reshard.
  with jax.sharding.use_abstract_mesh(mesh8):
    with onednn.disabled():
      assert custom_calls(lambda x, w: conv(x, w), x, w) == 0


def test_vmapped_convolution_equals_xla():
  x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))

  def conv(fn):
    return lambda x: fn(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NUMBERS)

  with jax.sharding.use_abstract_mesh(one_device_mesh()):
    got = jax.jit(jax.vmap(conv(onednn.conv_general_dilated)))(x)
  np.testing.assert_allclose(got, jax.vmap(conv(jax.lax.conv_general_dilated))(x),
                             rtol=1e-5, atol=1e-5)


def test_sharded_ekd_step_equals_the_step_with_xla_convolutions():
  """Eight devices, each convolving its own slice: the same losses (1e-5) and parameters
  as XLA's convolutions give, after two steps."""
  model = models.create_model('resnet20', num_classes=10, width=4)
  depths = ((3, 3, 3), (1, 1, 1))
  mesh = parallel.create_mesh()
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
           'label': rng.integers(0, 10, 16).astype(np.int32)}

  def run(use_onednn):
    state = steps.create_train_state(jax.random.key(0), model, depths,
                                     optax.sgd(0.1, momentum=0.9), (8, 8, 3))
    state = parallel.replicate(state, mesh)
    data = parallel.shard_batch(batch, mesh)
    if use_onednn:
      train, _ = steps.jit_steps(depths, 'ekd', mesh=mesh)
      assert onednn.HANDLERS['kernel_grad'] in train.lower(state, data).as_text()
    else:
      with onednn.disabled():
        train, _ = steps.jit_steps(depths, 'ekd', mesh=mesh)
        assert onednn.HANDLERS['forward'] not in train.lower(state, data).as_text()
    history = []
    for _ in range(2):
      with contextlib.nullcontext() if use_onednn else onednn.disabled():
        state, metrics = train(state, data)
      history.append(float(metrics['loss']))
    return history, jax.device_get(state.params)

  (got, got_params), (want, want_params) = run(True), run(False)
  assert len(got) == len(want) == 2 and got[0] != got[1]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  chex.assert_trees_all_close(got_params, want_params, rtol=1e-4, atol=1e-5)


def inference_calls(fn, *args) -> int:
  return jax.jit(fn).lower(*args).as_text().count(onednn.HANDLERS['inference'])


@pytest.mark.parametrize('kernel,stride,relu,add', [(3, 1, True, True), (3, 2, True, False),
                                                    (1, 2, False, False), (3, 1, False, True)])
def test_fused_inference_call_equals_its_ops(kernel, stride, relu, add):
  """relu(conv + bias + residual) in one call: the values of the ops it replaces, and their
  gradient (it is taken through them)."""
  pad, size = kernel // 2, 9
  out = (size + 2 * pad - kernel) // stride + 1
  keys = jax.random.split(jax.random.key(kernel + 7 * stride + 3 * add), 4)
  x = jax.random.normal(keys[0], (4, size, size, 6))
  w = jax.random.normal(keys[1], (kernel, kernel, 6, 10))
  b = jax.random.normal(keys[2], (10,))
  r = jax.random.normal(keys[3], (4, out, out, 10)) if add else None
  args = ((stride, stride), ((pad, pad), (pad, pad)))

  def want(x, w, b, r):
    y = jax.lax.conv_general_dilated(x, w, *args, dimension_numbers=NUMBERS) + b
    y = y if r is None else y + r
    return jax.nn.relu(y) if relu else y

  def got(x, w, b, r):
    return onednn.conv_bias_act(x, w, b, *args, relu=relu, residual=r)

  def loss(fn):
    return lambda *a: jnp.sum(jnp.sin(fn(*a)))

  with jax.sharding.use_abstract_mesh(one_device_mesh()):
    assert onednn.fusable(x, w, *args, r)
    assert inference_calls(got, x, w, b, r) == 1
    y = jax.jit(got)(x, w, b, r)
    grads = jax.jit(jax.grad(loss(got), (0, 1, 2)))(x, w, b, r)
  chex.assert_shape(y, (4, out, out, 10))
  if relu:
    assert float(jnp.mean(y == 0)) > 0.2  # The ReLU clipped something.
  np.testing.assert_allclose(y, want(x, w, b, r), rtol=1e-5, atol=1e-5)
  want_grads = jax.grad(loss(want), (0, 1, 2))(x, w, b, r)
  assert len(grads) == len(want_grads) == 3
  for g, e in zip(grads, want_grads):
    chex.assert_equal_shape((g, e))
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_fusable_only_where_the_call_applies():
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 5))
  args = ((1, 1), ((1, 1), (1, 1)))
  with jax.sharding.use_abstract_mesh(one_device_mesh()):
    assert onednn.fusable(x, w, *args) and onednn.fusable(x, w, *args, jnp.ones((2, 8, 8, 5)))
    assert not onednn.fusable(x, w, *args, jnp.ones((2, 8, 8, 4)))  # Not the output's shape.
    assert not onednn.fusable(x, w, *args, jnp.ones((2, 8, 8, 5), jnp.bfloat16))
    assert not onednn.fusable(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), *args)
    with onednn.disabled():
      assert not onednn.fusable(x, w, *args)


def randomised(variables, seed=0):
  """The variables with BN scale, bias and running statistics away from their initial
  1 / 0 (else folding BN in would change nothing)."""
  rng = np.random.default_rng(seed)
  def leaf(path, a):
    name = jax.tree_util.keystr(path)
    if "'var'" in name:
      return jnp.asarray(rng.uniform(0.5, 2.0, a.shape), a.dtype)
    if any(k in name for k in ("'mean'", "'scale'", "'bias'")):
      return jnp.asarray(rng.normal(0.0, 0.5, a.shape), a.dtype)
    return a
  return jax.tree_util.tree_map_with_path(leaf, variables)


@pytest.mark.parametrize('arch,depth,fused', [
    ('resnet20', (3, 3, 3), 18), ('resnet20', (1, 2, 1), 8), ('resnet18', (2, 2, 2, 2), 19),
    ('resnet50', (1, 1, 1, 1), 16), ('vgg11', (1, 1, 2, 2, 2), 8)])
def test_inference_folds_batchnorm_into_one_call_per_conv(arch, depth, fused):
  """Every conv + BN (+ residual) (+ ReLU) of a block in inference is one oneDNN call; the
  logits are those of the unfused net with XLA's convolutions (1e-5)."""
  model = models.create_model(arch, num_classes=10, width=4)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  variables = randomised(model.init(jax.random.key(0), x, depth, train=False))

  def logits(variables, x):
    return model.apply(variables, x, depth, train=False)[0]

  with jax.sharding.use_abstract_mesh(one_device_mesh()):
    assert inference_calls(logits, variables, x) == fused
    got = jax.jit(logits)(variables, x)
  with onednn.disabled():
    assert inference_calls(logits, variables, x) == 0
    want = jax.jit(logits)(variables, x)
  chex.assert_shape(got, (4, 10))
  assert float(jnp.std(want)) > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_training_and_noisy_ranking_do_not_fold():
  model = models.create_model('resnet20', num_classes=10, width=8, noise_ranking=True)
  x = jnp.ones((2, 8, 8, 3))
  variables = model.init(jax.random.key(0), x, (3, 3, 3), train=False)
  with jax.sharding.use_abstract_mesh(one_device_mesh()):
    train = lambda v, x: model.apply(v, x, (3, 3, 3), train=True, mutable=['batch_stats'])
    assert inference_calls(train, variables, x) == 0
    noisy = lambda v, x: model.apply(v, x, (3, 3, 3), train=False,
                                     rngs={'noise': jax.random.key(1)})
    assert inference_calls(noisy, variables, x) == 9  # conv2 only: conv1 feeds the noise.
    quiet = lambda v, x: model.apply(v, x, (3, 3, 3), train=False)
    assert inference_calls(quiet, variables, x) == 18


def test_sharded_inference_folds_per_device():
  model = models.create_model('resnet20', num_classes=10, width=4)
  x = jax.random.normal(jax.random.key(1), (16, 8, 8, 3))
  variables = randomised(model.init(jax.random.key(0), x, (3, 3, 3), train=False))
  mesh = parallel.create_mesh()
  logits = lambda v, x: model.apply(v, x, (3, 3, 3), train=False)[0]
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    assert inference_calls(logits, variables, x) == 18
    got = jax.jit(logits)(parallel.replicate(variables, mesh),
                          parallel.shard_batch({'image': x}, mesh)['image'])
  with onednn.disabled():
    want = jax.jit(logits)(variables, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_a_failed_build_says_why(monkeypatch, tmp_path):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  monkeypatch.setenv('CXX', '/bin/false')
  onednn.library_path.cache_clear()
  try:
    with pytest.raises(onednn.Unavailable, match='compiling onednn_conv.cc failed'):
      onednn.library_path()
  finally:
    onednn.library_path.cache_clear()
  assert not any(p.suffix == '.so' for p in tmp_path.rglob('*'))  # Nothing half-written.


def test_on_unless_turned_off(monkeypatch):
  monkeypatch.delenv('DDNN_JAX_ONEDNN')
  monkeypatch.delenv('DDNN_JAX_CPU_DEFAULTS', raising=False)
  assert onednn.enabled() and onednn.active()
  for variable in ('DDNN_JAX_ONEDNN', 'DDNN_JAX_CPU_DEFAULTS'):
    with monkeypatch.context() as m:
      m.setenv(variable, '0')
      assert not onednn.enabled() and not onednn.active()
    assert onednn.enabled()


@pytest.mark.parametrize('installed,asked,level', [
    (False, None, logging.INFO), (False, '1', logging.WARNING), (True, None, logging.WARNING)])
def test_unavailable_is_quiet_only_without_the_extra(monkeypatch, caplog, installed, asked,
                                                    level):
  """No extra, not asked for: XLA convolves, as before the extra existed (an info line).
  Asked for, or installed and failing: a warning."""
  if asked is None:
    monkeypatch.delenv('DDNN_JAX_ONEDNN')
  if not installed:
    monkeypatch.setattr(onednn, '_installed', lambda: (None, None))
  caplog.set_level(logging.INFO)
  onednn._log_unavailable_once.__wrapped__('some reason')  # pylint: disable=protected-access
  records = [r for r in caplog.records if 'some reason' in r.getMessage()]
  assert [r.levelno for r in records] == [level]
