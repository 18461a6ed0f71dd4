"""Width as a second axis: slimmable channels over the one parameter tree, the D@W
notation, MobileNet-V1, training and deployment along both axes."""

import csv
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddnn_jax.deploy import depth_search
from ddnn_jax.nn import architectures, flops, layers, models, notation
from ddnn_jax.training import config_lib, steps
from jobs import assert_one_line_error, run_main, run_module

S = notation.SubNet


def test_the_notation_reads_and_writes_widths():
  assert notation.parse_depth('2-2-2@0.5') == S((2, 2, 2), 0.5)
  assert notation.parse_depth('[2,2,2]@0.5') == S((2, 2, 2), 0.5)
  assert notation.format_depth(S((2, 1, 3), 0.25)) == '2-1-3@0.25' == notation.depth_name(
      S((2, 1, 3), 0.25))
  assert notation.parse_depths('3-3-3,2-2-2@0.5') == [(3, 3, 3), S((2, 2, 2), 0.5)]
  assert architectures.resolve_depth('resnet20@0.5', 'resnet56') == S((3, 3, 3), 0.5)
  assert notation.format_depth(notation.parse_depth('2-2-2@1.0')) == '2-2-2'  # Width 1 is plain.
  with pytest.raises(ValueError, match='width after @ must be a number'):
    notation.parse_depth('2-2-2@wide')
  with pytest.raises(ValueError, match='width 1.5 is not in'):
    architectures.resolve_depth('2-2-2@1.5', 'resnet20')


def test_width_one_is_the_plain_depth_and_others_are_not():
  assert S((2, 2, 2), 1.0) == (2, 2, 2) and hash(S((2, 2, 2), 1.0)) == hash((2, 2, 2))
  assert S((2, 2, 2), 0.5) != (2, 2, 2) and (2, 2, 2) != S((2, 2, 2), 0.5)
  assert {S((2, 2, 2), 0.5): 1}.get((2, 2, 2)) is None
  assert notation.subnet((2, 2, 2), 1.0).__class__ is tuple
  assert notation.width_of((2, 2, 2)) == 1.0 and notation.width_of(S((1, 1, 1), 0.25)) == 0.25
  # Different widths share no computation.
  assert architectures.shared_prefix('resnet20', S((2, 2, 2), 0.5), (3, 3, 3)) == 0
  assert architectures.shared_prefix('resnet20', S((2, 2, 2), 0.5), S((3, 3, 3), 0.5)) == 4


@pytest.mark.parametrize('width, channels, group, want', [
    (1.0, 16, 8, 16), (0.5, 16, 8, 8), (0.25, 16, 8, 8), (0.75, 16, 8, 16),
    (0.75, 64, 8, 48), (0.25, 1024, 8, 256), (0.3, 64, 4, 20)])
def test_active_channels_round_up_to_a_channel_group(width, channels, group, want):
  assert layers.active_channels(width, channels, group) == want


@pytest.mark.parametrize('width', [0.25, 0.5, 0.75, 1.0])
def test_resnet20_channels_and_shapes_at_every_width(width):
  model = models.create_model('resnet20', 10)
  x = jnp.ones((2, 28, 28, 1))
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  depth = notation.subnet((3, 3, 3), width)
  stats = models.variable_shapes(model, (28, 28, 1), depth)['batch_stats']
  logits, features = model.apply({'params': variables['params'],
                                  'batch_stats': jax.tree.map(jnp.zeros_like, stats)}, x,
                                 depth=depth, train=False)
  channels = [layers.active_channels(width, c, 8) for c in (16, 32, 64)]
  chex.assert_shape(logits, (2, 10))
  for feature, size, c in zip(features, (28, 14, 7), channels, strict=True):
    chex.assert_shape(feature, (2, size, size, c))
  chex.assert_shape(stats['stage2_block2']['bn2']['mean'], (channels[2],))
  size = flops.profile_subnet(model, (28, 28, 1), depth)
  full = flops.profile_subnet(model, (28, 28, 1), (3, 3, 3))
  # FLOPs of a 3x3 conv scale with in x out channels: roughly width^2 of the full net's.
  assert size.flops == full.flops if width == 1.0 else size.flops < full.flops
  assert size.params < full.params or width == 1.0


# MobileNet-V1 (Howard et al. 2017, Table 6; the slimmable model zoo, Yu et al. 2019):
# ImageNet, 224x224, 1000 classes: width -> (M multiply-adds, M params).
PUBLISHED_MOBILENET = {1.0: (569, 4.2), 0.75: (325, 2.6), 0.5: (150, 1.3), 0.25: (41, 0.5)}


