"""What the deploy commands share: depth lists, evaluation rows and files, Pareto fronts.

``python -m ddnn_jax.evaluate``, ``search``, ``export``, ``predict``, the cascade and
``DynamicModel`` use this library (and ``trained_run``), never each other; their shared
flags are in ``ddnn_jax.cli``. It reads and writes a run's deploy files:
``W/evaluation/<split>.{csv,md,png}`` (one row per evaluated depth and step) and, through
``latency`` and ``bn_calibration``, ``W/latency.json`` and ``W/bn_calibration/``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from etils import epath

from ddnn_jax.core import errors, file_io
from ddnn_jax.deploy import bn_calibration, latency, trained_run
from ddnn_jax.nn import architectures, flops, notation

EVALUATION_DIR = 'evaluation'
FIELDS = ('step', 'depth', 'name', 'blocks', 'params', 'flops', 'latency_ms_batch_1',
          'latency_ms_batch_n', 'latency_batch', 'top1_error', 'bn', 'top1_error_full_net_bn')


def parse_depths(run: trained_run.TrainedRun, text: str) -> list[notation.Depth]:
  """Comma-separated depths (names or n-n-n) and the words 'all' (every configuration)
  and 'trained', checked against the net; each depth once, in the order given."""
  depths = []
  try:
    items = notation.parse_depths(text)
  except ValueError as err:
    raise errors.UsageError(f'--depths: {err}') from None
  for item in items:
    if item == 'all':
      depths += run.all_depths()
    elif item == 'trained':
      depths += run.trained_depths
    else:
      depths.append(run.resolve(item))
  if not depths:
    raise errors.UsageError("--depths is empty: give 'all', 'trained' or depths like 2-2-1")
  return list(dict.fromkeys(depths))


def check_split(run: trained_run.TrainedRun, split: str) -> None:
  if split == 'validation' and not run.config.data.validation_examples:
    raise errors.UsageError(
        f'{run.workdir} held out no validation examples (data.validation_examples=0): its '
        "whole train split was trained on; use --split test")


def selection_label(split: str) -> str:
  """What a choice made on ``split`` is worth, for every file and title that reports one."""
  if split == 'validation':
    return 'selected on the validation split (held out of training)'
  return 'selected on the TEST split: not held out, so these errors are optimistic'


def warn_if_selecting_on_test(split: str, what: str) -> None:
  """The terminal's warning when ``what`` is chosen on the test split."""
  if split == 'test':
    print(f'warning: {what} {selection_label(split)}; report test errors of a choice made '
          'on held-out data (data.validation_examples > 0, --split validation)',
          file=sys.stderr, flush=True)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
  """Indices of the points no other point beats: lower or equal cost and error, one lower.

  ``points`` are (cost, error) pairs. Returned by increasing cost.
  """
  order = sorted(range(len(points)), key=lambda i: points[i])
  front, best_error = [], math.inf
  for i in order:
    if points[i][1] < best_error:
      front.append(i)
      best_error = points[i][1]
  return front


def measured(run: trained_run.TrainedRun
             ) -> tuple[dict[notation.Depth, float], dict[notation.Depth, float]]:
  """({depth: evaluated top-1 error (%)}, {depth: batch-1 latency (ms) on this backend}).

  Errors are those ``python -m ddnn_jax.evaluate`` wrote for this checkpoint's step, the
  validation split's where both exist.
  """
  errors_by_depth = {}
  for split in ('test', 'validation'):  # Validation wins where both exist.
    for row in read_rows(run.workdir, split):
      if int(row['step']) == run.step:
        errors_by_depth[row_depth(row)] = float(row['top1_error'])
  table = latency.LatencyTable(run.workdir)
  latencies = {d: table.get(d, 1) for d in errors_by_depth if table.get(d, 1) is not None}
  return errors_by_depth, latencies


def evaluation_path(workdir: str, split: str, suffix: str = 'csv') -> epath.Path:
  return epath.Path(workdir) / EVALUATION_DIR / f'{split}.{suffix}'


def read_rows(workdir: str, split: str) -> list[dict[str, str]]:
  """The rows ``python -m ddnn_jax.evaluate`` wrote for ``split`` (every step)."""
  return file_io.read_csv(str(evaluation_path(workdir, split)))


