"""Model families, depth configurations, parameter sharing and sizes."""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddnn_jax import profile
from ddnn_jax.nn import architectures, flops, models, notation
from ddnn_jax.training import losses

B = 2


def _init_apply(model, image_shape, depth=None, abstract=False):
  """Full-net variables and the outputs of ``depth`` applied to them (shapes only if abstract)."""
  x = jnp.ones((B, *image_shape), jnp.float32)
  run = jax.eval_shape if abstract else lambda f, *a: jax.jit(f)(*a)
  variables = run(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return variables, run(lambda v, x: model.apply(v, x, depth=depth, train=False), variables, x)


@pytest.mark.parametrize('arch,depth,image_shape,stage_shapes', [
    # CIFAR ResNets, width 4: 3 stages of 4/8/16 channels at 1, 1/2, 1/4 resolution.
    ('resnet20', None, (16, 16, 3), [(16, 16, 4), (8, 8, 8), (4, 4, 16)]),
    ('resnet20', (1, 2, 3), (16, 16, 3), [(16, 16, 4), (8, 8, 8), (4, 4, 16)]),
    ('resnet56', 'resnet32', (8, 8, 3), [(8, 8, 4), (4, 4, 8), (2, 2, 16)]),
    ('resnet20', (1, 1, 1), (28, 28, 1), [(28, 28, 4), (14, 14, 8), (7, 7, 16)]),
    # ImageNet ResNets: stem /4, then stages at /4, /8, /16, /32; bottleneck expands x4.
    ('resnet18', None, (32, 32, 3), [(8, 8, 4), (4, 4, 8), (2, 2, 16), (1, 1, 32)]),
    ('resnet34', 'resnet18', (32, 32, 3), [(8, 8, 4), (4, 4, 8), (2, 2, 16), (1, 1, 32)]),
    ('resnet50', (3, 3, 3, 3), (32, 32, 3), [(8, 8, 16), (4, 4, 32), (2, 2, 64), (1, 1, 128)]),
    ('resnet101', (1, 1, 1, 1), (32, 32, 3), [(8, 8, 16), (4, 4, 32), (2, 2, 64), (1, 1, 128)]),
    # VGG: stage s has min(4*2^s, 32) channels, pooled by 2 after each stage.
    ('vgg16', None, (16, 16, 3), [(16, 16, 4), (8, 8, 8), (4, 4, 16), (2, 2, 32), (1, 1, 32)]),
    ('vgg19', 'vgg11', (16, 16, 3), [(16, 16, 4), (8, 8, 8), (4, 4, 16), (2, 2, 32), (1, 1, 32)]),
    ('vgg13', None, (28, 28, 1), [(28, 28, 4), (14, 14, 8), (7, 7, 16), (4, 4, 32), (2, 2, 32)]),
])
def test_output_shapes(arch, depth, image_shape, stage_shapes):
  model = models.create_model(arch, num_classes=7, width=4)
  depth = None if depth is None else architectures.resolve_depth(depth, arch)
  # Deep ImageNet nets take seconds to initialise on CPU: check their shapes abstractly.
  _, (logits, features) = _init_apply(model, image_shape, depth, abstract=sum(
      model.stage_sizes) > 10)
  chex.assert_shape(logits, (B, 7))
  chex.assert_type(logits, jnp.float32)
  assert len(features) == len(stage_shapes)
  for f, shape in zip(features, stage_shapes):
    chex.assert_shape(f, (B, *shape))
    chex.assert_type(f, jnp.float32)
  if isinstance(logits, jax.Array):
    chex.assert_tree_all_finite((logits, features))


def test_bfloat16_compute_keeps_float32_params():
  model = models.create_model('resnet20', 10, width=4, dtype=jnp.bfloat16)
  variables, (logits, features) = _init_apply(model, (8, 8, 3))
  chex.assert_trees_all_equal_dtypes(variables['params'],
                                     jax.tree.map(lambda x: x.astype(jnp.float32),
                                                  variables['params']))
  chex.assert_type(logits, jnp.float32)  # Returned in float32 for a stable loss.


# Published sizes: He et al. 2016 (CIFAR: 0.27M / 0.85M; ImageNet from torchvision).
@pytest.mark.parametrize('arch,num_classes,image_shape,published', [
    ('resnet20', 10, (32, 32, 3), 0.27e6),
    ('resnet56', 10, (32, 32, 3), 0.85e6),
    ('resnet18', 1000, (224, 224, 3), 11.69e6),
    ('resnet34', 1000, (224, 224, 3), 21.80e6),
    ('resnet50', 1000, (224, 224, 3), 25.56e6),
])
def test_param_counts_match_published(arch, num_classes, image_shape, published):
  model = models.create_model(arch, num_classes)
  params = flops.profile_subnet(model, image_shape).params
  assert abs(params - published) / published < 0.01, (arch, params)


def test_flops_of_tiny_net_match_hand_count():
  # ResNet-20 sub-net [1,1,1], width 4, 8x8x3 input: multiply-adds conv by conv.
  hand = (8 * 8 * 4 * 9 * 3            # stem
          + 2 * 8 * 8 * 4 * 9 * 4      # stage 0 block 0
          + 4 * 4 * 8 * 9 * 4 + 4 * 4 * 8 * 9 * 8     # stage 1 block 0 (stride 2)
          + 2 * 2 * 16 * 9 * 8 + 2 * 2 * 16 * 9 * 16  # stage 2 block 0 (stride 2)
          + 16 * 10)                   # classifier
  model = models.create_model('resnet20', 10, width=4)
  assert flops.profile_subnet(model, (8, 8, 3), (1, 1, 1)).flops == hand
  # The full net adds 2 more blocks per stage; the sub-net has fewer parameters.
  full = flops.profile_subnet(model, (8, 8, 3))
  extra = 2 * (2 * 8 * 8 * 4 * 9 * 4 + 2 * 4 * 4 * 8 * 9 * 8 + 2 * 2 * 2 * 16 * 9 * 16)
  assert full.flops == hand + extra
  assert full.params > flops.profile_subnet(model, (8, 8, 3), (1, 1, 1)).params


def test_resnet50_flops_near_published():
  macs = flops.profile_subnet(models.create_model('resnet50', 1000), (224, 224, 3)).flops
  assert abs(macs - 4.09e9) / 4.09e9 < 0.01  # torchvision: 4.09 GMACs


def test_profile_table_lists_every_depth():
  model = models.create_model('resnet56', 10)
  rows = [flops.profile_subnet(model, (32, 32, 3), d)
          for d in architectures.depth_set('resnet56', ['resnet44', 'resnet32'])]
  table = flops.format_profile_table('resnet56', rows)
  assert '9-9-9' in table and '7-7-7' in table and '5-5-5' in table
  assert [r.flops for r in rows] == sorted((r.flops for r in rows), reverse=True)


@pytest.mark.parametrize('depth,message', [
    ((3, 3), 'has 2 stages but resnet20 has 3'),
    ((3, 3, 3, 3), 'has 4 stages'),
    ((0, 3, 3), 'stage 0 needs at least 1 block, got 0'),
    ((3, -1, 3), 'stage 1 needs at least 1 block, got -1'),
    ((3, 3, 4), 'stage 2 has 4 blocks but resnet20 3-3-3 has only 3'),
    ((1.5, 1, 1), 'is not an integer'),
    (('2', 1, 1), 'is not an integer'),
    ((True, 1, 1), 'is not an integer'),
    (3, 'must be a list'),
    ('resnet18', 'is a resnet_basic but resnet20 is a cifar_resnet'),
    ('resnet21', "unknown depth 'resnet21'"),
])
def test_invalid_depths_raise_clear_errors(depth, message):
  with pytest.raises(ValueError) as err:
    architectures.resolve_depth(depth, 'resnet20')
  assert message in str(err.value)


def test_invalid_depth_at_call_time():
  model = models.create_model('resnet20', 10, width=4)
  x = jnp.ones((1, 8, 8, 3))
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  with pytest.raises(ValueError, match='has only 3'):
    model.apply(variables, x, depth=(1, 1, 5), train=False)


@pytest.mark.parametrize('text', ['2-1-3', '[2,1,3]', '(2, 1, 3)', '2,1,3', '2 1 3', ' [2, 1, 3] '])
def test_every_spelling_of_a_depth_parses_to_it(text):
  assert notation.parse_depth(text) == (2, 1, 3)
  assert notation.parse_depths(text) == [(2, 1, 3)]
  assert notation.format_depth(text) == '2-1-3'


def test_format_depth_is_the_one_notation():
  assert notation.format_depth((3, 4, 6, 3)) == '3-4-6-3' == notation.depth_name((3, 4, 6, 3))
  assert notation.format_depth('resnet32') == 'resnet32'
  assert notation.parse_depth(notation.format_depth((9, 1, 12))) == (9, 1, 12)


def test_parse_depths():
  assert notation.parse_depths('resnet44,5-5-5,') == ['resnet44', (5, 5, 5)]
  assert notation.parse_depths('[2,2,2],[1,1,1]') == [(2, 2, 2), (1, 1, 1)]
  assert notation.parse_depths('(2, 2, 2), (1, 1, 1)') == [(2, 2, 2), (1, 1, 1)]
  assert notation.parse_depths('2-2-2 resnet20') == [(2, 2, 2), 'resnet20']
  assert notation.parse_depths('') == []


@pytest.mark.parametrize('text, message', [
    ('1-x', "depth '1-x' is not a depth"),
    ('2-2-2,3', "'3' alone is not a depth"),
    ('[2,2,2', 'unbalanced brackets'),
    ('2,2]', 'unbalanced brackets'),
    ('resnet-20', "depth 'resnet-20' is not a depth"),
])
def test_parse_depths_rejects(text, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    notation.parse_depths(text)


def test_named_and_listed_depths_agree():
  assert architectures.resolve_depth('resnet44', 'resnet56') == (7, 7, 7)
  assert architectures.resolve_depth([7, 7, 7], 'resnet56') == (7, 7, 7)
  assert architectures.resolve_depth('ResNet18', 'resnet34') == (2, 2, 2, 2)
  with pytest.raises(ValueError, match='unknown architecture'):
    models.create_model('resnet19', 10)


def test_depth_set_orders_and_checks_subnets():
  assert architectures.depth_set('resnet56', ['resnet32', [7, 7, 7]]) == (
      (9, 9, 9), (7, 7, 7), (5, 5, 5))
  with pytest.raises(ValueError, match='is the full net'):
    architectures.depth_set('resnet20', [(3, 3, 3)])
  with pytest.raises(ValueError, match='repeat'):
    architectures.depth_set('resnet20', [(1, 1, 1), [1, 1, 1]])


def _module_names(tree):
  return set(tree.keys())


def test_subnets_are_subtrees_of_the_full_net():
  model = models.create_model('resnet20', 10, width=4)
  x = jnp.ones((1, 8, 8, 3))
  full = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)['params']
  sub = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, depth=(1, 2, 1), train=False),
                       x)['params']
  assert _module_names(sub) < _module_names(full)
  assert _module_names(sub) == {'stem_conv', 'stem_bn', 'head', 'stage0_block0',
                                'stage1_block0', 'stage1_block1', 'stage2_block0'}
  # Same names, same shapes: the sub-net is a view of the full tree.
  jax.tree.map(lambda a, b: chex.assert_equal_shape([a, b]), sub,
               {k: full[k] for k in sub})


