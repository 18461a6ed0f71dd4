"""The trainable noise ranking: noise only where asked, sorting that keeps the full net's
function, narrow widths that keep the least noisy groups, and the config rules."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddnn_jax.nn import architectures, flops, models, notation, ranking
from ddnn_jax.training import config_lib, steps
from jobs import TINY, assert_one_line_error, run_main

S = notation.SubNet
SHAPE = (16, 16, 1)


def _ranked_state(arch='resnet20', width=8, group=4, seed=0):
  """A train state of a ranked net with random noise logits and BN statistics (a trained
  net's, not the identity of a fresh one), so sorting has something to move."""
  model = models.create_model(arch, 10, width=width, channel_group=group, noise_ranking=True)
  full = architectures.arch_spec(arch).stage_sizes
  depths = (full, S((1,) * len(full), 0.5))
  state = steps.create_train_state(jax.random.key(seed), model, depths,
                                   optax.sgd(0.1, momentum=0.9), SHAPE)
  keys = iter(jax.random.split(jax.random.key(seed + 1), 10_000))

  def randomise(path, x):
    name = str(path[-1].key)
    if name.startswith('noise_logit'):
      return jax.random.normal(next(keys), x.shape)
    if name in ('mean', 'bias'):
      return 0.3 * jax.random.normal(next(keys), x.shape)
    if name in ('var', 'scale'):
      return jax.random.uniform(next(keys), x.shape, minval=0.5, maxval=1.5)
    return x

  params = jax.tree_util.tree_map_with_path(randomise, state.params)
  stats = jax.tree_util.tree_map_with_path(randomise, state.batch_stats)
  opt_state = state.tx.init(params)  # sgd with momentum: (TraceState, EmptyState).
  opt_state = (opt_state[0]._replace(trace=jax.tree.map(jnp.copy, params)), *opt_state[1:])
  state = state.replace(params=params, batch_stats=stats, opt_state=opt_state)
  return model, depths, state


def _logits(model, state, depth, images):
  return model.apply({'params': state.params,
                      'batch_stats': state.batch_stats[notation.depth_name(depth)]},
                     images, depth=depth, train=False)[0]


@pytest.mark.parametrize('arch', ['resnet20', 'resnet50'])
def test_sorting_keeps_every_full_width_function_and_orders_the_groups(arch):
  model, depths, state = _ranked_state(arch, width=8 if arch == 'resnet20' else 4,
                                       group=4 if arch == 'resnet20' else 2)
  images = jax.random.normal(jax.random.key(5), (4, *SHAPE))
  before = _logits(model, state, depths[0], images)
  sorted_state, moved = ranking.sort_channels(state, model.channel_group, depths, images)
  assert moved > 0
  np.testing.assert_allclose(_logits(model, sorted_state, depths[0], images), before,
                             rtol=1e-5, atol=1e-5)
  logits = ranking.noise_logits(sorted_state.params)
  assert len(logits) == (9 if arch == 'resnet20' else 2 * 16)  # One per block (two: Bottleneck).
  for value in logits.values():
    assert np.all(np.diff(np.asarray(value)) >= 0)  # Least noise first.
  again, moved_again = ranking.sort_channels(sorted_state, model.channel_group, depths, images)
  assert moved_again == 0 and again is sorted_state


def test_a_narrow_width_runs_the_least_noisy_groups_after_sorting():
  model, depths, state = _ranked_state()
  block = 'stage1_block0'  # 16 inner channels: 4 groups of 4; width 0.5 keeps 2.
  params = jax.device_get(state.params)
  params[block]['noise_logit1'] = np.array([2.0, -1.0, 0.5, -3.0], np.float32)
  opt_state = (state.opt_state[0]._replace(trace=params), *state.opt_state[1:])
  state = state.replace(params=params, opt_state=opt_state)
  kernel = np.asarray(params[block]['conv1']['kernel'])
  images = jax.random.normal(jax.random.key(5), (8, *SHAPE))
  sorted_state, _ = ranking.sort_channels(state, 4, depths, images)
  new = np.asarray(sorted_state.params[block]['conv1']['kernel'])
  # Groups 3 and 1 (noise logits -3 and -1) now come first: the ones width 0.5 runs.
  np.testing.assert_array_equal(new[..., :8], kernel[..., [12, 13, 14, 15, 4, 5, 6, 7]])
  np.testing.assert_array_equal(
      np.asarray(sorted_state.params[block]['conv2']['kernel'])[:, :, :8],
      np.asarray(params[block]['conv2']['kernel'])[:, :, [12, 13, 14, 15, 4, 5, 6, 7]])
  # The optimiser's momentum (set equal to the parameters) moved with them.
  chex.assert_trees_all_equal(sorted_state.opt_state[0].trace, sorted_state.params)
  # A narrow depth's statistics are the batch moments of the sorted net on the images.
  narrow = notation.depth_name(depths[1])
  (_, moments), _ = model.apply({'params': sorted_state.params}, images, (depths[1],),
                                method=models.DDNN.batch_moments, mutable=['batch_stats'])
  assert set(sorted_state.batch_stats[narrow]) == set(state.batch_stats[narrow])
  chex.assert_trees_all_close(sorted_state.batch_stats[narrow],
                              {k: moments[0][k] for k in state.batch_stats[narrow]}, rtol=1e-5)
  np.testing.assert_array_equal(
      np.asarray(sorted_state.batch_stats['3-3-3'][block]['bn1']['mean'])[:8],
      np.asarray(state.batch_stats['3-3-3'][block]['bn1']['mean'])[[12, 13, 14, 15, 4, 5, 6, 7]])


def test_noise_only_with_a_noise_rng_and_only_at_full_width():
  model, depths, state = _ranked_state()
  images = jax.random.normal(jax.random.key(5), (4, *SHAPE))
  variables = {'params': state.params, 'batch_stats': state.batch_stats['3-3-3']}
  apply = lambda rng=None, depth=(3, 3, 3): model.apply(  # noqa: E731
      variables if depth == (3, 3, 3) else {**variables,
                                            'batch_stats': state.batch_stats['1-1-1@0.5']},
      images, depth=depth, train=True, mutable=['batch_stats'],
      rngs=None if rng is None else {'noise': rng})[0][0]
  plain = models.create_model('resnet20', 10, width=8, channel_group=4)
  without = plain.apply({'params': {k: {n: v for n, v in p.items() if 'noise' not in n}
                                    for k, p in state.params.items()},
                         'batch_stats': state.batch_stats['3-3-3']}, images, depth=(3, 3, 3),
                        train=True, mutable=['batch_stats'])[0][0]
  np.testing.assert_array_equal(apply(), without)
  noisy = apply(jax.random.key(1))
  assert np.abs(noisy - without).max() > 1e-3
  np.testing.assert_array_equal(noisy, apply(jax.random.key(1)))
  narrow = S((1, 1, 1), 0.5)
  np.testing.assert_array_equal(apply(jax.random.key(1), narrow), apply(None, narrow))


def test_the_penalty_and_the_gradient_reach_the_noise_logits():
  model, depths, state = _ranked_state()
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  # softplus(0) = log 2 for every group.
  np.testing.assert_allclose(ranking.penalty(zeros), np.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(ranking.penalty(state.params), np.mean(np.log1p(np.exp(-np.concatenate(
      [np.asarray(v) for v in ranking.noise_logits(state.params).values()])))), rtol=1e-5)
  batch = {'image': np.asarray(jax.random.normal(jax.random.key(2), (8, *SHAPE))),
           'label': np.arange(8, dtype=np.int32)}
  (_, _), grads = steps.loss_and_grads(state, batch, depths=depths, mode='ekd',
                                       weights=steps.LossWeights(noise_penalty=0.0))
  task = np.asarray(grads['stage2_block0']['noise_logit1'])
  assert task.shape == (8,) and np.all(task != 0)  # 32 channels, groups of 4.
  (_, _), with_penalty = steps.loss_and_grads(state, batch, depths=depths, mode='ekd',
                                              weights=steps.LossWeights(noise_penalty=1.0))
  logits = np.asarray(state.params['stage2_block0']['noise_logit1'])
  n = sum(v.size for v in ranking.noise_logits(state.params).values())
  # d/dθ mean(softplus(-θ)) = -sigmoid(-θ) / n, on top of the task's gradient.
  np.testing.assert_allclose(np.asarray(with_penalty['stage2_block0']['noise_logit1']) - task,
                             -1 / (1 + np.exp(logits)) / n, rtol=1e-4, atol=1e-7)


def test_the_logits_are_not_counted_as_parameters():
  ranked = models.create_model('resnet20', 10, noise_ranking=True)
  plain = models.create_model('resnet20', 10)
  counts = [flops.count_params(models.variable_shapes(m, (32, 32, 3))['params'])
            for m in (ranked, plain)]
  assert counts[0] == counts[1] == 269_722  # He et al.: 0.27M.


def test_config_rules_for_the_noise_ranking():
  config = config_lib.load_config('configs/default.py')
  config.model.noise_ranking = True
  with pytest.raises(config_lib.ConfigError, match=r'model.noise_ranking=True: must be False '
                     r'unless model.widths has a width below 1.0'):
    config_lib.validate(config)
  config.model.widths = (0.5, 1.0)
  config_lib.validate(config)
  config.model.arch, config.model.subnets = 'vgg11', ((1, 1, 1, 1, 1),)
  with pytest.raises(config_lib.ConfigError, match='model.noise_ranking=True: must be False for '
                     'vgg11'):
    config_lib.validate(config)


@pytest.mark.slow
def test_a_ranked_run_sorts_each_epoch_but_the_last(tmp_path, fashion_mnist_dir):
  workdir = tmp_path / 'run'
  result = run_main(workdir, f'--config.data.data_dir={fashion_mnist_dir}', *TINY,
                    '--config.model.width=8', '--config.model.channel_group=4',
                    '--config.model.widths=(0.5,1.0)', '--config.model.noise_ranking=True',
                    "--config.model.subnets=((1,1,1),'3-3-3@0.5')",
                    '--config.train.num_epochs=2')
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  moved = [r for r in records if 'ranking/groups_moved' in r]
  assert len(moved) == 1 and moved[0]['step'] == 16  # 512 / 32 steps an epoch, 2 epochs.


def test_an_unranked_net_is_unchanged_by_the_noise_rng():
  model = models.create_model('resnet20', 10, width=8)
  depths = ((3, 3, 3), (1, 1, 1))
  state = steps.create_train_state(jax.random.key(0), model, depths, optax.sgd(0.1), SHAPE)
  assert not ranking.noise_logits(state.params)
  batch = {'image': np.asarray(jax.random.normal(jax.random.key(2), (8, *SHAPE))),
           'label': np.arange(8, dtype=np.int32)}
  a = steps.loss_and_grads(state, batch, depths=depths, mode='ekd')
  b = steps.loss_and_grads(state.replace(step=state.step + 7), batch, depths=depths, mode='ekd')
  chex.assert_trees_all_equal(a, b)  # The step only seeds noise, which this net has none of.
