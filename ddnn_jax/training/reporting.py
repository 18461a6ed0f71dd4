"""Metrics output (JSONL + TensorBoard) and the final results table and plot.

Local paths are written with plain file I/O. Remote paths (gs://...) go through
etils.epath for the JSONL and the results, and through tensorboardX's own GCS
writer for the event files. Remote paths need gcsfs (or tensorflow) and
google-cloud-storage; launch/tpu_vm.sh installs both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ddnn_jax.core import file_io
from ddnn_jax.nn import architectures, notation

METRICS_FILE = 'metrics.jsonl'
TB_DIR = 'tb'
# top1_error: the test split; val_top1_error: the held-out validation split (empty without).
CSV_FIELDS = ('name', 'depth', 'params', 'flops', 'top1_error', 'val_top1_error')


# --- metrics during training ----------------------------------------------------


class _JsonlFile:
  """Appends JSON lines, locally or to an object store.

  Object stores cannot append, so for remote paths we keep every line in
  memory and rewrite the whole object on flush. Lines that are already there
  (from a run we resume) are read first, so they are kept.
  """

  def __init__(self, path: str):
    self._path = path
    self._remote = file_io.is_remote(path)
    if self._remote:
      from etils import epath  # pylint: disable=g-import-not-at-top
      self._epath = epath.Path(path)
      self._lines = (self._epath.read_text().splitlines(keepends=True)
                     if self._epath.exists() else [])
      self._dirty = False
    else:
      # Line-buffered: every record is on disk at once (readers follow a live run).
      self._file = open(path, 'a', encoding='utf-8', buffering=1)

  def write(self, record: Mapping[str, Any]) -> None:
    line = json.dumps(record) + '\n'
    if self._remote:
      self._lines.append(line)
      self._dirty = True
    else:
      self._file.write(line)

  def flush(self) -> None:
    if not self._remote:
      self._file.flush()
    elif self._dirty:
      self._epath.write_text(''.join(self._lines))
      self._dirty = False

  def close(self) -> None:
    self.flush()
    if not self._remote:
      self._file.close()


def _to_float(name: str, value: Any) -> float:
  # np.asarray also pulls jax arrays off the device.
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f'scalar {name!r} has shape {array.shape}, expected a scalar')
  return float(array.reshape(()))


class MetricWriter:
  """Writes scalars to workdir/metrics.jsonl and TensorBoard files in workdir/tb.

  Each write_scalars call adds one JSON object, {"step": int, **scalars}, to
  the JSONL file. NaN and inf are written as Python's json does (NaN, Infinity),
  so a diverging loss stays visible. With enabled=False (processes other than
  0 in a multi-host run) it writes nothing and creates no files.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self._enabled = enabled
    self._jsonl: _JsonlFile | None = None
    self._tb = None
    if not enabled:
      return
    if not file_io.is_remote(workdir):
      os.makedirs(workdir, exist_ok=True)
    # Imported here so that disabled writers (and the rest of the package)
    # do not pay for tensorboardX.
    import tensorboardX  # pylint: disable=g-import-not-at-top
    self._jsonl = _JsonlFile(file_io.join(workdir, METRICS_FILE))
    self._tb = tensorboardX.SummaryWriter(file_io.join(workdir, TB_DIR))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self._enabled:
      return
    if self._jsonl is None:
      raise RuntimeError('MetricWriter is closed')
    if 'step' in scalars:
      raise ValueError("'step' is reserved for the step number")
    step = int(step)
    values = {name: _to_float(name, value) for name, value in scalars.items()}
    self._jsonl.write({'step': step, **values})
    for name, value in values.items():
      self._tb.add_scalar(name, value, global_step=step)

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()
      self._jsonl = self._tb = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Reads back workdir/metrics.jsonl, in order; [] if it does not exist."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(file_io.join(workdir, METRICS_FILE))
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line]


# --- per-depth metric names ------------------------------------------------------


