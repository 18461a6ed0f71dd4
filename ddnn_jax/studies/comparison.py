"""Finished runs laid out in the paper's layout: errors per depth and scheme, paired
differences by seed with t-intervals, the paper's columns beside them, and the figures.

``python -m ddnn_jax.compare`` and the study report (``ddnn_jax.studies.report``) are built
on it. A run is a workdir or a run record (``ddnn_jax.studies.records``): both hold the run's
``config.json`` and ``results.csv``, which is all this module reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ddnn_jax.core import errors, file_io
from ddnn_jax.nn import architectures, notation
from ddnn_jax.studies import paper, stats
from ddnn_jax.training import losses

# Fields that must agree for runs to compare: what is trained, on what, for how long.
SAME = ('dataset', 'arch', 'width', 'num_epochs', 'train_subset', 'validation_examples',
        'batch_size')
DEFAULT_DIFFS = 'ekd-individual,ekd-ddnn'
# A run with model.noise_ranking is its own scheme: its mode and this suffix.
RANKED = '+ranked'
SCHEMES = tuple(s for mode in losses.MODES for s in (mode, mode + RANKED))
SPLIT_COLUMNS = {'test': 'top1_error', 'validation': 'val_top1_error'}


def read_run(workdir: str, split: str = 'test') -> dict[str, Any]:
  """A finished run: its config fields that matter here and its errors by depth."""
  config_path = os.path.join(workdir, 'config.json')
  results_path = os.path.join(workdir, 'results.csv')
  if not os.path.isfile(config_path):
    raise errors.UsageError(f'{workdir} is not a ddnn_jax workdir (no config.json)')
  if not os.path.isfile(results_path):
    raise errors.UsageError(f'{workdir} has no results.csv: the run has not finished')
  with open(config_path, encoding='utf-8') as f:
    config = json.load(f)
  rows = file_io.read_csv(results_path)
  if not rows:
    raise errors.UsageError(f'{results_path} holds no results')
  column = SPLIT_COLUMNS[split]
  if any(not r.get(column) for r in rows):
    why = ('the run held out no validation split (data.validation_examples=0) or predates '
           'validation errors') if split == 'validation' else 'it is incomplete'
    raise errors.UsageError(f'{results_path} has no {split} errors (column {column}): {why}')
  get = lambda *keys: _get(config, keys)  # noqa: E731
  scheme = (config.get('label') or config['mode']) + (RANKED if get('model', 'noise_ranking')
                                                      else '')
  return {'workdir': workdir, 'mode': scheme, 'seed': config['seed'],
          'arch': get('model', 'arch'), 'width': get('model', 'width'),
          'dataset': get('data', 'dataset'), 'num_epochs': get('train', 'num_epochs'),
          'train_subset': get('data', 'train_subset'),
          'validation_examples': get('data', 'validation_examples'),
          'batch_size': get('train', 'batch_size'),
          'rows': [{'depth': notation.parse_depth(r['depth']), 'params': int(r['params']),
                    'flops': int(r['flops']), 'error': float(r[column])} for r in rows]}


def _get(config: dict[str, Any], keys: Sequence[str]) -> Any:
  for key in keys:
    if not isinstance(config, dict) or key not in config:
      return None
    config = config[key]
  return config


def check_comparable(runs: Sequence[dict[str, Any]]) -> None:
  first = runs[0]
  for run in runs[1:]:
    for key in SAME:
      if run[key] != first[key]:
        raise errors.UsageError(
            f'{run["workdir"]} trained {key}={run[key]!r} but {first["workdir"]} '
            f'{key}={first[key]!r}: only runs of one dataset, full net and training budget '
            'compare')


def comparison(runs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
  """Rows (one per depth, most FLOPs first) with, per mode, the errors of its seeds; and
  the modes present, in the order of ``losses.MODES``."""
  by_depth: dict[notation.Depth, dict[str, Any]] = {}
  for run in runs:
    for row in run['rows']:
      entry = by_depth.setdefault(row['depth'], {
          'depth': row['depth'], 'name': architectures.depth_label(run['arch'], row['depth']) or '',
          'params': row['params'], 'flops': row['flops'], 'errors': {}})
      seeds = entry['errors'].setdefault(run['mode'], {})
      if run['seed'] in seeds:
        raise errors.UsageError(
            f'two runs of mode {run["mode"]} with seed {run["seed"]} train depth '
            f'{notation.format_depth(row["depth"])} (one is {run["workdir"]}): give each '
            '(mode, seed) once')
      seeds[run['seed']] = row['error']
  present = {m for e in by_depth.values() for m in e['errors']}
  # The modes in their order, then labelled variants by name.
  modes = [m for m in SCHEMES if m in present] + sorted(present - set(SCHEMES))
  rows = sorted(by_depth.values(), key=lambda e: (-e['flops'], e['depth']))
  return rows, modes


def parse_diffs(text: str) -> list[tuple[str, str]]:
  """'ekd-individual,ipkd_ta-ipkd' -> [('ekd', 'individual'), ('ipkd_ta', 'ipkd')].

  A scheme is a mode, a noise-ranked mode (MODE+ranked) or a run's ``label``."""
  diffs = []
  scheme = re.compile(r'[a-z][a-z0-9_.]*(\+ranked)?')
  for item in filter(None, text.split(',')):
    a, sep, b = item.partition('-')
    if not sep or not scheme.fullmatch(a) or not scheme.fullmatch(b) or a == b:
      raise errors.UsageError(f'--diffs: {item!r} must be two different schemes as A-B: modes '
                              f'({", ".join(losses.MODES)}), MODE{RANKED} for a noise-ranked '
                              'run, or a label of the runs')
    diffs.append((a, b))
  return diffs