def test_gradient_step_on_subnet_touches_only_its_blocks():
  model = models.create_model('resnet20', 10, width=4)
  x = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
  labels = jnp.arange(8) % 10
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  params = variables['params']
  depth = (1, 2, 1)

  def loss(p):
    (logits, _), _ = model.apply({'params': p, 'batch_stats': variables['batch_stats']}, x,
                                 depth=depth, train=True, mutable=['batch_stats'])
    return losses.cross_entropy(logits, labels)

  grads = jax.jit(jax.grad(loss))(params)
  new = optax.apply_updates(params, jax.tree.map(lambda g: -0.1 * g, grads))
  used = {'stem_conv', 'stem_bn', 'head', 'stage0_block0', 'stage1_block0', 'stage1_block1',
          'stage2_block0'}
  for name in params:
    changed = any(not np.array_equal(a, b) for a, b in
                  zip(jax.tree.leaves(params[name]), jax.tree.leaves(new[name])))
    assert changed == (name in used), name
  # The full net's deeper blocks are bitwise untouched.
  chex.assert_trees_all_equal(params['stage2_block2'], new['stage2_block2'])
  assert math.isfinite(float(loss(new)))


def test_profile_command_prints_every_depth(capsys):
  profile.main(['resnet56', '--subnets', 'resnet44,5-5-5'])
  table = capsys.readouterr().out
  assert '| 9-9-9 | 27 | 0.853 |' in table and '7-7-7' in table and '5-5-5' in table
  with pytest.raises(SystemExit) as exit_info:
    profile.main(['resnet56', '--subnets', '1-2'])
  assert exit_info.value.code == 2
  assert 'has 2 stages but resnet56 has 3' in capsys.readouterr().err


