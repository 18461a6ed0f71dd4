"""The comparison report across runs: the paper's layout, seeds, paired intervals, the
paper's columns, refusals."""

import csv
import json
import math
import statistics
import subprocess
import sys

import pytest

from ddnn_jax import compare
from ddnn_jax.core import errors
from ddnn_jax.studies import paper, stats

FLOPS = {'3-3-3': 7_700_000, '2-2-2': 5_000_000, '1-1-1': 2_300_000}
PARAMS = {'3-3-3': 67_906, '2-2-2': 43_490, '1-1-1': 19_074}
# Student's t, 0.975 quantile, from a printed table (dof 1, 2, 4).
T_TABLE = {1: 12.706205, 2: 4.302653, 4: 2.776445}


def make_run(root, name, mode, seed, test_errors, arch='resnet20', dataset='fashion_mnist',
             epochs=3, val_errors=None, noise_ranking=None):
  """A finished workdir as python -m ddnn_jax.main leaves it: config.json, results.csv."""
  workdir = root / name
  workdir.mkdir()
  ranking = {} if noise_ranking is None else {'noise_ranking': noise_ranking}
  (workdir / 'config.json').write_text(json.dumps({
      'mode': mode, 'seed': seed, 'model': {'arch': arch, 'width': 8, **ranking},
      'data': {'dataset': dataset, 'train_subset': None, 'validation_examples': 5000},
      'train': {'num_epochs': epochs, 'batch_size': 128}}))
  with open(workdir / 'results.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=['name', 'depth', 'params', 'flops', 'top1_error',
                                           'val_top1_error'])
    writer.writeheader()
    for depth, error in test_errors.items():
      key = depth.strip('[]').replace(',', '-')
      writer.writerow({'name': 'x', 'depth': depth, 'params': PARAMS.get(key, 1),
                       'flops': FLOPS.get(key, 1), 'top1_error': error,
                       'val_top1_error': '' if val_errors is None else val_errors[depth]})
  return str(workdir)


@pytest.fixture
def runs(tmp_path):
  made = []
  for seed, (a, b, c) in enumerate([(14.0, 15.0, 18.0), (15.0, 16.0, 19.0)]):
    made.append(make_run(tmp_path, f'ekd{seed}', 'ekd', seed,
                         {'3-3-3': a, '2-2-2': b, '1-1-1': c}))
    # An older run wrote depths as [3,3,3]: read as the same depth.
    made.append(make_run(tmp_path, f'ddnn{seed}', 'ddnn', seed,
                         {'[3,3,3]': a - 1, '[2,2,2]': b + 1, '[1,1,1]': c + 2}))
    for depth, error in (('3-3-3', a + 0.5), ('2-2-2', b - 0.2), ('1-1-1', c + 1)):
      made.append(make_run(tmp_path, f'ind{depth}{seed}', 'individual', seed, {depth: error}))
  return made


def _table_lines(markdown, first_cell):
  return [line for line in markdown.splitlines() if line.startswith(f'| {first_cell}')]


def test_table_in_the_papers_layout_with_seeds(runs, tmp_path, capsys):
  out = tmp_path / 'report'
  compare.main([*runs, '--out', str(out)])
  markdown = (out / 'comparison.md').read_text()
  assert markdown == capsys.readouterr().out.split('wrote ')[0]
  lines = [line for line in markdown.split('Paired')[0].splitlines() if line[:3] in
           ('| 3', '| 2', '| 1')]
  assert [line.split(' | ')[0] for line in lines] == ['| 3-3-3', '| 2-2-2', '| 1-1-1']
  assert '| individual (n=2) | ddnn (n=2) | ekd (n=2) |' in markdown
  # 3-3-3: individual 14.5/15.5, ddnn 13/14, ekd 14/15. Every scheme differs from the
  # others by the same amount in both seeds: sd 0, so each interval is a point.
  # Then the paper's figures of the nearest group (CIFAR-10 ResNet-20 + [2,2,2]).
  assert lines[0] == ('| 3-3-3 | resnet20 | 0.068 | 7.7 | 15.00 ± 0.71 | **13.50 ± 0.71** | '
                      '14.50 ± 0.71 | 7.92 | 8.31 | 7.94 |')
  assert lines[2].endswith('| 19.50 ± 0.71 | 20.50 ± 0.71 | **18.50 ± 0.71** | - | - | - |')
  rows = list(csv.DictReader(open(out / 'comparison.csv')))
  assert len(rows) == 9
  ekd_small = [r for r in rows if r['depth'] == '1-1-1' and r['mode'] == 'ekd'][0]
  assert float(ekd_small['top1_error_mean']) == 18.5 and ekd_small['best_supported'] == 'True'
  assert float(ekd_small['top1_error_std']) == pytest.approx(statistics.stdev([18.0, 19.0]), abs=1e-4)
  assert int(ekd_small['seeds']) == 2
  assert (out / 'comparison.png').stat().st_size > 1000
  assert (out / 'differences.png').stat().st_size > 1000
  # Fashion-MNIST is no paper group: the nearest ResNet-20 group, for orientation.
  assert 'Table 1, cifar10 r20_r16 (another dataset: for orientation only)' in markdown
  compare.main([*runs, '--out', str(out), '--paper', 'none'])
  assert 'paper' not in (out / 'comparison.md').read_text()