def per_depth(prefix: str, values: Any, names: Sequence[str]) -> dict[str, float]:
  """{'prefix/<depth name>': value}: one scalar per depth, in the order of ``names``."""
  values = np.asarray(values)
  if values.shape != (len(names),):
    raise ValueError(f'{prefix}: {values.shape[0] if values.ndim else "a scalar"} values '
                     f'for {len(names)} depths')
  return {f'{prefix}/{n}': float(v) for n, v in zip(names, values)}


def train_scalars(mean: Mapping[str, Any], names: Sequence[str],
                  learning_rate: float) -> dict[str, float]:
  """The logged train metrics: loss, LR, per-depth CE and accuracy, distillation terms.

  ``mean`` holds the train step's metrics averaged over the steps since the last log:
  'ce' and 'accuracy' per depth, 'kl'/'attention' per sub-net, and the full net's
  'kl_full'/'attention_full' (taught by the ensemble, EKD).
  """
  scalars = {'train/loss': float(mean['loss']), 'train/learning_rate': float(learning_rate),
             **per_depth('train/ce', mean['ce'], names),
             **per_depth('train/accuracy', mean['accuracy'], names)}
  for part in ('kl', 'attention'):
    if part in mean:
      scalars.update(per_depth(f'train/{part}', mean[part], names[1:]))
    if f'{part}_full' in mean:
      scalars[f'train/{part}/{names[0]}'] = float(mean[f'{part}_full'])
  return scalars


def term_scalars(norms: Mapping[str, Any], names: Sequence[str]) -> dict[str, float]:
  """``steps.term_gradient_norms``' output as logged scalars, depth indices as names:
  'train/term/kl/2-2-2', 'train/grad_norm/ce/3-3-3', 'train/grad_norm_shared/total'."""
  scalars = {}
  for key, value in norms.items():
    what, *rest = key.split('/')
    if len(rest) == 2:  # KIND/d
      rest = [rest[0], names[int(rest[1])]]
    scalars['/'.join(['train', what, *rest])] = float(value)
  return scalars


def eval_scalars(result: Mapping[str, Any] | None, names: Sequence[str], epoch: int,
                 validation: Mapping[str, Any] | None = None) -> dict[str, float]:
  """Per-depth top-1 accuracy and CE: 'eval/...' on the test split (if evaluated),
  'val/...' on the held-out validation split when the run has one."""
  scalars = {'epoch': float(epoch)}
  if result is not None:
    scalars.update(per_depth('eval/accuracy', result['accuracy'], names))
    scalars.update(per_depth('eval/ce', result['ce'], names))
  if validation is not None:
    scalars.update(per_depth('val/accuracy', validation['accuracy'], names))
    scalars.update(per_depth('val/ce', validation['ce'], names))
  return scalars


# --- results table and plot -------------------------------------------------------


def _error_percent(name: str, acc: Any) -> float:
  acc = _to_float('top1_acc', acc)
  if not 0.0 <= acc <= 1.0:
    raise ValueError(f'top1_acc of {name!r} is {acc}; pass a fraction in [0, 1]')
  # Rounded so the CSV shows 22.8, not 22.799999999999997.
  return round(100.0 * (1.0 - acc), 6)


def results_rows(names: Sequence[str], depths: Sequence[Any],
                 params: Sequence[float], flops: Sequence[float],
                 top1_acc: Sequence[float],
                 val_top1_acc: Sequence[float] | None = None) -> list[dict[str, Any]]:
  """Makes one row per sub-net.

  Args:
    names: e.g. 'resnet20', '2-2-2', ...
    depths: blocks per stage, as a sequence (e.g. [3, 3, 3]) or a string.
    params: parameter counts.
    flops: multiply-adds per image.
    top1_acc: test top-1 accuracy as a fraction in [0, 1].
    val_top1_acc: the same on the validation split, or None (no validation split).

  Returns:
    Dicts with keys name, depth, params, flops, top1_error (in %, = 100 * (1 - acc))
    and val_top1_error (None without a validation split).
  """
  columns = [names, depths, params, flops, top1_acc]
  if val_top1_acc is not None:
    columns.append(val_top1_acc)
  if len({len(c) for c in columns}) != 1:
    raise ValueError(f'column lengths differ: {[len(c) for c in columns]}')
  rows = []
  for i, (name, depth, n_params, n_flops, acc) in enumerate(zip(*columns[:5])):
    rows.append({
        'name': str(name),
        'depth': notation.format_depth(depth),
        'params': int(round(_to_float('params', n_params))),
        'flops': int(round(_to_float('flops', n_flops))),
        'top1_error': _error_percent(name, acc),
        'val_top1_error': (None if val_top1_acc is None
                           else _error_percent(name, val_top1_acc[i])),
    })
  return rows


