"""The comparison report across runs: the paper's layout, seeds, best marks, refusals."""

import csv
import json
import statistics

import pytest

from ddnn_jax import compare, config_lib

FLOPS = {'[3,3,3]': 7_700_000, '[2,2,2]': 5_000_000, '[1,1,1]': 2_300_000}
PARAMS = {'[3,3,3]': 67_906, '[2,2,2]': 43_490, '[1,1,1]': 19_074}


def make_run(root, name, mode, seed, errors, arch='resnet20', dataset='fashion_mnist'):
  """A finished workdir as python -m ddnn_jax.main leaves it: config.json, results.csv."""
  workdir = root / name
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps({
      'mode': mode, 'seed': seed, 'model': {'arch': arch, 'width': 8},
      'data': {'dataset': dataset}}))
  with open(workdir / 'results.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=['name', 'depth', 'params', 'flops', 'top1_error'])
    writer.writeheader()
    for depth, error in errors.items():
      writer.writerow({'name': 'x', 'depth': depth, 'params': PARAMS[depth],
                       'flops': FLOPS[depth], 'top1_error': error})
  return str(workdir)


@pytest.fixture
def runs(tmp_path):
  made = []
  for seed, (a, b, c) in enumerate([(14.0, 15.0, 18.0), (15.0, 16.0, 19.0)]):
    made.append(make_run(tmp_path, f'ekd{seed}', 'ekd', seed,
                         {'[3,3,3]': a, '[2,2,2]': b, '[1,1,1]': c}))
    made.append(make_run(tmp_path, f'ddnn{seed}', 'ddnn', seed,
                         {'[3,3,3]': a - 1, '[2,2,2]': b + 1, '[1,1,1]': c + 2}))
    for depth, error in (('[3,3,3]', a + 0.5), ('[2,2,2]', b - 0.2), ('[1,1,1]', c + 1)):
      made.append(make_run(tmp_path, f'ind{depth}{seed}', 'individual', seed, {depth: error}))
  return made


def test_table_in_the_papers_layout_with_seeds_and_best_marks(runs, tmp_path, capsys):
  out = tmp_path / 'report'
  compare.main([*runs, '--out', str(out)])
  markdown = (out / 'comparison.md').read_text()
  assert markdown == capsys.readouterr().out.split('wrote ')[0]
  lines = [line for line in markdown.splitlines() if line.startswith('| [')]
  assert [line.split(' | ')[0] for line in lines] == ['| [3,3,3]', '| [2,2,2]', '| [1,1,1]']
  assert '| individual (n=2) | ddnn (n=2) | ekd (n=2) |' in markdown
  # [3,3,3]: individual 14.5/15.5, ddnn 13/14 (best), ekd 14/15.
  assert lines[0] == ('| [3,3,3] | resnet20 | 0.068 | 7.7 | 15.00 ± 0.71 | **13.50 ± 0.71** | '
                      '14.50 ± 0.71 |')
  assert lines[1].endswith('| **15.30 ± 0.71** | 16.50 ± 0.71 | 15.50 ± 0.71 |')
  assert lines[2].endswith('| 19.50 ± 0.71 | 20.50 ± 0.71 | **18.50 ± 0.71** |')
  rows = list(csv.DictReader(open(out / 'comparison.csv')))
  assert len(rows) == 9
  ekd_small = [r for r in rows if r['depth'] == '[1,1,1]' and r['mode'] == 'ekd'][0]
  assert float(ekd_small['top1_error_mean']) == 18.5 and ekd_small['best'] == 'True'
  expected_std = statistics.stdev([18.0, 19.0])
  assert float(ekd_small['top1_error_std']) == pytest.approx(expected_std, abs=1e-4)
  assert int(ekd_small['seeds']) == 2
  assert (out / 'comparison.png').stat().st_size > 1000


def test_runs_of_another_net_or_dataset_are_refused(runs, tmp_path):
  other = make_run(tmp_path, 'cifar', 'ekd', 5, {'[3,3,3]': 9.0}, dataset='cifar10')
  with pytest.raises(config_lib.UsageError, match="trained dataset='cifar10' but .* "
                     "dataset='fashion_mnist': only runs of one dataset and full net compare"):
    compare.main([*runs, other, '--out', str(tmp_path / 'report')])
  assert not (tmp_path / 'report').exists()


def test_unfinished_or_repeated_runs_are_refused(runs, tmp_path):
  unfinished = tmp_path / 'unfinished'
  unfinished.mkdir()
  (unfinished / 'config.json').write_text('{}')
  with pytest.raises(config_lib.UsageError, match='has no results.csv: the run has not finished'):
    compare.main([runs[0], str(unfinished)])
  twin = make_run(tmp_path, 'twin', 'ekd', 0, {'[3,3,3]': 1.0})
  with pytest.raises(config_lib.UsageError, match='two runs of mode ekd with seed 0'):
    compare.main([runs[0], twin])