def check_diff_schemes(runs: Sequence[dict[str, Any]], diffs: Sequence[tuple[str, str]]) -> None:
  """Each scheme of ``diffs`` is a mode (present or not: its difference is then left out)
  or the label of one of ``runs``."""
  labels = {run['mode'] for run in runs}
  for a, b in diffs:
    for scheme in (a, b):
      if scheme not in SCHEMES and scheme not in labels:
        raise errors.UsageError(f'--diffs: {a}-{b}: {scheme!r} is no mode and no label of these '
                                f'runs ({", ".join(sorted(labels))})')


def differences(rows: Sequence[dict[str, Any]], diffs: Sequence[tuple[str, str]]
                ) -> dict[tuple[notation.Depth, str, str], stats.Difference]:
  """(depth, a, b) -> the paired difference a - b of that depth, where both have seeds."""
  result = {}
  for r in rows:
    for a, b in diffs:
      if r['errors'].get(a) and r['errors'].get(b):
        diff = stats.paired_difference(r['errors'][a], r['errors'][b])
        if diff is not None:
          result[r['depth'], a, b] = diff
  return result


def best_supported(row: dict[str, Any]) -> str | None:
  """The row's best scheme if its paired intervals against every other lie below zero."""
  means = {m: stats.summarize(e).mean for m, e in row['errors'].items() if e}
  if len(means) < 2:
    return None
  best = min(means, key=means.get)
  for other in means:
    if other != best:
      diff = stats.paired_difference(row['errors'][best], row['errors'][other])
      if diff is None or diff.high is None or diff.high >= 0:
        return None
  return best


def _cell(errors: dict[int, float] | None) -> str:
  if not errors:
    return '-'
  s = stats.summarize(errors)
  return f'{s.mean:.2f} ± {s.std:.2f}' if s.n > 1 else f'{s.mean:.2f}'


def _diff_cell(diff: stats.Difference | None) -> str:
  if diff is None:
    return '-'
  if diff.low is None:
    return f'{diff.mean:+.2f} (n=1)'
  text = f'{diff.mean:+.2f} [{diff.low:+.2f}, {diff.high:+.2f}] (n={diff.n})'
  return f'**{text}**' if diff.supported else text