def evaluate_depths(run: trained_run.TrainedRun, depths: Sequence[notation.Depth], split: str,
                    calib_examples: int, batch_size: int, latency_repeats: int,
                    full_net_bn: bool = False, bar: Any = None,
                    split_batches: trained_run.SplitCache | None = None,
                    progress: Callable[..., Any] | None = None) -> list[dict[str, Any]]:
  """One result row per depth (the columns of ``FIELDS``); latencies go to latency.json.

  ``batch_size`` is the batch of the accuracy pass and of the second latency (the first
  is at batch 1), so each depth compiles twice for inference, once for recalibration.
  ``bar``: a progress bar to advance per depth; else ``progress(None, description,
  total=, unit=)`` makes one of its own (the commands pass ``cli.progress``), or none.
  """
  check_split(run, split)
  trained_run.require_data(run, f'evaluating on the {split} split')  # Before the progress bar.
  split_batches = split_batches or trained_run.SplitCache(run, split, batch_size)
  calibration = None
  latencies = latency.LatencyTable(run.workdir)
  rows = []
  own_bar = bar is None and progress is not None
  if own_bar:
    bar = progress(None, f'evaluating on {split}', total=len(depths), unit='depth')
  for depth in depths:
    if not run.is_trained(depth) and calibration is None:
      calibration = bn_calibration.calibration_batches(run, calib_examples)
    stats, recalibrated = bn_calibration.stats_for(run, depth, calib_examples, calibration)
    size = flops.profile_subnet(run.model, run.image_shape, depth)
    row = {
        'step': run.step, 'depth': notation.format_depth(depth),
        'name': architectures.depth_label(run.config.model.arch, depth) or '',
        'blocks': sum(depth), 'params': size.params, 'flops': size.flops,
        'latency_ms_batch_1': latencies.measure(run, depth, stats, 1, latency_repeats),
        'latency_ms_batch_n': latencies.measure(run, depth, stats, batch_size, latency_repeats),
        'latency_batch': batch_size,
        'top1_error': 100 * (1 - trained_run.accuracy(run, depth, stats, split_batches)),
        'bn': 'recalibrated' if recalibrated else 'own',
        'top1_error_full_net_bn': '',
    }
    full_stats = run.full_net_stats(depth) if full_net_bn and recalibrated else None
    if full_stats is not None:
      # The alternative to recalibrating: the full net's statistics of the same modules.
      row['top1_error_full_net_bn'] = 100 * (1 - trained_run.accuracy(run, depth, full_stats,
                                                                      split_batches))
    rows.append(row)
    if bar is not None:
      bar.update(1)
  if own_bar:
    bar.close()
  latencies.save()
  return rows


def row_depth(row: dict[str, Any]) -> notation.Depth:
  """The depth of a result row: '2-1-2' (or an older '[2,1,2]') -> (2, 1, 2); with a
  width, '2-1-2@0.5' -> SubNet((2, 1, 2), 0.5)."""
  depth = notation.parse_depth(str(row['depth']))
  return notation.subnet(depth, notation.width_of(depth))


def merge_rows(old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]
               ) -> list[dict[str, Any]]:
  """Earlier rows of the same step are kept unless re-evaluated; most blocks first."""
  step = str(new[0]['step']) if new else None
  by_depth = {row_depth(r): r for r in old if str(r['step']) == step}
  by_depth.update({row_depth(r): r for r in new})
  return sorted(by_depth.values(), key=lambda r: (-notation.width_of(row_depth(r)),
                                                  -int(r['blocks']), [-n for n in row_depth(r)]))


def format_table(rows: Sequence[dict[str, Any]], latency_batch: int) -> str:
  full_bn = any(str(r.get('top1_error_full_net_bn', '')) for r in rows)
  head = ['Depth', 'Name', 'Blocks', 'Params (M)', 'FLOPs (M)', 'Latency b=1 (ms)',
          f'Latency b={latency_batch} (ms)', 'Top-1 err (%)', 'BN']
  if full_bn:
    head.append('Err, full-net BN (%)')
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [r['depth'], r['name'] or '-', r['blocks'], f"{int(r['params']) / 1e6:.3f}",
             f"{int(r['flops']) / 1e6:.2f}", f"{float(r['latency_ms_batch_1']):.2f}",
             f"{float(r['latency_ms_batch_n']):.2f}", f"{float(r['top1_error']):.2f}", r['bn']]
    if full_bn:
      extra = r.get('top1_error_full_net_bn', '')
      cells.append(f'{float(extra):.2f}' if str(extra) else '')
    lines.append('| ' + ' | '.join(map(str, cells)) + ' |')
  return '\n'.join(lines) + '\n'


def _plot(rows: Sequence[dict[str, Any]], title: str) -> bytes:
  fig, canvas = file_io.new_figure((6.5, 4.5))
  ax = fig.add_subplot()
  for bn, marker, label in (('own', 'o', 'trained (own BN statistics)'),
                            ('recalibrated', '.', 'not trained (BN recalibrated)')):
    points = [r for r in rows if r['bn'] == bn]
    ax.scatter([int(r['flops']) / 1e6 for r in points],
               [100 - float(r['top1_error']) for r in points], marker=marker,
               s=60 if bn == 'own' else 30, label=label, zorder=3 if bn == 'own' else 2)
  for r in rows:
    if r['bn'] == 'own':
      ax.annotate(r['depth'], (int(r['flops']) / 1e6, 100 - float(r['top1_error'])),
                  textcoords='offset points', xytext=(5, -12), fontsize=8)
  ax.set_xlabel('FLOPs (M multiply-adds)')
  ax.set_ylabel('Top-1 accuracy (%)')
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  return file_io.figure_png(fig, canvas)


def write_evaluation(run: trained_run.TrainedRun, split: str, rows: Sequence[dict[str, Any]],
                     latency_batch: int) -> dict[str, epath.Path]:
  paths = {kind: evaluation_path(run.workdir, split, kind) for kind in ('csv', 'md', 'png')}
  paths['csv'].parent.mkdir(parents=True, exist_ok=True)
  title = (f'{run.config.model.arch} on {run.config.data.dataset} ({split}), step {run.step}, '
           f'{latency.backend_key()}')
  file_io.atomic_write(str(paths['csv']), file_io.csv_text(rows, FIELDS).encode())
  file_io.atomic_write(str(paths['md']), (f'# {title}\n\n' +
                                          format_table(rows, latency_batch)).encode())
  file_io.atomic_write(str(paths['png']), _plot(rows, title))
  return paths