@pytest.mark.parametrize('arch, image_shape', [
    ('resnet20', (8, 8, 3)), ('resnet18', (32, 32, 3)), ('resnet50', (32, 32, 3)),
    ('vgg11', (16, 16, 3))])
def test_a_cascade_stage_resumes_exactly_where_another_left_off(arch, image_shape):
  model = models.create_model(arch, 5, width=4)
  x = jax.random.normal(jax.random.key(1), (2, *image_shape))
  variables = model.init(jax.random.key(0), x, train=False)
  full = model.stage_sizes
  smaller = tuple(max(1, n - 1) for n in full)
  want = model.apply(variables, x, depth=full, train=False)[0]
  # Every point the full net could continue from, taken from its own earlier modules.
  sequence = architectures.module_sequence(arch, full)
  assert architectures.shared_prefix(arch, smaller, full) < len(sequence)
  for k in range(1, len(sequence) + 1):
    _, handed = model.apply(variables, x, full, 0, k, method=models.DDNN.cascade_stage)
    assert handed is not None, k
    logits, _ = model.apply(variables, handed, full, k, 0, method=models.DDNN.cascade_stage)
    np.testing.assert_allclose(logits, want, atol=1e-5, err_msg=f'resumed after module {k}')
  plain, none = model.apply(variables, x, full, method=models.DDNN.cascade_stage)
  assert none is None
  np.testing.assert_allclose(plain, want, atol=1e-6)