def depth_results(arch: str, profiles: Sequence[Any], top1_acc: Sequence[float],
                  val_top1_acc: Sequence[float] | None = None) -> list[dict[str, Any]]:
  """The results rows of a run's depths (full net first): each named after the net it
  equals ('resnet32'), else after its block counts ('2-2-2')."""
  names = [architectures.depth_label(arch, p.depth) or notation.depth_name(p.depth)
           for p in profiles]
  return results_rows(names, [p.depth for p in profiles], [p.params for p in profiles],
                      [p.flops for p in profiles], top1_acc, val_top1_acc)


def format_markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Formats rows as a markdown table, with params and FLOPs in millions; the validation
  error column appears when the rows have one."""
  with_val = any(r.get('val_top1_error') is not None for r in rows)
  head = '| Net | Depth | Params (M) | FLOPs (M) | Top-1 err (%) |'
  rule = '|:----|:------|-----------:|----------:|--------------:|'
  lines = [head + (' Val. err (%) |' if with_val else ''), rule + ('-----------:|' if with_val else '')]
  for r in rows:
    line = (f"| {r['name']} | {r['depth']} | {r['params'] / 1e6:,.2f} | "
            f"{r['flops'] / 1e6:,.1f} | {r['top1_error']:.2f} |")
    lines.append(line + (f" {r['val_top1_error']:.2f} |" if with_val else ''))
  return '\n'.join(lines) + '\n'


def _plot_png(rows: Sequence[Mapping[str, Any]], title: str) -> bytes:
  """Draws top-1 accuracy vs. FLOPs, one labelled point per sub-net."""
  ordered = sorted(rows, key=lambda r: r['flops'])
  x = [r['flops'] / 1e6 for r in ordered]
  y = [100.0 - r['top1_error'] for r in ordered]
  fig, canvas = file_io.new_figure()
  ax = fig.add_subplot()
  ax.plot(x, y, 'o-', color='tab:blue')
  for r, xi, yi in zip(ordered, x, y):
    ax.annotate(f"{r['name']} {r['depth']}", (xi, yi), textcoords='offset points',
                xytext=(5, -12), fontsize=8)
  ax.set_xlabel('FLOPs (M multiply-adds)')
  ax.set_ylabel('Top-1 accuracy (%)')
  ax.set_title(title or 'Top-1 accuracy vs. FLOPs')
  ax.grid(True, alpha=0.3)
  ax.margins(x=0.15, y=0.15)  # room for the labels
  return file_io.figure_png(fig, canvas)


def write_results(workdir: str, rows: Sequence[Mapping[str, Any]],
                  title: str = '') -> dict[str, str]:
  """Writes results.md, results.csv and accuracy_vs_flops.png to workdir.

  Returns:
    {'markdown': path, 'csv': path, 'plot': path}.
  """
  if not rows:
    raise ValueError('no rows to write')
  if not file_io.is_remote(workdir):
    os.makedirs(workdir, exist_ok=True)
  heading = f'# {title}\n\n' if title else ''
  paths = {
      'markdown': file_io.join(workdir, 'results.md'),
      'csv': file_io.join(workdir, 'results.csv'),
      'plot': file_io.join(workdir, 'accuracy_vs_flops.png'),
  }
  contents = {
      'markdown': (heading + format_markdown_table(rows)).encode(),
      'csv': file_io.csv_text(rows, CSV_FIELDS).encode(),
      'plot': _plot_png(rows, title),
  }
  for key, path in paths.items():
    file_io.atomic_write(path, contents[key])
  return paths