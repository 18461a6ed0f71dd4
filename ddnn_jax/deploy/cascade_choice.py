"""Building confidence cascades over a run's depths and choosing one for a budget.

``build`` computes each candidate depth's logits once per split (cached), fits a
temperature per depth on the validation split, tries cascades of 2 (or 3) depths of
increasing FLOPs over a grid of thresholds, and chooses on the validation split (the test
split reports, with the thresholds fixed); it writes ``W/cascade/`` (candidates, front,
budgets, calibration, ``chosen.json``). ``python -m ddnn_jax.cascade`` is its command;
the mechanics of a cascade are in ``early_exit``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from etils import epath

from ddnn_jax.core import errors, file_io
from ddnn_jax.deploy import bn_calibration, early_exit, evaluation, latency, trained_run
from ddnn_jax.nn import flops, notation

GRID = {2: 200, 3: 40}  # Thresholds tried per stage, by cascade length.
MAX_ENUMERATED = 64  # 'front' evaluates every depth of nets with at most this many.
CANDIDATE_FIELDS = ('depths', 'trunk', 'thresholds', 'exit_fractions_val', 'mean_flops_val',
                    'mean_latency_ms_val', 'top1_error_val', 'exit_fractions_test',
                    'mean_flops_test', 'top1_error_test')


def _fmt_list(values: Sequence[float], digits: int = 4) -> str:
  return ' '.join(f'{v:.{digits}f}' for v in values)


def candidate_depths(run: trained_run.TrainedRun, spec: str) -> tuple[list[notation.Depth], str]:
  """The depths cascades are built from, and how they were chosen."""
  if spec == 'all':
    return run.all_depths(), 'all'
  if spec != 'front':
    return evaluation.parse_depths(run, spec), 'listed'
  if math.prod(run.full_depth) <= MAX_ENUMERATED:
    return run.all_depths(), 'front'  # Narrowed to the front once evaluated.
  rows = [r for r in file_io.read_csv(str(epath.Path(run.workdir) / 'search' / 'pareto.csv'))
          if r.get('front') == 'flops' and r.get('selected_on', 'validation') == 'validation'
          and int(r['step']) == run.step]
  if not rows:
    raise errors.UsageError(
        f'{run.workdir} has {math.prod(run.full_depth)} depths: give --depths LIST, or run '
        'python -m ddnn_jax.search on it first (its validation front is used)')
  return [evaluation.row_depth(r) for r in rows], 'front'


def _logits(run, depths, trunk, split, stats, args, tags):
  return early_exit.stage_logits_of_split(run, depths, trunk, split, stats, args.batch_size, tags)


def build(run: trained_run.TrainedRun, depths: list[notation.Depth], how: str, max_stages: int,
          score: str, trunks: Sequence[str], args, progress: Callable[..., Any]
          ) -> dict[str, Any]:
  """Everything the command does after parsing: returns what it wrote and printed.

  ``progress(None, description, total=, unit=)`` makes the progress bars (the command
  passes ``cli.progress``).
  """
  trained_run.require_data(run, 'a cascade (validation and test logits)')
  out = epath.Path(run.workdir) / early_exit.CASCADE_DIR
  sizes = {d: flops.profile_subnet(run.model, run.image_shape, d).flops for d in depths}
  bar = progress(None, 'BN statistics and logits', total=len(depths), unit='depth')
  calibration = None
  stats, single, tags = {}, {}, {}
  for depth in depths:
    if not run.is_trained(depth) and calibration is None:
      calibration = bn_calibration.calibration_batches(run, args.calib_examples)
    stats[depth], recalibrated = bn_calibration.stats_for(run, depth, args.calib_examples,
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
    front = evaluation.pareto_front([(sizes[d], static[d]['validation']) for d in depths])
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
  latencies = latency.LatencyTable(run.workdir)
  temperatures, calibration_rows = {}, []
  for d in depths:
    logits, labels = single[d, 'validation'][0][0], single[d, 'validation'][1]
    temperatures[d] = early_exit.fit_temperature(logits, labels)
    calibration_rows.append({
        'depth': notation.format_depth(d), 'flops': sizes[d],
        'top1_error_val': round(static[d]['validation'], 4),
        'top1_error_test': round(static[d]['test'], 4),
        'temperature': round(temperatures[d], 4),
        'ece_before': round(early_exit.ece(logits, labels), 4),
        'ece_after': round(early_exit.ece(logits, labels, temperatures[d]), 4),
        'latency_ms_batch_1': latencies.measure(run, d, stats[d], 1, args.latency_repeats)})
  latencies.save()

  rows = []
  chains = [c for n in range(2, max_stages + 1) for c in itertools.combinations(depths, n)]
  bar = progress(None, 'cascades', total=len(chains) * len(trunks), unit='cascade')
  for trunk in trunks:
    for chain in chains:
      rows += _candidates(run, list(chain), trunk, score, stats, tags, temperatures, args)
      bar.update(1)
  bar.close()
  return _report(run, out, rows, depths, static, sizes, calibration_rows, score, args)


def _stage_latency(run, chain, trunk, stats, args) -> list[float]:
  """Measured batch-1 milliseconds of each stage (its own compiled function)."""
  latencies = latency.LatencyTable(run.workdir)
  if trunk == 'recompute':
    return [latencies.get(d, 1) or latencies.measure(run, d, stats[d], 1, args.latency_repeats)
            for d in chain]
  out = []
  image = np.zeros((1, *run.image_shape), np.float32)
  x = image
  plan = early_exit.stage_plan(run.model.arch, chain, trunk)
  for k, (d, (resume, capture)) in enumerate(zip(chain, plan)):
    stage = early_exit.cached_stage(run, d, resume, capture)
    params = run.used_params(d)
    out.append(latency.median_ms(lambda: stage(params, stats[d], x)[0], args.latency_repeats))
    _, captured = stage(params, stats[d], x)
    if k + 1 < len(chain):
      x = captured if plan[k + 1][0] else image
  return out


def _candidates(run, chain, trunk, score, stats, tags, temperatures, args) -> list[dict]:
  val_logits, val_labels = _logits(run, chain, trunk, 'validation', stats, args, tags)
  test_logits, test_labels = _logits(run, chain, trunk, 'test', stats, args, tags)
  temps = [temperatures[d] for d in chain] if trunk == 'recompute' else [
      early_exit.fit_temperature(z, val_labels) for z in val_logits]
  grids = [early_exit.threshold_grid(early_exit.confidence(z, t, score), GRID[len(chain)])
           for z, t in zip(val_logits[:-1], temps[:-1])]
  costs = early_exit.stage_costs(run.model, run.image_shape, chain, trunk)
  stage_ms = _stage_latency(run, chain, trunk, stats, args)
  val = early_exit.sweep(val_logits, val_labels, temps, score, grids)
  test = {t: (f, e) for t, f, e in early_exit.sweep(test_logits, test_labels, temps, score,
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
  front = [rows[i] for i in evaluation.pareto_front([(r['mean_flops_val'], r['top1_error_val'])
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
  cascade = early_exit.Cascade(chosen['chain'], chosen['thresholds_t'], chosen['temps'], score,
                               chosen['trunk_mode'])
  summary = early_exit.to_json(
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
  order = evaluation.pareto_front([(sizes[d], static[d]['validation']) for d in static_depths])
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