@pytest.mark.parametrize('value, specs', [
    ('2-2-2', [(2, 2, 2)]),
    (('2-2-2',), [(2, 2, 2)]),  # What --config.model.subnets=2-2-2 gives.
    ('[2,2,2]', [(2, 2, 2)]),
    ((2, 2, 2), [(2, 2, 2)]),  # What --config.model.subnets='[2,2,2]' gives.
    ('2-2-2,1-1-1', [(2, 2, 2), (1, 1, 1)]),
    (((2, 2, 2), (1, 1, 1)), [(2, 2, 2), (1, 1, 1)]),
    (('2-2-2@0.5', '(1,1,1)'), [notation.SubNet((2, 2, 2), 0.5), (1, 1, 1)]),
    (('resnet32', [1, 1, 1]), ['resnet32', (1, 1, 1)]),
    ((), []),
])
def test_subnets_take_every_spelling_of_a_depth(value, specs):
  assert notation.subnet_specs(value) == specs
  assert [notation.width_of(s) for s in notation.subnet_specs(value)] == [
      notation.width_of(s) for s in specs]


@pytest.mark.parametrize('value', ['2-x-2', 7, ((2, 2, 2), 3)])
def test_subnets_that_are_no_depths_are_refused(value):
  with pytest.raises(ValueError, match='not a depth'):
    notation.subnet_specs(value)


def test_an_unknown_name_is_answered_with_names_of_the_full_nets_family():
  with pytest.raises(ValueError) as err:
    architectures.resolve_depth('resnet14', 'resnet20')
  assert str(err.value).endswith('such as 3-3-3 or one of resnet20, resnet32, resnet44, '
                                 'resnet56, resnet110')
  with pytest.raises(ValueError) as err:
    architectures.resolve_depth('resnet27', 'resnet50')
  assert str(err.value).endswith('such as 3-4-6-3 or one of resnet50, resnet101')  # Bottleneck.