def test_t_quantile_matches_the_printed_table():
  for dof, value in T_TABLE.items():
    assert stats.t_quantile(0.975, dof) == pytest.approx(value, abs=1e-5)


def test_paired_difference_by_hand():
  ekd = {0: 7.5, 1: 7.9, 2: 7.1, 7: 9.9}  # Seed 7 has no partner: not used.
  ind = {0: 8.0, 1: 8.2, 2: 7.8, 3: 1.0}
  diff = stats.paired_difference(ekd, ind)
  # Differences -0.5, -0.3, -0.7: mean -0.5, sd 0.2, half-width t(.975, 2) * 0.2 / sqrt(3).
  half = T_TABLE[2] * 0.2 / math.sqrt(3)
  assert diff.n == 3 and diff.seeds == (0, 1, 2)
  assert diff.mean == pytest.approx(-0.5)
  assert (diff.low, diff.high) == (pytest.approx(-0.5 - half, abs=1e-6),
                                   pytest.approx(-0.5 + half, abs=1e-6))
  assert diff.supported  # -0.997 .. -0.003: below zero.
  wide = stats.paired_difference({0: 1.0, 1: 2.0}, {0: 1.5, 1: 1.0})  # -0.5, +1.0
  assert wide.low < 0 < wide.high and not wide.supported
  one = stats.paired_difference({0: 1.0}, {0: 2.0})
  assert one.n == 1 and one.low is None and not one.supported
  assert stats.paired_difference({0: 1.0}, {1: 2.0}) is None


def test_paired_differences_and_bold_only_where_supported(tmp_path):
  made = []
  # EKD beats individual on 1-1-1 in all 3 seeds (-0.5, -0.4, -0.6); on 3-3-3 it is
  # better on average (-0.2) but not in every seed (+0.4, -0.5, -0.5).
  for seed, (d_small, d_full) in enumerate([(-0.5, 0.4), (-0.4, -0.5), (-0.6, -0.5)]):
    base = 8.0 + seed
    made.append(make_run(tmp_path, f'ekd{seed}', 'ekd', seed,
                         {'3-3-3': base + d_full, '1-1-1': base + 2 + d_small}))
    made.append(make_run(tmp_path, f'big{seed}', 'individual', seed, {'3-3-3': base}))
    made.append(make_run(tmp_path, f'small{seed}', 'individual', seed, {'1-1-1': base + 2}))
  out = tmp_path / 'report'
  compare.main([*made, '--out', str(out), '--diffs', 'ekd-individual', '--paper', 'none'])
  markdown = (out / 'comparison.md').read_text()
  table, paired = markdown.split('Paired differences')
  full, small = _table_lines(table, '3-3-3')[0], _table_lines(table, '1-1-1')[0]
  assert '**' not in full  # EKD has the lower mean, but the interval crosses zero.
  assert small.endswith('| 11.00 ± 1.00 | **10.50 ± 0.95** |')
  half = T_TABLE[2] * 0.1 / math.sqrt(3)  # sd of (-0.5, -0.4, -0.6) is 0.1.
  assert _table_lines(paired, '1-1-1') == [
      f'| 1-1-1 | **-0.50 [{-0.5 - half:+.2f}, {-0.5 + half:+.2f}] (n=3)** |']
  assert _table_lines(paired, '3-3-3')[0].startswith('| 3-3-3 | -0.20 [')
  rows = list(csv.DictReader(open(out / 'differences.csv')))
  assert len(rows) == 2
  small_row = [r for r in rows if r['depth'] == '1-1-1'][0]
  assert (small_row['a'], small_row['b'], small_row['n']) == ('ekd', 'individual', '3')
  assert float(small_row['ci95_high']) == pytest.approx(-0.5 + half, abs=1e-4)
  assert small_row['supported'] == 'True' and small_row['seeds'] == '0 1 2'


def test_paper_columns_when_the_runs_are_a_paper_group(tmp_path):
  # ResNet-20 + [2,2,2] on CIFAR-10 is Table 1's r20_r16.
  made = [make_run(tmp_path, f'ekd{s}', 'ekd', s, {'3-3-3': 8.0 + s, '2-2-2': 9.0 + s},
                   dataset='cifar10') for s in range(2)]
  out = tmp_path / 'report'
  compare.main([*made, '--out', str(out)])
  markdown = (out / 'comparison.md').read_text()
  assert '| paper individual | paper ddnn | paper ekd |' in markdown
  group = paper.get('cifar10', 'r20_r16')
  assert _table_lines(markdown, '2-2-2')[0].endswith('| 8.87 | 8.91 | 7.99 |')
  assert group.errors[(2, 2, 2)] == {'individual': 8.87, 'ddnn': 8.91, 'ekd': 7.99}
  assert 'Table 1, cifar10 r20_r16 (these runs are that group)' in markdown