@pytest.mark.parametrize('width', sorted(PUBLISHED_MOBILENET))
def test_mobilenet_v1_matches_the_published_sizes_at_every_width(width):
  model = models.create_model('mobilenet_v1_imagenet', 1000)
  size = flops.profile_subnet(model, (224, 224, 3), notation.subnet((1, 2, 2, 6, 2), width))
  macs, params = PUBLISHED_MOBILENET[width]
  assert size.flops / 1e6 == pytest.approx(macs, rel=0.01)
  assert size.params / 1e6 == pytest.approx(params, rel=0.07)  # Published to 2 digits.


@pytest.mark.parametrize('width', [0.25, 0.5, 0.75, 1.0])
def test_mobilenet_v1_cifar_channels_and_parameters_at_every_width(width):
  model = models.create_model('mobilenet_v1', 10)
  depth = notation.subnet((1, 2, 2, 6, 2), width)
  x = jnp.ones((2, 32, 32, 3))
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  stats = models.variable_shapes(model, (32, 32, 3), depth)['batch_stats']
  _, features = model.apply({'params': variables['params'],
                             'batch_stats': jax.tree.map(jnp.zeros_like, stats)}, x, depth=depth,
                            train=False)
  c = [layers.active_channels(width, n, 8) for n in (32, 64, 128, 256, 512, 1024)]
  for feature, size, channels in zip(features, (32, 16, 8, 4, 2), c[1:], strict=True):
    chex.assert_shape(feature, (2, size, size, channels))
  # By hand: stem 3x3x3xC0 + BN; per block a 3x3 depthwise (9 per channel) + BN and a
  # 1x1 conv + BN; the classifier.
  blocks = [(c[0], c[1])] + [(c[1], c[2]), (c[2], c[2]), (c[2], c[3]), (c[3], c[3]),
                             (c[3], c[4])] + [(c[4], c[4])] * 5 + [(c[4], c[5]), (c[5], c[5])]
  want = 27 * c[0] + 2 * c[0] + sum(9 * i + 2 * i + i * o + 2 * o for i, o in blocks)
  want += c[5] * 10 + 10
  assert flops.profile_subnet(model, (32, 32, 3), depth).params == want
  if width == 1.0:  # kuangliu/pytorch-cifar's CIFAR MobileNet: the same 3,217,226.
    assert want == 3_217_226


def _module_classes(model, variables, x, depth):
  classes = set()

  def record(next_fun, args, kwargs, context):
    classes.add(type(context.module))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply(variables, x, depth=depth, train=False)
  return classes


def test_width_one_runs_the_stock_layers_bitwise_as_before():
  model = models.create_model('resnet20', 10, width=8)
  depths = architectures.depth_set('resnet20', [(2, 2, 2), (1, 1, 1)])
  as_subnets = tuple(S(d, 1.0) for d in depths)
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(8, 28, 28, 1)).astype(np.float32),
           'label': rng.integers(0, 10, 8).astype(np.int32)}
  results = []
  for depth_set in (depths, as_subnets):
    state = steps.create_train_state(jax.random.key(0), model, depth_set,
                                     optax.sgd(0.1, momentum=0.9), (28, 28, 1))
    train, _ = steps.jit_steps(depth_set, 'ekd', steps.LossWeights(alpha=100.0))
    for _ in range(2):
      state, metrics = train(state, batch)
    results.append(jax.device_get((state.params, state.batch_stats, metrics)))
  chex.assert_trees_all_equal(*results)  # Bitwise.
  v = model.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)), train=False)
  used = _module_classes(model, v, jnp.ones((1, 28, 28, 1)), (3, 3, 3))
  assert not used & {layers.SlimConv, layers.SlimBatchNorm, layers.SlimDense}
  narrow = _module_classes(model, {'params': v['params'], 'batch_stats': jax.tree.map(
      jnp.zeros_like, models.variable_shapes(model, (28, 28, 1), S((3, 3, 3), 0.5))[
          'batch_stats'])}, jnp.ones((1, 28, 28, 1)), S((3, 3, 3), 0.5))
  assert {layers.SlimConv, layers.SlimBatchNorm, layers.SlimDense} <= narrow


def test_a_narrow_step_updates_only_the_channels_it_runs():
  model = models.create_model('resnet20', 10, width=16)
  depths = ((3, 3, 3), S((2, 2, 2), 0.5))
  state = steps.create_train_state(jax.random.key(0), model, depths, optax.sgd(0.1),
                                   (28, 28, 1))
  batch = {'image': np.random.default_rng(1).normal(size=(8, 28, 28, 1)).astype(np.float32),
           'label': np.arange(8, dtype=np.int32)}
  (_, _), grads = steps.loss_and_grads(state, batch, depths=(S((2, 2, 2), 0.5),),
                                       mode='individual')
  kernel = np.asarray(grads['stage1_block0']['conv1']['kernel'])  # 3x3x16x32 in full.
  assert kernel.shape == (3, 3, 16, 32)
  assert np.abs(kernel[:, :, :8, :16]).sum() > 0
  assert np.abs(kernel[:, :, 8:, :]).sum() == 0 and np.abs(kernel[..., 16:]).sum() == 0
  assert np.abs(np.asarray(grads['stage2_block2']['conv1']['kernel'])).sum() == 0  # Skipped.
  assert np.abs(np.asarray(grads['head']['kernel'])[32:]).sum() == 0


