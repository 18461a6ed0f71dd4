r"""Searches a trained run's depth configurations for the best accuracy per FLOP and per ms.

  python -m ddnn_jax.search --workdir W [--max_flops 20M] [--max_latency_ms 3] \
      [--max_candidates 1000] [--beam 4]

Every depth configuration is a candidate (prod(n_i) of them). Up to ``--max_candidates``
all are evaluated; larger spaces are searched progressively: from the full net, remove
one block at a time (or, for a run with model.widths, step to the next narrower width),
keeping at each size the ``--beam`` candidates that lose the least
accuracy per FLOP saved. Each candidate is evaluated on the validation split (held out
of training) with its own BN statistics if the run trained it, recalibrated otherwise.
Writes ``W/search/candidates.csv`` (all), ``pareto.csv`` (the fronts of error against
FLOPs and against batch-1 latency), ``pareto.md``, ``summary.json`` (fronts and the best
depth under each budget) and ``pareto.png``, and prints the best depth under each budget
given. With ``--split test`` (runs without a validation split) every one of them says
that the choice was made on the test split, which is then no held-out estimate. Train the chosen depths further with ``--config.init_from=W``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from etils import epath

from ddnn_jax import cli, deploy, inference
from ddnn_jax.core import errors, file_io
from ddnn_jax.nn import flops, notation

SEARCH_DIR = 'search'
Scores = Mapping[notation.Depth, tuple[float, float]]  # depth -> (top-1 error, FLOPs)


def children(depth: notation.Depth, widths: Sequence[float] = (1.0,)) -> list[notation.Depth]:
  """The sub-nets one step smaller: one stage loses its last block (stages keep >= 1), or
  the whole net runs at the next narrower of ``widths``."""
  width = notation.width_of(depth)
  blocks = notation.blocks_of(depth)
  smaller = [notation.subnet(blocks[:s] + (n - 1,) + blocks[s + 1:], width)
             for s, n in enumerate(blocks) if n > 1]
  narrower = sorted(w for w in widths if w < width)
  if narrower:
    smaller.append(notation.subnet(blocks, narrower[-1]))
  return smaller


def progressive_search(full: notation.Depth,
                       evaluate_fn: Callable[[list[notation.Depth]], Scores],
                       beam: int, widths: Sequence[float] = (1.0,)
                       ) -> dict[notation.Depth, tuple[float, float]]:
  """Beam search from the full net down to one block per stage (at the narrowest width).

  ``evaluate_fn(depths)`` returns {depth: (error, flops)}. At each size, the ``beam``
  candidates kept are those that add the least error per FLOP saved, relative to the
  best of their parents. Returns every candidate evaluated.
  """
  scores = dict(evaluate_fn([full]))
  frontier = [full]
  while True:
    parents: dict[notation.Depth, list[notation.Depth]] = {}
    for parent in frontier:
      for child in children(parent, widths):
        parents.setdefault(child, []).append(parent)
    if not parents:
      return scores
    new = [d for d in parents if d not in scores]
    if new:
      scores.update(evaluate_fn(new))

    def cost_of_removal(child):
      error, macs = scores[child]
      return min((error - scores[p][0]) / max(scores[p][1] - macs, 1) for p in parents[child])

    frontier = sorted(parents, key=lambda d: (cost_of_removal(d), d))[:beam]


def best_under(rows: Sequence[Mapping[str, Any]], key: str, budget: float
               ) -> Mapping[str, Any] | None:
  fitting = [r for r in rows if float(r[key]) <= budget]
  return min(fitting, key=lambda r: (float(r['top1_error']), float(r[key]))) if fitting else None


def _plot(rows: Sequence[Mapping[str, Any]], fronts: Mapping[str, list[int]],
          title: str, split: str) -> bytes:
  fig, canvas = file_io.new_figure((11, 4.5))
  for panel, (key, label) in enumerate((('flops', 'FLOPs (M multiply-adds)'),
                                        ('latency_ms_batch_1', 'Latency at batch 1 (ms)'))):
    ax = fig.add_subplot(1, 2, panel + 1)
    scale = 1e-6 if key == 'flops' else 1.0
    x = [float(r[key]) * scale for r in rows]
    y = [float(r['top1_error']) for r in rows]
    ax.scatter(x, y, s=12, color='0.6', label='candidates', zorder=2)
    front = fronts[key]
    ax.plot([x[i] for i in front], [y[i] for i in front], 'o-', color='tab:blue',
            label='Pareto front', zorder=3)
    trained = [i for i, r in enumerate(rows) if r['bn'] == 'own']
    ax.scatter([x[i] for i in trained], [y[i] for i in trained], marker='*', s=150,
               color='tab:red', label='trained depths', zorder=4)
    for i in set(front) | set(trained):
      ax.annotate(rows[i]['depth'], (x[i], y[i]), textcoords='offset points', xytext=(4, 4),
                  fontsize=7)
    ax.set_xlabel(label)
    ax.set_ylabel(f'Top-1 error (%), {split}')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  return file_io.figure_png(fig, canvas)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog='python -m ddnn_jax.search', doc=__doc__,
                              example='python -m ddnn_jax.search --workdir /tmp/ddnn --max_flops 20M')
  deploy.add_run_flags(parser)
  deploy.add_measure_flags(parser)
  parser.add_argument('--max_flops', type=deploy.parse_flops,
                      help='print the best depth within this many multiply-adds, e.g. 20M')
  parser.add_argument('--max_latency_ms', type=cli.positive_float,
                      help='print the best depth within this latency at batch 1')
  parser.add_argument('--max_candidates', type=cli.positive_int, default=1000,
                      help='evaluate every depth configuration up to this many (default 1000)')
  parser.add_argument('--beam', type=cli.positive_int, default=4,
                      help='candidates kept per size in a progressive search (default 4)')
  parser.add_argument('--split', default='validation', choices=('validation', 'test'),
                      help='validation (default, held out of training) or test')
  args = parser.parse_args(argv)

  run = inference.load_run(args.workdir, args.step)
  deploy.check_split(run, args.split)
  deploy.warn_if_selecting_on_test(args.split, 'the depths and their fronts are')
  smallest = notation.subnet((1,) * len(run.full_depth), min(run.widths))
  smallest_flops = flops.profile_subnet(run.model, run.image_shape, smallest).flops
  if args.max_flops is not None and args.max_flops < smallest_flops:
    raise errors.UsageError(
        f'--max_flops {args.max_flops / 1e6:g}M is below the smallest depth, '
        f'{notation.format_depth(smallest)}, which needs {smallest_flops / 1e6:.2f}M')
  latencies = inference.LatencyTable(run.workdir)
  if args.max_latency_ms is not None:
    # Timing does not depend on the statistics' values: no recalibration (or writing) yet.
    fastest = latencies.measure(run, smallest, run.placeholder_stats(smallest), 1,
                                args.latency_repeats)
    if args.max_latency_ms < fastest:
      raise errors.UsageError(
          f'--max_latency_ms {args.max_latency_ms:g} is below the smallest depth, '
          f'{notation.format_depth(smallest)}, which takes {fastest:.2f} ms at batch 1 on '
          f'{inference.backend_key()}')
    latencies.save()

  split_batches = inference.SplitCache(run, args.split, args.batch_size)
  rows_by_depth: dict[notation.Depth, dict[str, Any]] = {}

  def evaluate_fn(depths: list[notation.Depth]) -> dict[notation.Depth, tuple[float, float]]:
    rows = deploy.evaluate_depths(run, depths, args.split, args.calib_examples,
                                  args.batch_size, args.latency_repeats, bar=bar,
                                  split_batches=split_batches)
    rows_by_depth.update(zip(depths, rows, strict=True))
    return {d: (float(rows_by_depth[d]['top1_error']), float(rows_by_depth[d]['flops']))
            for d in depths}

  space = math.prod(run.full_depth) * len(run.widths)
  exhaustive = space <= args.max_candidates
  with cli.progress(None, f'searching {space} depths' if exhaustive else
                    f'progressive search (beam {args.beam}) of {space} depths',
                    total=space if exhaustive else None, unit='depth') as bar:
    if exhaustive:
      evaluate_fn(run.all_depths())
    else:
      progressive_search(run.full_depth, evaluate_fn, args.beam, run.widths)

  rows = deploy.merge_rows([], list(rows_by_depth.values()))
  fronts = {key: deploy.pareto_front([(float(r[key]), float(r['top1_error'])) for r in rows])
            for key in ('flops', 'latency_ms_batch_1')}
  for r_index, r in enumerate(rows):
    r['trained'] = r['bn'] == 'own'
    r['on_flops_front'] = r_index in fronts['flops']
    r['on_latency_front'] = r_index in fronts['latency_ms_batch_1']
    r['selected_on'] = args.split
  axes = (('flops', 'flops'), ('latency', 'latency_ms_batch_1'))
  pareto = [{'front': front, **rows[i]} for front, key in axes for i in fronts[key]]
  out = epath.Path(args.workdir) / SEARCH_DIR
  out.mkdir(parents=True, exist_ok=True)
  fields = [f for f in deploy.FIELDS if f != 'top1_error_full_net_bn']
  label = deploy.selection_label(args.split)
  title = (f'{run.config.model.arch} on {run.config.data.dataset}, step {run.step}: '
           f'{len(rows)} of {space} depths ({"all" if exhaustive else "progressive"}), '
           f'{inference.backend_key()}; {label}')
  budgets = []
  if args.max_flops is not None:
    budgets.append((f'<= {args.max_flops / 1e6:g}M FLOPs', 'flops', args.max_flops))
  if args.max_latency_ms is not None:
    budgets.append((f'<= {args.max_latency_ms:g} ms at batch 1', 'latency_ms_batch_1',
                    args.max_latency_ms))
  best = {text: best_under(rows, key, budget) for text, key, budget in budgets}
  front_table = deploy.format_table([rows[i] for i in fronts['flops']], args.batch_size)
  summary = {'split': args.split, 'held_out': args.split == 'validation', 'note': label,
             'step': run.step, 'candidates': len(rows), 'space': space,
             'flops_front': [rows[i]['depth'] for i in fronts['flops']],
             'latency_front': [rows[i]['depth'] for i in fronts['latency_ms_batch_1']],
             'best': {text: None if b is None else {
                 'depth': b['depth'], 'top1_error': float(b['top1_error']),
                 'flops': int(b['flops']), 'latency_ms_batch_1': float(b['latency_ms_batch_1'])}
                      for text, b in best.items()}}
  file_io.atomic_write(str(out / 'candidates.csv'), file_io.csv_text(rows, [
      *fields, 'trained', 'on_flops_front', 'on_latency_front', 'selected_on']).encode())
  file_io.atomic_write(str(out / 'pareto.csv'),
                       file_io.csv_text(pareto, ['front', *fields, 'selected_on']).encode())
  file_io.atomic_write(str(out / 'pareto.md'),
                       f'# {title}\n\nFLOPs front ({label}):\n\n{front_table}'.encode())
  file_io.atomic_write(str(out / 'summary.json'), json.dumps(summary, indent=2).encode())
  file_io.atomic_write(str(out / 'pareto.png'), _plot(rows, fronts, title, args.split))

  print(title)
  print(front_table, end='')
  for text, b in best.items():
    if b is None:
      print(f'best {text}: none of the {len(rows)} candidates fits')
    else:
      print(f'best {text}: {b["depth"]} with {float(b["top1_error"]):.2f}% {args.split} error, '
            f'{int(b["flops"]) / 1e6:.2f}M FLOPs, {float(b["latency_ms_batch_1"]):.2f} ms')
  print(f'wrote {out / "candidates.csv"}, pareto.csv, pareto.md, summary.json, pareto.png')


if __name__ == '__main__':
  cli.run(main)
