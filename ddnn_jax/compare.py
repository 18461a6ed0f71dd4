r"""Compares finished runs in the paper's layout: one row per depth, one column per scheme.

  python -m ddnn_jax.compare W1 W2 ... [--out DIR]

Each workdir is one run (``python -m ddnn_jax.main``) of the same dataset and full net:
``individual`` runs fill the row of the depth they trained, DDNN/EKD/... runs every row
of their depth set. Several seeds of one scheme give mean +- std. Writes
``comparison.md`` (the best scheme per row in bold), ``comparison.csv`` and
``comparison.png`` to ``--out`` (default ``./comparison``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from ddnn_jax import cli, config_lib, models, reporting

# Column order: the paper's three schemes first.
MODE_ORDER = ('individual', 'ddnn', 'ekd', 'ekd_no_ensemble', 'ipkd', 'ipkd_ta')


def read_run(workdir: str) -> dict[str, Any]:
  """A finished run: its config fields that matter here and its results rows."""
  config_path = os.path.join(workdir, 'config.json')
  results_path = os.path.join(workdir, 'results.csv')
  if not os.path.isfile(config_path):
    raise config_lib.UsageError(f'{workdir} is not a ddnn_jax workdir (no config.json)')
  if not os.path.isfile(results_path):
    raise config_lib.UsageError(f'{workdir} has no results.csv: the run has not finished')
  with open(config_path, encoding='utf-8') as f:
    config = json.load(f)
  with open(results_path, encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  if not rows:
    raise config_lib.UsageError(f'{results_path} holds no results')
  return {'workdir': workdir, 'mode': config['mode'], 'seed': config['seed'],
          'arch': config['model']['arch'], 'width': config['model'].get('width'),
          'dataset': config['data']['dataset'], 'rows': rows}


def check_comparable(runs: Sequence[dict[str, Any]]) -> None:
  first = runs[0]
  for run in runs[1:]:
    for key in ('dataset', 'arch', 'width'):
      if run[key] != first[key]:
        raise config_lib.UsageError(
            f'{run["workdir"]} trained {key}={run[key]!r} but {first["workdir"]} '
            f'{key}={first[key]!r}: only runs of one dataset and full net compare')


def comparison(runs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
  """Rows (one per depth) with, per mode, the errors of its seeds; and the modes present."""
  by_depth: dict[str, dict[str, Any]] = {}
  for run in runs:
    for row in run['rows']:
      entry = by_depth.setdefault(row['depth'], {
          'depth': row['depth'], 'name': '', 'params': int(row['params']),
          'flops': int(row['flops']), 'errors': {}})
      label = models.depth_label(run['arch'], tuple(
          int(n) for n in row['depth'].strip('[]').split(',')))
      entry['name'] = label or entry['name']
      seeds = entry['errors'].setdefault(run['mode'], {})
      if run['seed'] in seeds:
        raise config_lib.UsageError(
            f'two runs of mode {run["mode"]} with seed {run["seed"]} train depth {row["depth"]} '
            f'(one is {run["workdir"]}): give each (mode, seed) once')
      seeds[run['seed']] = float(row['top1_error'])
  modes = [m for m in MODE_ORDER if any(m in e['errors'] for e in by_depth.values())]
  rows = sorted(by_depth.values(), key=lambda e: (-e['flops'], e['depth']))
  return rows, modes


def _summary(errors: dict[int, float]) -> tuple[float, float, int]:
  values = list(errors.values())
  return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
          len(values))


def _cell(errors: dict[int, float] | None) -> str:
  if not errors:
    return '-'
  mean, std, n = _summary(errors)
  return f'{mean:.2f} ± {std:.2f}' if n > 1 else f'{mean:.2f}'


def format_markdown(rows: Sequence[dict[str, Any]], modes: Sequence[str], title: str) -> str:
  seeds = {m: max((len(r['errors'].get(m, {})) for r in rows), default=0) for m in modes}
  head = ['Depth', 'Net', 'Params (M)', 'FLOPs (M)', *(
      f'{m} (n={seeds[m]})' if seeds[m] > 1 else m for m in modes)]
  lines = [f'# {title}', '', 'Top-1 error (%), mean ± std over seeds; best per row in bold.', '',
           '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    means = {m: _summary(r['errors'][m])[0] for m in modes if r['errors'].get(m)}
    best = min(means.values()) if len(means) > 1 else None
    cells = [f'**{_cell(r["errors"].get(m))}**' if best is not None and means.get(m) == best
             else _cell(r['errors'].get(m)) for m in modes]
    lines.append('| ' + ' | '.join([r['depth'], r['name'] or '-', f'{r["params"] / 1e6:.3f}',
                                    f'{r["flops"] / 1e6:.1f}', *cells]) + ' |')
  return '\n'.join(lines) + '\n'


def format_csv(rows: Sequence[dict[str, Any]], modes: Sequence[str]) -> str:
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator='\n')
  writer.writerow(['depth', 'name', 'params', 'flops', 'mode', 'seeds', 'top1_error_mean',
                   'top1_error_std', 'best'])
  for r in rows:
    means = {m: _summary(r['errors'][m])[0] for m in modes if r['errors'].get(m)}
    for mode in modes:
      if r['errors'].get(mode):
        mean, std, n = _summary(r['errors'][mode])
        writer.writerow([r['depth'], r['name'], r['params'], r['flops'], mode, n,
                         round(mean, 4), round(std, 4), mean == min(means.values())])
  return buf.getvalue()


def plot(rows: Sequence[dict[str, Any]], modes: Sequence[str], title: str) -> bytes:
  """Grouped bars: error per depth (groups) and mode (bars), std over seeds as error bars."""
  fig, canvas = reporting.new_figure((max(6.0, 1.6 * len(rows) + 2), 4.5))
  ax = fig.add_subplot()
  width = 0.8 / max(len(modes), 1)
  x = np.arange(len(rows))
  for i, mode in enumerate(modes):
    stats = [_summary(r['errors'][mode]) if r['errors'].get(mode) else (np.nan, 0.0, 0)
             for r in rows]
    ax.bar(x + (i - (len(modes) - 1) / 2) * width, [s[0] for s in stats], width,
           yerr=[s[1] for s in stats], capsize=3, label=mode)
  ax.set_xticks(x, [f'{r["depth"]}\n{r["name"]}' if r['name'] else r['depth'] for r in rows],
                fontsize=8)
  errors = [e for r in rows for seeds in r['errors'].values() for e in seeds.values()]
  low, high = min(errors), max(errors)
  ax.set_ylim(max(0.0, low - 0.3 * (high - low + 1)), high + 0.3 * (high - low + 1))
  ax.set_ylabel('Top-1 error (%)')
  ax.set_title(title, fontsize=10)
  ax.grid(True, axis='y', alpha=0.3)
  ax.legend(fontsize=8)
  return reporting.figure_png(fig, canvas)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog='python -m ddnn_jax.compare',
                              description=__doc__.split('\n\n')[0])
  parser.add_argument('workdirs', nargs='+', help='workdirs of finished runs')
  parser.add_argument('--out', default='comparison', help='directory for the outputs')
  args = parser.parse_args(argv)
  if len(set(map(os.path.abspath, args.workdirs))) != len(args.workdirs):
    raise config_lib.UsageError('a workdir is given twice')
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise config_lib.UsageError(f'--out {args.out} exists and is not a directory')
  runs = [read_run(w) for w in args.workdirs]
  check_comparable(runs)
  rows, modes = comparison(runs)
  title = (f'{runs[0]["arch"]}' + (f' (width {runs[0]["width"]})' if runs[0]['width'] else '')
           + f' on {runs[0]["dataset"]}: {len(runs)} runs')
  os.makedirs(args.out, exist_ok=True)
  markdown = format_markdown(rows, modes, title)
  reporting.atomic_write(os.path.join(args.out, 'comparison.md'), markdown.encode())
  reporting.atomic_write(os.path.join(args.out, 'comparison.csv'),
                         format_csv(rows, modes).encode())
  reporting.atomic_write(os.path.join(args.out, 'comparison.png'), plot(rows, modes, title))
  print(markdown, end='')
  print(f'wrote {os.path.join(args.out, "comparison.md")}, comparison.csv, comparison.png')


if __name__ == '__main__':
  cli.run(main)