def test_config_rules_for_widths():
  config = config_lib.load_config('configs/default.py')
  config.model.widths = (0.5, 1.0)
  config.model.subnets = ((2, 2, 2), '3-3-3@0.5', '1-1-1@0.5')
  config_lib.validate(config)
  # Along both axes the sub-nets are ordered by FLOPs (IPKD-TA's chain), largest first.
  assert config_lib.depths_of(config) == ((3, 3, 3), (2, 2, 2), S((3, 3, 3), 0.5),
                                          S((1, 1, 1), 0.5))
  config.model.channel_group = 6
  with pytest.raises(config_lib.ConfigError, match='model.channel_group=6: must be an integer '
                     'that divides every layer width of resnet20 .16, 32, 64.'):
    config_lib.validate(config)
  config.model.channel_group = 8
  config.model.widths = (0.5,)
  with pytest.raises(config_lib.ConfigError, match='model.widths=.0.5,.: must be a tuple of '
                     'width multipliers in .0, 1. that holds 1.0'):
    config_lib.validate(config)


def test_search_walks_both_axes():
  assert depth_search.children((2, 1, 3), (0.5, 1.0)) == [(1, 1, 3), (2, 1, 2), S((2, 1, 3), 0.5)]
  assert depth_search.children(S((2, 1, 1), 0.5), (0.5, 1.0)) == [S((1, 1, 1), 0.5)]
  assert depth_search.children((1, 1, 1)) == []


@pytest.mark.slow
def test_a_channel_group_that_splits_a_layer_is_one_line_and_exit_2(tmp_path):
  result = run_main(tmp_path / 'run', '--config.model.widths=(0.5,1.0)',
                    '--config.model.channel_group=6')
  assert_one_line_error(result, 'model.channel_group=6: must be an integer that divides')
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_a_two_width_run_trains_and_evaluates_every_depth_at_every_width(tmp_path,
                                                                        fashion_mnist_dir):
  workdir = tmp_path / 'run'
  result = run_main(workdir, f'--config.data.data_dir={fashion_mnist_dir}',
                    '--config.model.width=8', '--config.data.train_subset=1024',
                    '--config.data.eval_subset=512', '--config.train.batch_size=64',
                    '--config.data.validation_examples=512', '--config.train.num_epochs=1',
                    '--config.model.widths=(0.5,1.0)',
                    "--config.model.subnets=((2,2,2),'3-3-3@0.5','2-2-2@0.5','1-1-1@0.5')",
                    '--config.train.sandwich_n=1', '--config.train.log_every_steps=4')
  assert result.returncode == 0, result.stderr[-3000:]
  rows = list(csv.DictReader(open(workdir / 'results.csv')))
  assert [r['depth'] for r in rows] == ['3-3-3', '2-2-2', '3-3-3@0.5', '2-2-2@0.5', '1-1-1@0.5']
  assert all(float(r['top1_error']) < 90 for r in rows)
  # The sandwich rule: every step the full net and the smallest, and one other.
  lines = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  train_lines = [line for line in lines if 'train/loss' in line]
  assert all('train/ce/3-3-3' in line and 'train/ce/1-1-1@0.5' in line for line in train_lines)
  evaluated = run_module('evaluate', '--workdir', workdir, '--depths', 'all', '--split',
                         'validation', '--calib_examples', 128, '--latency_repeats', 1)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  rows = list(csv.DictReader(open(workdir / 'evaluation' / 'validation.csv')))
  assert len(rows) == 27 * 2 and len({r['depth'] for r in rows}) == 54
  assert sum(r['depth'].endswith('@0.5') for r in rows) == 27
  assert all(int(r['params']) > 0 and int(r['flops']) > 0 and r['top1_error'] for r in rows)
  own = {r['depth'] for r in rows if r['bn'] == 'own'}
  assert own == {'3-3-3', '2-2-2', '3-3-3@0.5', '2-2-2@0.5', '1-1-1@0.5'}
  narrow = [r for r in rows if r['depth'] == '1-1-1@0.5'][0]
  wide = [r for r in rows if r['depth'] == '1-1-1'][0]
  assert int(narrow['flops']) < int(wide['flops']) and int(narrow['params']) < int(wide['params'])
