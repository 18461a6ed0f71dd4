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
from collections.abc import Sequence
from typing import Any

from etils import epath

from ddnn_jax import cli
from ddnn_jax.core import errors, file_io
from ddnn_jax.deploy import depth_search, evaluation, latency, trained_run
from ddnn_jax.nn import flops, notation


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog='python -m ddnn_jax.search', doc=__doc__,
                              example='python -m ddnn_jax.search --workdir /tmp/ddnn --max_flops 20M')
  cli.add_run_flags(parser)
  cli.add_measure_flags(parser)
  parser.add_argument('--max_flops', type=cli.parse_flops,
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

  run = trained_run.load_run(args.workdir, args.step)
  evaluation.check_split(run, args.split)
  evaluation.warn_if_selecting_on_test(args.split, 'the depths and their fronts are')
  smallest = notation.subnet((1,) * len(run.full_depth), min(run.widths))
  smallest_flops = flops.profile_subnet(run.model, run.image_shape, smallest).flops
  if args.max_flops is not None and args.max_flops < smallest_flops:
    raise errors.UsageError(
        f'--max_flops {args.max_flops / 1e6:g}M is below the smallest depth, '
        f'{notation.format_depth(smallest)}, which needs {smallest_flops / 1e6:.2f}M')
  latencies = latency.LatencyTable(run.workdir)
  if args.max_latency_ms is not None:
    # Timing does not depend on the statistics' values: no recalibration (or writing) yet.
    fastest = latencies.measure(run, smallest, run.placeholder_stats(smallest), 1,
                                args.latency_repeats)
    if args.max_latency_ms < fastest:
      raise errors.UsageError(
          f'--max_latency_ms {args.max_latency_ms:g} is below the smallest depth, '
          f'{notation.format_depth(smallest)}, which takes {fastest:.2f} ms at batch 1 on '
          f'{latency.backend_key()}')
    latencies.save()

  split_batches = trained_run.SplitCache(run, args.split, args.batch_size)
  rows_by_depth: dict[notation.Depth, dict[str, Any]] = {}

  def evaluate_fn(depths: list[notation.Depth]) -> dict[notation.Depth, tuple[float, float]]:
    rows = evaluation.evaluate_depths(run, depths, args.split, args.calib_examples,
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
      depth_search.progressive_search(run.full_depth, evaluate_fn, args.beam, run.widths)

  rows = evaluation.merge_rows([], list(rows_by_depth.values()))
  fronts = {key: evaluation.pareto_front([(float(r[key]), float(r['top1_error'])) for r in rows])
            for key in ('flops', 'latency_ms_batch_1')}
  for r_index, r in enumerate(rows):
    r['trained'] = r['bn'] == 'own'
    r['on_flops_front'] = r_index in fronts['flops']
    r['on_latency_front'] = r_index in fronts['latency_ms_batch_1']
    r['selected_on'] = args.split
  axes = (('flops', 'flops'), ('latency', 'latency_ms_batch_1'))
  pareto = [{'front': front, **rows[i]} for front, key in axes for i in fronts[key]]
  out = epath.Path(args.workdir) / depth_search.SEARCH_DIR
  out.mkdir(parents=True, exist_ok=True)
  fields = [f for f in evaluation.FIELDS if f != 'top1_error_full_net_bn']
  label = evaluation.selection_label(args.split)
  title = (f'{run.config.model.arch} on {run.config.data.dataset}, step {run.step}: '
           f'{len(rows)} of {space} depths ({"all" if exhaustive else "progressive"}), '
           f'{latency.backend_key()}; {label}')
  budgets = []
  if args.max_flops is not None:
    budgets.append((f'<= {args.max_flops / 1e6:g}M FLOPs', 'flops', args.max_flops))
  if args.max_latency_ms is not None:
    budgets.append((f'<= {args.max_latency_ms:g} ms at batch 1', 'latency_ms_batch_1',
                    args.max_latency_ms))
  best = {text: depth_search.best_under(rows, key, budget) for text, key, budget in budgets}
  front_table = evaluation.format_table([rows[i] for i in fronts['flops']], args.batch_size)
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
  file_io.atomic_write(str(out / 'pareto.png'),
                       depth_search.plot_fronts(rows, fronts, title, args.split))

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