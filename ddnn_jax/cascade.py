r"""Builds confidence cascades over a trained run's depths and picks one for a budget.

  python -m ddnn_jax.cascade --workdir W [--step best|latest|N] [--depths front|all|LIST] \
      [--stages 2|3] [--score maxprob|margin|entropy] [--trunk recompute|reuse|both] \
      [--max_flops X | --max_latency_ms X | --max_error_increase PT]

A cascade runs its first depth on every input and passes on to the next, deeper depth
only the inputs whose calibrated confidence is below that stage's threshold
(``ddnn_jax.cascading``). Every candidate depth's logits are computed once per split and
cached in ``W/cascade/logits/<step>/``; a temperature per depth is fitted on the
validation split (ECE before and after is printed); cascades of 2 (and, with
``--stages 3``, 3) depths of increasing FLOPs are tried over a grid of thresholds. Their
cost is the mean per input (each input pays the stages it reaches), in FLOPs and in
measured batch-1 latency. Everything is chosen on the validation split; the test split
reports, with the thresholds fixed. The default budget is ``--max_error_increase 0``: the
cheapest cascade whose validation error is no worse than the full net's.

Writes ``W/cascade/candidates.csv`` (every cascade and thresholds tried), ``front.csv``
(the validation front of error against mean FLOPs, with test figures),
``front.png`` (test error against mean FLOPs, the cascade front over the single depths),
``budgets.csv`` (cascade against the best single depth at 5 FLOPs budgets) and
``chosen.json`` (for ``predict --cascade``, ``DynamicModel.predict(cascade=)`` and
``export --cascade``).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from ddnn_jax import cascading, cli, deploy, inference
from ddnn_jax.core import errors, file_io
from ddnn_jax.nn import flops, notation

GRID = {2: 200, 3: 40}  # Thresholds tried per stage, by cascade length.
MAX_ENUMERATED = 64  # 'front' evaluates every depth of nets with at most this many.
CANDIDATE_FIELDS = ('depths', 'trunk', 'thresholds', 'exit_fractions_val', 'mean_flops_val',
                    'mean_latency_ms_val', 'top1_error_val', 'exit_fractions_test',
                    'mean_flops_test', 'top1_error_test')


def _fmt_list(values: Sequence[float], digits: int = 4) -> str:
  return ' '.join(f'{v:.{digits}f}' for v in values)


def candidate_depths(run: inference.TrainedRun, spec: str) -> tuple[list[notation.Depth], str]:
  """The depths cascades are built from, and how they were chosen."""
  if spec == 'all':
    return run.all_depths(), 'all'
  if spec != 'front':
    return deploy.parse_depths(run, spec), 'listed'
  if math.prod(run.full_depth) <= MAX_ENUMERATED:
    return run.all_depths(), 'front'  # Narrowed to the front once evaluated.
  rows = [r for r in file_io.read_csv(str(epath.Path(run.workdir) / 'search' / 'pareto.csv'))
          if r.get('front') == 'flops' and r.get('selected_on', 'validation') == 'validation'
          and int(r['step']) == run.step]
  if not rows:
    raise errors.UsageError(
        f'{run.workdir} has {math.prod(run.full_depth)} depths: give --depths LIST, or run '
        'python -m ddnn_jax.search on it first (its validation front is used)')
  return [deploy.row_depth(r) for r in rows], 'front'


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog='python -m ddnn_jax.cascade', doc=__doc__,
                              example='python -m ddnn_jax.cascade --workdir /tmp/ddnn --max_error_increase 0.15')
  deploy.add_run_flags(parser)
  parser.add_argument('--depths', default='front',
                      help="'front' (the depths on the static validation front of "
                      "python -m ddnn_jax.search), 'all', or depths, e.g. 1-1-1,2-2-2,3-3-3")
  parser.add_argument('--stages', type=int, choices=(2, 3), default=2,
                      help='longest cascade: 2 depths, or also 3')
  parser.add_argument('--score', choices=cascading.SCORES, default='maxprob',
                      help="a stage's confidence in its answer: the top probability, its "
                      'margin over the second, or the negative entropy (each calibrated)')
  parser.add_argument('--trunk', choices=(*cascading.TRUNKS, 'both'), default='recompute',
                      help="later stages recompute from the image, reuse the "
                      "previous stage's shared leading blocks, or both are tried")
  budget = parser.add_mutually_exclusive_group()
  budget.add_argument('--max_flops', type=deploy.parse_flops,
                      help='the most accurate cascade within this mean FLOPs per input, e.g. 15M')
  budget.add_argument('--max_latency_ms', type=cli.positive_float,
                      help='the most accurate cascade within this mean batch-1 latency')
  budget.add_argument('--max_error_increase', type=float, default=None, metavar='PT',
                      help="the cheapest cascade (mean FLOPs) whose validation error is at most "
                      "PT points above the full net's (default 0)")
  parser.add_argument('--calib_examples', type=cli.positive_int,
                      default=inference.DEFAULT_CALIB_EXAMPLES,
                      help='training images for BN recalibration of untrained depths')
  parser.add_argument('--batch_size', type=cli.positive_int, default=512,
                      help='batch of the logits passes')
  parser.add_argument('--latency_repeats', type=cli.positive_int, default=20,
                      help='timed calls per latency (their median; after warm-up)')
  args = parser.parse_args(argv)
  if args.max_error_increase is not None and not 0 <= args.max_error_increase < 100:
    raise errors.UsageError(f'--max_error_increase {args.max_error_increase:g}: must be in '
                            '[0, 100) points')
  run = inference.load_run(args.workdir, args.step)
  if not run.config.data.validation_examples:
    raise errors.UsageError(
        f'{run.workdir} held out no validation examples (data.validation_examples=0): a '
        'cascade is fitted on the validation split; train with data.validation_examples > 0')
  depths, how = candidate_depths(run, args.depths)
  if len(set(depths)) < 2:
    raise errors.UsageError(f'--depths gives {len(set(depths))} depth: a cascade needs at '
                            'least 2 (e.g. --depths all)')
  trunks = cascading.TRUNKS if args.trunk == 'both' else (args.trunk,)
  result = build(run, depths, how, args.stages, args.score, trunks, args)
  print(result['report'], end='')


def _logits(run, depths, trunk, split, stats, args, tags):
  return cascading.stage_logits_of_split(run, depths, trunk, split, stats, args.batch_size, tags)


def build(run: inference.TrainedRun, depths: list[notation.Depth], how: str, max_stages: int,
          score: str, trunks: Sequence[str], args) -> dict[str, Any]:
  """Everything the command does after parsing: returns what it wrote and printed."""
  inference.require_data(run, 'a cascade (validation and test logits)')
  out = epath.Path(run.workdir) / cascading.CASCADE_DIR
  sizes = {d: flops.profile_subnet(run.model, run.image_shape, d).flops for d in depths}
  bar = cli.progress(None, 'BN statistics and logits', total=len(depths), unit='depth')
  calibration = None
  stats, single, tags = {}, {}, {}
  for depth in depths:
    if not run.is_trained(depth) and calibration is None:
      calibration = inference.calibration_batches(run, args.calib_examples)
    stats[depth], recalibrated = inference.stats_for(run, depth, args.calib_examples,
                                                     calibration)
    tags[depth] = f'recalibrated-{args.calib_examples}' if recalibrated else 'own'
    for split in ('validation', 'test'):
      single[depth, split] = _logits(run, [depth], 'recompute', split, stats, args, tags)
    bar.update(1)
  bar.close()

  def error(logits, labels):
    return 100 * float(np.mean(np.argmax(logits, -1) != labels))

  static = {d: {split: error(single[d, split][0][0], single[d, split][1])
                for split in ('validation', 'test')} for d in depths}
  full = run.full_depth
  if how == 'front':
    front = deploy.pareto_front([(sizes[d], static[d]['validation']) for d in depths])
    depths = list({depths[i] for i in front} | {full})  # The full net ends the deepest cascades.
  depths.sort(key=lambda d: (sizes[d], d))
  if full not in static:
    raise errors.UsageError(f'the full net {notation.format_depth(full)} must be among --depths '
                            '(the budget is measured against it)')
  if len(depths) < 2:  # Before the latencies and the cascades: the long part.
    raise errors.UsageError(
        f'no cascade is left: the validation front of {run.workdir} keeps only the full net '
        f'{notation.format_depth(full)} (no smaller depth is as accurate per FLOP); give '
        '--depths all or a list of depths')
  latencies = inference.LatencyTable(run.workdir)
  temperatures, calibration_rows = {}, []
  for d in depths:
    logits, labels = single[d, 'validation'][0][0], single[d, 'validation'][1]
    temperatures[d] = cascading.fit_temperature(logits, labels)
    calibration_rows.append({
        'depth': notation.format_depth(d), 'flops': sizes[d],
        'top1_error_val': round(static[d]['validation'], 4),
        'top1_error_test': round(static[d]['test'], 4),
        'temperature': round(temperatures[d], 4),
        'ece_before': round(cascading.ece(logits, labels), 4),
        'ece_after': round(cascading.ece(logits, labels, temperatures[d]), 4),
        'latency_ms_batch_1': latencies.measure(run, d, stats[d], 1, args.latency_repeats)})
  latencies.save()

  rows = []
  chains = [c for n in range(2, max_stages + 1) for c in itertools.combinations(depths, n)]
  bar = cli.progress(None, 'cascades', total=len(chains) * len(trunks), unit='cascade')
  for trunk in trunks:
    for chain in chains:
      rows += _candidates(run, list(chain), trunk, score, stats, tags, temperatures, args)
      bar.update(1)
  bar.close()
  return _report(run, out, rows, depths, static, sizes, calibration_rows, score, args)


def _stage_latency(run, chain, trunk, stats, args) -> list[float]:
  """Measured batch-1 milliseconds of each stage (its own compiled function)."""
  latencies = inference.LatencyTable(run.workdir)
  if trunk == 'recompute':
    return [latencies.get(d, 1) or latencies.measure(run, d, stats[d], 1, args.latency_repeats)
            for d in chain]
  out = []
  image = np.zeros((1, *run.image_shape), np.float32)
  x = image
  plan = cascading.stage_plan(run.model.arch, chain, trunk)
  for k, (d, (resume, capture)) in enumerate(zip(chain, plan)):
    stage = cascading.cached_stage(run, d, resume, capture)
    params = run.used_params(d)
    out.append(inference.median_ms(lambda: stage(params, stats[d], x)[0], args.latency_repeats))
    _, captured = stage(params, stats[d], x)
    if k + 1 < len(chain):
      x = captured if plan[k + 1][0] else image
  return out


def _candidates(run, chain, trunk, score, stats, tags, temperatures, args) -> list[dict]:
  val_logits, val_labels = _logits(run, chain, trunk, 'validation', stats, args, tags)
  test_logits, test_labels = _logits(run, chain, trunk, 'test', stats, args, tags)
  temps = [temperatures[d] for d in chain] if trunk == 'recompute' else [
      cascading.fit_temperature(z, val_labels) for z in val_logits]
  grids = [cascading.threshold_grid(cascading.confidence(z, t, score), GRID[len(chain)])
           for z, t in zip(val_logits[:-1], temps[:-1])]
  costs = cascading.stage_costs(run.model, run.image_shape, chain, trunk)
  stage_ms = _stage_latency(run, chain, trunk, stats, args)
  val = cascading.sweep(val_logits, val_labels, temps, score, grids)
  test = {t: (f, e) for t, f, e in cascading.sweep(test_logits, test_labels, temps, score,
                                                   [np.array(sorted({th[k] for th, _, _ in val}))
                                                    for k in range(len(chain) - 1)])}
  rows = []
  for thresholds, fractions, err in val:
    reach = 1 - np.concatenate([[0.0], np.cumsum(fractions)[:-1]])
    t_fractions, t_err = test[thresholds]
    t_reach = 1 - np.concatenate([[0.0], np.cumsum(t_fractions)[:-1]])
    rows.append({
        'chain': tuple(chain), 'trunk_mode': trunk, 'temps': tuple(temps),
        'thresholds_t': thresholds,
        'depths': ' '.join(notation.format_depth(d) for d in chain), 'trunk': trunk,
        'thresholds': _fmt_list(thresholds, 6), 'exit_fractions_val': _fmt_list(fractions),
        'mean_flops_val': float(np.dot(reach, costs)),
        'mean_latency_ms_val': float(np.dot(reach, stage_ms)),
        'top1_error_val': err, 'exit_fractions_test': _fmt_list(t_fractions),
        'mean_flops_test': float(np.dot(t_reach, costs)), 'top1_error_test': t_err})
  return rows


def _choose(rows, full_val_error, args) -> dict:
  if args.max_flops is not None:
    fitting = [r for r in rows if r['mean_flops_val'] <= args.max_flops]
    key = lambda r: (r['top1_error_val'], r['mean_flops_val'])  # noqa: E731
    what = f'mean FLOPs <= {args.max_flops / 1e6:g}M'
  elif args.max_latency_ms is not None:
    fitting = [r for r in rows if r['mean_latency_ms_val'] <= args.max_latency_ms]
    key = lambda r: (r['top1_error_val'], r['mean_latency_ms_val'])  # noqa: E731
    what = f'mean batch-1 latency <= {args.max_latency_ms:g} ms'
  else:
    increase = args.max_error_increase or 0.0
    fitting = [r for r in rows if r['top1_error_val'] <= full_val_error + increase + 1e-9]
    key = lambda r: (r['mean_flops_val'], r['top1_error_val'])  # noqa: E731
    what = f'validation error <= the full net\'s + {increase:g} points'
  if not rows:
    raise errors.UsageError('no cascade was built (fewer than 2 depths)')
  if not fitting:
    raise errors.UsageError(f'no cascade has {what}; the cheapest has '
                            f'{min(r["mean_flops_val"] for r in rows) / 1e6:.2f}M mean FLOPs')
  return min(fitting, key=key) | {'budget': what}


def _report(run, out, rows, depths, static, sizes, calibration_rows, score, args) -> dict:
  full = run.full_depth
  full_val, full_test = static[full]['validation'], static[full]['test']
  chosen = _choose(rows, full_val, args)
  front = [rows[i] for i in deploy.pareto_front([(r['mean_flops_val'], r['top1_error_val'])
                                                 for r in rows])]
  static_depths = sorted(static, key=lambda d: sizes[d])
  budgets = []
  lowest, highest = min(sizes.values()), sizes[full]
  for budget in np.linspace(lowest, highest, 5):
    single = min((d for d in static if sizes[d] <= budget + 1e-6),
                 key=lambda d: (static[d]['validation'], sizes[d]))
    cascade = min((r for r in rows if r['mean_flops_val'] <= budget + 1e-6),
                  key=lambda r: (r['top1_error_val'], r['mean_flops_val']), default=None)
    budgets.append({
        'budget_flops': int(budget), 'single_depth': notation.format_depth(single),
        'single_top1_error_test': round(static[single]['test'], 4),
        'cascade': '' if cascade is None else cascade['depths'],
        'cascade_thresholds': '' if cascade is None else cascade['thresholds'],
        'cascade_mean_flops_test': '' if cascade is None else round(cascade['mean_flops_test']),
        'cascade_top1_error_test': '' if cascade is None else round(cascade['top1_error_test'], 4),
        'cascade_below': cascade is not None and cascade['top1_error_test'] < static[single][
            'test']})
  cascade = cascading.Cascade(chosen['chain'], chosen['thresholds_t'], chosen['temps'], score,
                              chosen['trunk_mode'])
  summary = cascading.to_json(
      cascade, run, selected_on='validation', budget=chosen['budget'],
      expected={'mean_flops': chosen['mean_flops_val'],
                'mean_latency_ms_batch_1': chosen['mean_latency_ms_val'],
                'exit_fractions': [float(x) for x in chosen['exit_fractions_val'].split()],
                'validation_top1_error': chosen['top1_error_val']},
      test={'mean_flops': chosen['mean_flops_test'],
            'exit_fractions': [float(x) for x in chosen['exit_fractions_test'].split()],
            'top1_error': chosen['top1_error_test']},
      full_net={'depth': notation.format_depth(full), 'flops': sizes[full],
                'validation_top1_error': full_val, 'test_top1_error': full_test},
      calibration=calibration_rows)
  out.mkdir(parents=True, exist_ok=True)
  file_io.atomic_write(str(out / 'candidates.csv'),
                       file_io.csv_text(rows, CANDIDATE_FIELDS).encode())
  file_io.atomic_write(str(out / 'front.csv'), file_io.csv_text(front, CANDIDATE_FIELDS).encode())
  file_io.atomic_write(str(out / 'budgets.csv'), file_io.csv_text(
      budgets, list(budgets[0])).encode())
  file_io.atomic_write(str(out / 'calibration.csv'), file_io.csv_text(
      calibration_rows, list(calibration_rows[0])).encode())
  file_io.atomic_write(str(out / 'chosen.json'), json.dumps(summary, indent=2).encode())
  title = (f'{run.config.model.arch} on {run.config.data.dataset}, step {run.step}: '
           f'{len(rows)} cascades of {len(depths)} depths ({score}); chosen on validation')
  file_io.atomic_write(str(out / 'front.png'), _plot(front, static_depths, static, sizes,
                                                     chosen, title))
  lines = [title, '',
           '| depth | FLOPs (M) | val err | test err | T | ECE before | ECE after |',
           '|---|---|---|---|---|---|---|']
  for r in calibration_rows:
    lines.append(f'| {r["depth"]} | {r["flops"] / 1e6:.1f} | {r["top1_error_val"]:.2f} | '
                 f'{r["top1_error_test"]:.2f} | {r["temperature"]:.2f} | {r["ece_before"]:.2f} | '
                 f'{r["ece_after"]:.2f} |')
  lines += ['', f'chosen ({chosen["budget"]}): {chosen["depths"]} ({chosen["trunk"]}), '
            f'thresholds {chosen["thresholds"]}',
            f'  validation: {chosen["top1_error_val"]:.2f}% error (full net {full_val:.2f}%), '
            f'{chosen["mean_flops_val"] / 1e6:.2f}M mean FLOPs '
            f'({chosen["mean_flops_val"] / sizes[full]:.2f}x the full net), exits '
            f'{chosen["exit_fractions_val"]}',
            f'  test:       {chosen["top1_error_test"]:.2f}% error (full net {full_test:.2f}%), '
            f'{chosen["mean_flops_test"] / 1e6:.2f}M mean FLOPs '
            f'({chosen["mean_flops_test"] / sizes[full]:.2f}x), exits '
            f'{chosen["exit_fractions_test"]}', '',
            '| budget (M FLOPs) | best single depth | its test err | cascade | its test err '
            '| mean FLOPs (M, test) | below |', '|---|---|---|---|---|---|---|']
  for b in budgets:
    lines.append(f'| {b["budget_flops"] / 1e6:.1f} | {b["single_depth"]} | '
                 f'{b["single_top1_error_test"]:.2f} | {b["cascade"] or "-"} | '
                 + (f'{b["cascade_top1_error_test"]:.2f} | '
                    f'{b["cascade_mean_flops_test"] / 1e6:.1f} | ' if b['cascade'] else '- | - | ')
                 + f'{"yes" if b["cascade_below"] else "no"} |')
  lines.append(f'\nwrote {out}/candidates.csv, front.csv, budgets.csv, calibration.csv, '
               'front.png, chosen.json')
  return {'report': '\n'.join(lines) + '\n', 'chosen': summary, 'budgets': budgets,
          'front': front, 'rows': rows}


def _plot(front, static_depths, static, sizes, chosen, title) -> bytes:
  fig, canvas = file_io.new_figure((7, 4.8))
  ax = fig.add_subplot()
  sx = [sizes[d] / 1e6 for d in static_depths]
  sy = [static[d]['test'] for d in static_depths]
  ax.scatter(sx, sy, s=14, color='0.6', label='single depths (test)', zorder=2)
  order = deploy.pareto_front([(sizes[d], static[d]['validation']) for d in static_depths])
  ax.plot([sx[i] for i in order], [sy[i] for i in order], 's--', color='0.3',
          label='static front (chosen on validation)', zorder=3)
  for i in order:
    ax.annotate(notation.format_depth(static_depths[i]), (sx[i], sy[i]), fontsize=7,
                textcoords='offset points', xytext=(4, 4))
  fx = [r['mean_flops_test'] / 1e6 for r in front]
  fy = [r['top1_error_test'] for r in front]
  ax.plot(fx, fy, '.-', color='tab:blue', label='cascade front (chosen on validation)', zorder=4)
  ax.scatter([chosen['mean_flops_test'] / 1e6], [chosen['top1_error_test']], marker='*', s=180,
             color='tab:red', label=f'chosen: {chosen["depths"]}', zorder=5)
  ax.set_xlabel('mean FLOPs per input (M multiply-adds), test split')
  ax.set_ylabel('top-1 error (%), test split')
  ax.set_title(title, fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  return file_io.figure_png(fig, canvas)


if __name__ == '__main__':
  cli.run(main)