def format_markdown(rows: Sequence[dict[str, Any]], modes: Sequence[str],
                    diffs: dict[tuple[notation.Depth, str, str], stats.Difference],
                    diff_pairs: Sequence[tuple[str, str]], title: str, split: str,
                    reference: paper.Group | None, matched: bool) -> str:
  seeds = {m: max((len(r['errors'].get(m, {})) for r in rows), default=0) for m in modes}
  head = ['Depth', 'Net', 'Params (M)', 'FLOPs (M)', *(f'{m} (n={seeds[m]})' for m in modes)]
  if reference is not None:
    head += [f'paper {s}' for s in paper.SCHEMES]
  lines = [f'# {title}', '',
           f'Top-1 {split} error (%), mean ± std over n seeds. Bold: the best scheme of a '
           'row when its paired 95% intervals against every other scheme lie below zero.', '',
           '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    best = best_supported(r)
    cells = [f'**{_cell(r["errors"].get(m))}**' if m == best else _cell(r['errors'].get(m))
             for m in modes]
    if reference is not None:
      published = reference.errors.get(r['depth'])
      cells += [f'{published[s]:.2f}' if published else '-' for s in paper.SCHEMES]
    lines.append('| ' + ' | '.join([notation.format_depth(r['depth']), r['name'] or '-',
                                    f'{r["params"] / 1e6:.3f}', f'{r["flops"] / 1e6:.1f}',
                                    *cells]) + ' |')
  if reference is not None:
    lines += ['', (f'Paper columns: {paper.SOURCE}, {reference.title}' + (
        ' (these runs are that group).' if matched else
        ' (another dataset: for orientation only).'))]
  pairs = [(a, b) for a, b in diff_pairs if any((r['depth'], a, b) in diffs for r in rows)]
  if pairs:
    lines += ['', 'Paired differences (percentage points, a − b over the seeds both have): '
              'mean [95% t-interval] (n); bold where the interval excludes zero.', '',
              '| Depth | ' + ' | '.join(f'{a} − {b}' for a, b in pairs) + ' |',
              '|---|' + '---|' * len(pairs)]
    for r in rows:
      lines.append(f'| {notation.format_depth(r["depth"])} | ' + ' | '.join(
          _diff_cell(diffs.get((r['depth'], a, b))) for a, b in pairs) + ' |')
  return '\n'.join(lines) + '\n'


CSV_FIELDS = ('depth', 'name', 'params', 'flops', 'mode', 'seeds', 'top1_error_mean',
              'top1_error_std', 'best_supported')
DIFF_FIELDS = ('depth', 'a', 'b', 'n', 'mean_a_minus_b', 'ci95_low', 'ci95_high', 'supported',
               'seeds')


def format_csv(rows: Sequence[dict[str, Any]], modes: Sequence[str]) -> str:
  out = []
  for r in rows:
    best = best_supported(r)
    for mode in modes:
      if r['errors'].get(mode):
        s = stats.summarize(r['errors'][mode])
        out.append({'depth': notation.format_depth(r['depth']), 'name': r['name'],
                    'params': r['params'], 'flops': r['flops'], 'mode': mode, 'seeds': s.n,
                    'top1_error_mean': round(s.mean, 4), 'top1_error_std': round(s.std, 4),
                    'best_supported': mode == best})
  return file_io.csv_text(out, CSV_FIELDS)


def format_diffs_csv(diffs: dict[tuple[notation.Depth, str, str], stats.Difference]) -> str:
  rnd = lambda v: None if v is None else round(v, 4)  # noqa: E731
  return file_io.csv_text([
      {'depth': notation.format_depth(depth), 'a': a, 'b': b, 'n': d.n,
       'mean_a_minus_b': rnd(d.mean), 'ci95_low': rnd(d.low), 'ci95_high': rnd(d.high),
       'supported': d.supported, 'seeds': ' '.join(map(str, d.seeds))}
      for (depth, a, b), d in diffs.items()], DIFF_FIELDS)


def _tick(r: dict[str, Any]) -> str:
  depth = notation.format_depth(r['depth'])
  return f'{depth}\n{r["name"]}' if r['name'] else depth


def plot(rows: Sequence[dict[str, Any]], modes: Sequence[str], title: str, split: str) -> bytes:
  """Grouped bars: error per depth (groups) and mode (bars), std over seeds as error bars."""
  fig, canvas = file_io.new_figure((max(6.0, 1.6 * len(rows) + 2), 4.5))
  ax = fig.add_subplot()
  width = 0.8 / max(len(modes), 1)
  x = np.arange(len(rows))
  for i, mode in enumerate(modes):
    summaries = [stats.summarize(r['errors'][mode]) if r['errors'].get(mode) else None
                 for r in rows]
    ax.bar(x + (i - (len(modes) - 1) / 2) * width,
           [s.mean if s else np.nan for s in summaries], width,
           yerr=[s.std if s else 0.0 for s in summaries], capsize=3, label=mode)
  ax.set_xticks(x, [_tick(r) for r in rows], fontsize=8)
  errors = [e for r in rows for seeds in r['errors'].values() for e in seeds.values()]
  low, high = min(errors), max(errors)
  ax.set_ylim(max(0.0, low - 0.3 * (high - low + 1)), high + 0.3 * (high - low + 1))
  ax.set_ylabel(f'Top-1 {split} error (%)')
  ax.set_title(title, fontsize=10)
  ax.grid(True, axis='y', alpha=0.3)
  ax.legend(fontsize=8)
  return file_io.figure_png(fig, canvas)


def plot_differences(rows: Sequence[dict[str, Any]], pairs: Sequence[tuple[str, str]],
                     diffs: dict[tuple[notation.Depth, str, str], stats.Difference],
                     title: str) -> bytes:
  """Each paired difference per depth with its 95% interval; below zero: a beats b."""
  fig, canvas = file_io.new_figure((max(6.0, 1.4 * len(rows) + 2), 4.0))
  ax = fig.add_subplot()
  x = np.arange(len(rows))
  offsets = np.linspace(-0.25, 0.25, len(pairs)) if len(pairs) > 1 else [0.0]
  for (a, b), offset in zip(pairs, offsets, strict=True):
    found = [(i, diffs[r['depth'], a, b]) for i, r in enumerate(rows) if (r['depth'], a, b) in diffs]
    if not found:
      continue
    xs = [i + offset for i, _ in found]
    means = [d.mean for _, d in found]
    err = np.array([[d.mean - d.low, d.high - d.mean] if d.low is not None else [0, 0]
                    for _, d in found]).T
    ax.errorbar(xs, means, yerr=err, fmt='o', capsize=4, label=f'{a} − {b}')
  ax.axhline(0.0, color='gray', lw=1)
  ax.set_xticks(x, [_tick(r) for r in rows], fontsize=8)
  ax.set_ylabel('paired difference (points), 95% CI')
  ax.set_title(title, fontsize=10)
  ax.grid(True, axis='y', alpha=0.3)
  ax.legend(fontsize=8)
  return file_io.figure_png(fig, canvas)


def parse_paper(text: str | None) -> paper.Group | None:
  if text is None or text == 'none':
    return None
  dataset, sep, name = text.partition(':')
  if not sep:
    raise errors.UsageError(f'--paper {text!r}: give DATASET:GROUP, e.g. cifar10:r20_r16')
  try:
    return paper.get(dataset, name)
  except ValueError as err:
    raise errors.UsageError(f'--paper: {err}') from None


@dataclasses.dataclass(frozen=True)
class Comparison:
  rows: list[dict[str, Any]]  # One per depth (``comparison``).
  modes: list[str]
  diffs: dict[tuple[notation.Depth, str, str], stats.Difference]
  reference: paper.Group | None  # The paper's columns beside the runs.
  markdown: str
  files: dict[str, bytes]  # comparison.{md,csv,png}, differences.{csv,png}


def compare(runs: Sequence[dict[str, Any]], diff_pairs: Sequence[tuple[str, str]],
            split: str = 'test', reference: paper.Group | None = None,
            nearest: bool = True, title: str | None = None) -> Comparison:
  """Compares runs (``read_run``) of one dataset, full net and budget.

  The paper's columns: the runs' own group if they are one, else ``reference``, else
  (``nearest``) the nearest group of the same full net, for orientation.
  """
  check_comparable(runs)
  rows, modes = comparison(runs)
  depths = [r['depth'] for r in rows]
  first = runs[0]
  matched = paper.matching(first['dataset'], first['arch'], depths)
  if matched:
    reference = matched
  elif reference is None and nearest:
    papers_data = first['dataset'] in {g.dataset for g in paper.GROUPS}
    near = paper.nearest(first['arch'], depths, first['dataset'] if papers_data else 'cifar10')
    reference = near if near and set(near.depths) & set(depths) else None
  diffs = differences(rows, diff_pairs)
  if title is None:
    title = (f'{first["arch"]}' + (f' (width {first["width"]})' if first['width'] else '')
             + f' on {first["dataset"]}: {len(runs)} runs, {first["num_epochs"]} epochs')
  markdown = format_markdown(rows, modes, diffs, diff_pairs, title, split, reference,
                             matched is not None)
  pairs = [(a, b) for a, b in diff_pairs if any(k[1:] == (a, b) for k in diffs)]
  files = {'comparison.md': markdown.encode(),
           'comparison.csv': format_csv(rows, modes).encode(),
           'differences.csv': format_diffs_csv(diffs).encode(),
           'comparison.png': plot(rows, modes, title, split)}
  if pairs:
    files['differences.png'] = plot_differences(rows, pairs, diffs, title)
  return Comparison(rows, modes, diffs, reference, markdown, files)