def test_paper_figures_of_a_named_group_for_orientation(runs, tmp_path):
  out = tmp_path / 'report'
  compare.main([*runs, '--out', str(out), '--paper', 'cifar100:r32_r20'])
  markdown = (out / 'comparison.md').read_text()
  assert _table_lines(markdown, '3-3-3')[0].endswith('| 32.52 | 32.62 | 30.79 |')
  assert _table_lines(markdown, '1-1-1')[0].endswith('| - | - | - |')  # Not in that group.
  assert 'Table 1, cifar100 r32_r20 (another dataset: for orientation only)' in markdown


def test_help_names_the_paper_columns():
  result = subprocess.run([sys.executable, '-m', 'ddnn_jax.compare', '--help'],
                          capture_output=True, text=True, check=True)
  assert "paper's" in result.stdout and 'Table 1/2' in result.stdout


def test_a_depth_at_two_widths_is_two_rows(tmp_path):
  made = [make_run(tmp_path, f'{mode}{s}', mode, s, {'3-3-3': 8.0 + s, '3-3-3@0.5': 9.0 + s})
          for mode in ('ipkd', 'ipkd_ta') for s in range(2)]
  out = tmp_path / 'report'
  compare.main([*made, '--out', str(out), '--diffs', 'ipkd_ta-ipkd'])
  rows = list(csv.DictReader(open(out / 'comparison.csv')))
  assert sorted({r['depth'] for r in rows}) == ['3-3-3', '3-3-3@0.5'], rows


def test_a_noise_ranked_run_is_its_own_scheme(tmp_path):
  made = [make_run(tmp_path, f'{ranked}{s}', 'ipkd', s, {'3-3-3@0.5': 9.0 + s - 0.5 * ranked},
                   noise_ranking=ranked) for ranked in (False, True) for s in range(2)]
  out = tmp_path / 'report'
  compare.main([*made, '--out', str(out), '--diffs', 'ipkd+ranked-ipkd'])
  diffs = list(csv.DictReader(open(out / 'differences.csv')))
  assert len(diffs) == 1 and (diffs[0]['a'], diffs[0]['b']) == ('ipkd+ranked', 'ipkd')
  assert float(diffs[0]['mean_a_minus_b']) == pytest.approx(-0.5)


def test_validation_split(tmp_path):
  made = [make_run(tmp_path, f'ekd{s}', 'ekd', s, {'3-3-3': 8.0}, val_errors={'3-3-3': 7.0 + s})
          for s in range(2)]
  out = tmp_path / 'report'
  compare.main([*made, '--out', str(out), '--split', 'validation'])
  assert '| 7.50 ± 0.71 |' in (out / 'comparison.md').read_text()
  old = make_run(tmp_path, 'old', 'ddnn', 0, {'3-3-3': 8.0})
  with pytest.raises(errors.UsageError, match='has no validation errors'):
    compare.main([old, '--out', str(tmp_path / 'x'), '--split', 'validation'])


def test_runs_of_another_net_dataset_or_budget_are_refused(runs, tmp_path):
  other = make_run(tmp_path, 'cifar', 'ekd', 5, {'3-3-3': 9.0}, dataset='cifar10')
  with pytest.raises(errors.UsageError, match="trained dataset='cifar10' but .* "
                     "dataset='fashion_mnist': only runs of one dataset, full net and"):
    compare.main([*runs, other, '--out', str(tmp_path / 'report')])
  longer = make_run(tmp_path, 'longer', 'ekd', 5, {'3-3-3': 9.0}, epochs=6)
  with pytest.raises(errors.UsageError, match='trained num_epochs=6 but'):
    compare.main([*runs, longer, '--out', str(tmp_path / 'report')])
  assert not (tmp_path / 'report').exists()


@pytest.mark.parametrize('flags, message', [
    (['--diffs', 'ekd-nope'], "--diffs: ekd-nope: 'nope' is no mode and no label"),
    (['--diffs', 'ekd-Individual'], "--diffs: 'ekd-Individual' must be two different schemes"),
    (['--diffs', 'ekd'], "--diffs: 'ekd' must be two different schemes"),
    (['--paper', 'r20_r16'], 'give DATASET:GROUP'),
    (['--paper', 'cifar10:r21'], 'no paper group cifar10:r21'),
])
def test_bad_flags(runs, tmp_path, flags, message):
  with pytest.raises(errors.UsageError, match=message):
    compare.main([*runs, '--out', str(tmp_path / 'report'), *flags])
  assert not (tmp_path / 'report').exists()


def test_unfinished_or_repeated_runs_are_refused(runs, tmp_path):
  unfinished = tmp_path / 'unfinished'
  unfinished.mkdir()
  (unfinished / 'config.json').write_text('{}')
  with pytest.raises(errors.UsageError, match='has no results.csv: the run has not finished'):
    compare.main([runs[0], str(unfinished)])
  twin = make_run(tmp_path, 'twin', 'ekd', 0, {'3-3-3': 1.0})
  with pytest.raises(errors.UsageError, match='two runs of mode ekd with seed 0'):
    compare.main([runs[0], twin])
