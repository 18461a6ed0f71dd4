"""FLOPs and parameters are counted from the net, the same whoever convolves: the tools
with oneDNN's convolutions on (DDNN_JAX_ONEDNN=1, as CI installs them) and off print the
same multiply-adds, and the published ones."""

import csv
import os

import pytest

from ddnn_jax.cpu import onednn
from jobs import run_main, run_module


@pytest.fixture(scope='module', autouse=True)
def onednn_built():
  """Skips where oneDNN is not installed, unless CI says it must be."""
  reason = onednn.unavailable_reason()
  if reason is not None:
    if os.environ.get('DDNN_JAX_EXPECT_ONEDNN') == '1':
      pytest.fail(f'oneDNN convolutions expected but unavailable: {reason}')
    pytest.skip(reason)


def tool(name, *args, onednn_on=True):
  result = run_module(name, *args, optimized=True,
                      extra_env={'DDNN_JAX_ONEDNN': '1' if onednn_on else '0'})
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _table(stdout):
  """depth -> (params M, FLOPs M) of a profile table."""
  rows = {}
  for line in stdout.splitlines():
    cells = [c.strip() for c in line.strip('|').split('|')]
    if len(cells) == 4 and cells[0][:1].isdigit():
      rows[cells[0]] = (float(cells[2]), float(cells[3]))
  return rows


@pytest.mark.slow
@pytest.mark.parametrize('args, depth, macs_m', [
    (['resnet50'], '3-4-6-3', 4089.2),  # He et al. 2016: 4.1 G multiply-adds.
    (['mobilenet_v1_imagenet', '--image', '224', '--classes', '1000', '--widths', '1.0'],
     '1-2-2-6-2', 568.7),  # Howard et al. 2017: 569 M.
    (['resnet20', '--depths', '2-2-2,1-1-1'], '2-2-2', 26.4),
])
def test_profile_prints_the_published_flops_with_onednn_on_and_off(args, depth, macs_m):
  on, off = _table(tool('profile', *args)), _table(tool('profile', *args, onednn_on=False))
  assert on == off
  assert on[depth][1] == pytest.approx(macs_m, abs=0.05)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory, small_fashion_mnist_dir):
  workdir = tmp_path_factory.mktemp('flops') / 'run'
  result = run_main(workdir, f'--config.data.data_dir={small_fashion_mnist_dir}',
                    '--config.model.width=8', '--config.train.num_epochs=1',
                    '--config.data.train_subset=512', '--config.data.eval_subset=256',
                    '--config.data.validation_examples=256', '--config.train.batch_size=64',
                    optimized=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _csv_flops(path):
  with open(path, encoding='utf-8') as f:
    return {r['depth']: int(r['flops']) for r in csv.DictReader(f)}


@pytest.mark.slow
def test_evaluate_and_search_count_the_same_flops_with_onednn_on_and_off(tiny_run):
  trained = _csv_flops(tiny_run / 'results.csv')
  found = {}
  for onednn_on in (True, False):
    tool('evaluate', '--workdir', tiny_run, '--depths', 'all', '--split', 'validation',
         '--calib_examples', '128', '--latency_repeats', '1', onednn_on=onednn_on)
    tool('search', '--workdir', tiny_run, '--calib_examples', '128', '--latency_repeats', '1',
         onednn_on=onednn_on)
    evaluated = _csv_flops(tiny_run / 'evaluation' / 'validation.csv')
    searched = _csv_flops(tiny_run / 'search' / 'candidates.csv')
    found[onednn_on] = (evaluated, searched)
    assert len(evaluated) == 27 and evaluated == searched
    for depth, flops in trained.items():  # What training wrote, with oneDNN on.
      assert evaluated[depth] == flops
  assert found[True] == found[False]
  # Every ResNet-20 block costs alike (a stage halves the map and doubles the channels):
  # a depth's FLOPs grow with its block count only, one value per count from 3 to 9.
  by_blocks = {}
  for depth, flops in found[True][0].items():
    by_blocks.setdefault(sum(map(int, depth.split('-'))), set()).add(flops)
  assert sorted(by_blocks) == list(range(3, 10))
  assert all(len(v) == 1 for v in by_blocks.values())
  costs = [by_blocks[n].pop() for n in sorted(by_blocks)]
  assert costs == sorted(set(costs))
