"""A preset study's report, generated from its run records alone.

``python -m ddnn_jax.study --preset fmnist20k --report`` writes, into the record folder,
``README.md`` (status, the results in the paper's layout with n per cell, the paired
differences with 95% intervals, one sentence per claim, the screen and the setting it
chose, the diagnosis, the convergence check, where the runs ran), the figures
(``comparison.png``, ``differences.png``, ``curves.png``, ``diagnosis.png``,
``screen.png``) and the comparison's CSVs; and it rewrites the block between
``<!-- study:NAME:begin -->`` and ``<!-- study:NAME:end -->`` in the repository's
``README.md``. Nothing in it is typed in: every figure comes from the records.
"""

from __future__ import annotations

import collections
import json
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ddnn_jax.core import file_io
from ddnn_jax.nn import notation
from ddnn_jax.studies import comparison, paper, plans, records, stats

# The paired differences the report gives, the chosen setting's added when there is one.
CORE_DIFFS = (('ekd', 'individual'), ('ekd', 'ddnn'))
README = 'README.md'


def _metrics(run_dir: str) -> list[dict[str, Any]]:
  path = os.path.join(run_dir, records.METRICS_FILE)
  if not os.path.isfile(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def _config(run_dir: str) -> dict[str, Any]:
  with open(os.path.join(run_dir, 'config.json'), encoding='utf-8') as f:
    return json.load(f)


def _epochs(run_dir: str) -> int:
  return _config(run_dir)['train']['num_epochs']


class Study:
  """The records of one preset study, sorted into its parts."""

  def __init__(self, preset: plans.Preset, record: str, depths: Sequence[notation.Depth]):
    self.preset, self.record, self.depths = preset, record, tuple(depths)
    self.found = records.read_all(record)
    self.dirs = {name: records.run_dir(record, name) for name in self.found}
    self.planned, self.waiting = preset.plan(depths, record)
    regime = {_epochs(d) for n, d in self.dirs.items() if n.startswith(('ekd-seed', 'ddnn-seed'))}
    self.epochs = min(regime) if regime else None
    self.screen = [n for n in self.found if n.startswith('screen-')]
    self.convergence = [n for n in self.found if re.search(r'-e\d+-seed\d+$', n)]
    self.core = [n for n in self.found if n not in self.screen and n not in self.convergence]
    settings = plans.screen_results(record)
    self.settings = settings
    self.chosen = None if settings is None else plans.choose_setting(settings)

  def left(self) -> list[str]:
    return [r.name for r in self.planned if r.name not in self.found]

  def runs(self, names: Sequence[str], split: str = 'test') -> list[dict[str, Any]]:
    return [comparison.read_run(self.dirs[n], split) for n in names]


# --- the parts of the report --------------------------------------------------------------


def _status(study: Study) -> list[str]:
  left = study.left()
  seconds = [r['wall_seconds'] for r in study.found.values()]
  lines = [f'**{len(study.found)} runs recorded** ({sum(seconds) / 3600:.1f} run-hours), '
           f'{len(left)} planned runs left' + (f': {", ".join(left)}.' if left else '.')]
  lines += [f'Still to be decided: {w}.' for w in study.waiting]
  hours = _hours_left(study, left)
  if hours is not None:
    lines.append(f'At the wall times recorded so far, {_parallel(study)} runs at once, the '
                 f'planned runs left take about {hours:.1f} hours.')
  return lines


def _parallel(study: Study) -> int:
  counts = collections.Counter(len(r['machine'].get('cores') or []) for r in study.found.values())
  cores = counts.most_common(1)[0][0] if counts else 1
  total = max((r['machine'].get('cpu_count') or 1) for r in study.found.values())
  return max(1, total // max(cores, 1))


def _kind(name: str) -> tuple[str, int]:
  """'ekd_t4-e60-seed2' -> ('ekd_t4', 60): the run's kind, and its epochs where they are
  not the regime's (else 0)."""
  base = re.sub(r'-seed\d+$', '', name)
  longer = re.search(r'-e(\d+)$', base)
  return re.sub(r'-e\d+$', '', base), int(longer.group(1)) if longer else 0


def _hours_left(study: Study, left: Sequence[str]) -> float | None:
  """Expected hours of the runs ``left``: the mean recorded wall time of runs of the same
  kind (scheme and depth), scaled by epochs; a variant of EKD as EKD."""
  if not left or study.epochs is None:
    return None
  seconds: dict[str, list[float]] = collections.defaultdict(list)
  for name, record in study.found.items():
    kind, epochs = _kind(name)
    if name.startswith('screen-'):
      continue
    seconds[kind].append(record['wall_seconds'] * study.epochs / (epochs or study.epochs))
  total = 0.0
  for name in left:
    kind, epochs = _kind(name)
    same = seconds.get(kind) or seconds.get(kind.split('_')[0]) or seconds.get('ekd')
    if not same:
      return None
    total += statistics.fmean(same) * (epochs or study.epochs) / study.epochs
  return total / _parallel(study) / 3600


def _machines(study: Study, names: Sequence[str]) -> list[str]:
  lines = collections.Counter(records.machine_line(study.found[n]) for n in names)
  return [f'{line}: {count} runs' for line, count in sorted(lines.items())]


def _claim(diff: stats.Difference | None, what: str, *, margin: float | None = None) -> str:
  """One sentence: shown, not shown or reversed, with n, the difference and its interval."""
  if diff is None:
    return f'{what}: no paired runs yet.'
  if diff.low is None:
    return (f'{what}: n = 1 so far, difference {diff.mean:+.2f} pt; no interval yet (needs '
            'two paired seeds).')
  text = f'{diff.mean:+.2f} pt, 95% interval [{diff.low:+.2f}, {diff.high:+.2f}], n = {diff.n}'
  if margin is None:  # Lower is better: the claim is a < b.
    verdict = ('shown' if diff.high < 0 else 'reversed' if diff.low > 0 else
               'not shown (the interval contains zero)')
  else:  # Non-inferiority: a is not worse than b by more than the margin.
    verdict = ('shown (the interval stays below the margin)' if diff.high < margin else
               'reversed (worse beyond the margin)' if diff.low > margin else
               'not shown (the interval reaches past the margin)')
  return f'{what}: **{verdict}** ({text}).'


def _claims(study: Study, result: comparison.Comparison) -> list[str]:
  full = study.depths[0]
  subnets = study.depths[1:]
  name = notation.format_depth
  lines = []
  for depth in subnets:
    lines.append('- ' + _claim(result.diffs.get((depth, 'ekd', 'individual')),
                               f'EKD sub-net {name(depth)} beats the same net trained alone '
                               '(EKD − individual < 0)'))
  lines.append('- ' + _claim(result.diffs.get((full, 'ekd', 'individual')),
                             f'The full net {name(full)} keeps its accuracy under EKD '
                             f'(EKD − individual below +{plans.KEEP_MARGIN:g} pt)',
                             margin=plans.KEEP_MARGIN))
  for depth in study.depths:
    lines.append('- ' + _claim(result.diffs.get((depth, 'ekd', 'ddnn')),
                               f'EKD beats DDNN at {name(depth)} (EKD − DDNN < 0)'))
  if study.chosen and study.chosen != plans.SHIPPED:
    chosen = {d: result.diffs.get((d, study.chosen, 'individual')) for d in study.depths}
    if not any(chosen.values()):
      lines.append(f'- The validation-chosen setting {study.chosen} against individual '
                   'training: no paired runs yet.')
    for depth, diff in chosen.items() if any(chosen.values()) else ():
      lines.append('- ' + _claim(diff, f'The validation-chosen setting {study.chosen} beats '
                                 f'individual training at {name(depth)}'))
  return lines


def _diagnosis_sentence(study: Study) -> str:
  """The diagnosis in one paragraph: which term pulls most, and what the screen chose."""
  name = _diagnosis_run(study)
  pulls = _pulls(study.dirs[name]) if name else None
  if pulls is None:
    return ''
  ce, kl, att = _shares(pulls[1])
  text = (f'Diagnosis (`{name}`): the cross-entropy terms dominate the pull on the parameters '
          f'all depths share; the KL terms add {kl:.0%} of it and the attention terms '
          f'{att:.0%}.')
  if study.settings and study.chosen:
    shipped, chosen = study.settings[plans.SHIPPED], study.settings[study.chosen]
    text += (f' The validation screen chose `{study.chosen}`: mean sub-net validation error '
             f'{chosen.subnet_error:.2f}% against {shipped.subnet_error:.2f}% as shipped, full '
             f'net {chosen.full_error:.2f}% against {shipped.full_error:.2f}%')
    screen = [_pulls(study.dirs[plans.screen_name(label)]) for label in
              (plans.SHIPPED, study.chosen)]
    if all(screen) and study.chosen != plans.SHIPPED:
      text += (f'; its KL terms pull {_shares(screen[1][1])[1]:.0%} of the CE terms\' against '
               f'{_shares(screen[0][1])[1]:.0%} as shipped')
    text += '.'
  return text


def _screen(study: Study) -> tuple[list[str], bytes | None]:
  done = len(study.screen)
  if study.settings is None:
    return [f'{done} of {len(plans.SCREEN)} screen runs recorded; the choice waits for '
            'all of them.'], None
  ddnn_run = comparison.read_run(study.dirs[plans.screen_name('ddnn')], 'validation')
  ddnn_rows = sorted(ddnn_run['rows'], key=lambda r: -r['flops'])
  lines = [f'Validation error (%, 5,000 held-out images) after {plans.SCREEN_EPOCHS} '
           'epochs, seed 0. Eligible: the full net is not worse than EKD as shipped by more '
           f'than {plans.FULL_NET_TOLERANCE:g} pt.', '',
           '| setting | full net | mean of the sub-nets | eligible |', '|---|---|---|---|']
  for s in study.settings.values():
    mark = ' (chosen)' if s.label == study.chosen else ''
    lines.append(f'| {s.label}{mark} | {s.full_error:.2f} | {s.subnet_error:.2f} | '
                 f'{"yes" if s.eligible else "no"} |')
  ddnn_sub = statistics.fmean(r['error'] for r in ddnn_rows[1:])
  lines.append(f'| ddnn (reference) | {ddnn_rows[0]["error"]:.2f} | {ddnn_sub:.2f} | - |')
  chosen = study.settings[study.chosen]
  shipped = study.settings[plans.SHIPPED]
  if study.chosen == plans.SHIPPED:
    why = ('EKD as shipped stays: no eligible setting has lower mean sub-net error '
           f'({shipped.subnet_error:.2f}%).')
  else:
    why = (f'Chosen: **{study.chosen}**, mean sub-net error {chosen.subnet_error:.2f}% '
           f'against {shipped.subnet_error:.2f}% as shipped, full net {chosen.full_error:.2f}% '
           f'against {shipped.full_error:.2f}%. One seed at 10 epochs: a screen, '
           'not a result; the seeds below test it.')
  lines += ['', why]
  fig, canvas = file_io.new_figure((7.0, 4.0))
  ax = fig.add_subplot()
  labels = [*study.settings, 'ddnn']
  full = [study.settings[k].full_error for k in study.settings] + [ddnn_rows[0]['error']]
  sub = [study.settings[k].subnet_error for k in study.settings] + [ddnn_sub]
  x = np.arange(len(labels))
  ax.bar(x - 0.2, full, 0.4, label='full net')
  ax.bar(x + 0.2, sub, 0.4, label='mean of the sub-nets')
  ax.set_xticks(x, labels, rotation=30, fontsize=8)
  ax.set_ylabel('validation error (%)')
  low, high = min(full + sub), max(full + sub)
  ax.set_ylim(max(0, low - 0.5 * (high - low + 0.5)), high + 0.3 * (high - low + 0.5))
  ax.set_title(f'Screen: {plans.SCREEN_EPOCHS} epochs, seed 0', fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(True, axis='y', alpha=0.3)
  return lines, file_io.figure_png(fig, canvas)


def _diagnosis_run(study: Study) -> str | None:
  for name in ('ekd-seed0', plans.screen_name('ekd')):
    if name in study.found:
      return name
  return None


def _term_series(metrics: Sequence[Mapping[str, Any]], prefix: str) -> dict[str, list]:
  series: dict[str, list] = {}
  for line in metrics:
    for key, value in line.items():
      if key.startswith(prefix) and not key.endswith('/total'):
        series.setdefault(key[len(prefix):], []).append((line['step'], value))
  return series


def _pulls(run_dir: str) -> tuple[int, dict, dict] | None:
  """(diagnosis lines, mean norm per term on the shared parameters, mean weighted value per
  term) of a run that logged its term gradients, else None."""
  metrics = [m for m in _metrics(run_dir) if 'epoch' not in m]
  norms = _term_series(metrics, 'train/grad_norm_shared/')
  if not norms:
    return None
  terms = _term_series(metrics, 'train/term/')
  return (len(next(iter(norms.values()))),
          {k: statistics.fmean(v for _, v in s) for k, s in norms.items()},
          {k: statistics.fmean(v for _, v in s) for k, s in terms.items()})


def _shares(mean_norm: Mapping[str, float]) -> tuple[float, float, float]:
  """The CE terms' summed pull, and the KL and attention terms' as fractions of it."""
  by_kind = collections.defaultdict(float)
  for key, value in mean_norm.items():
    by_kind[key.split('/')[0]] += value
  ce = by_kind.get('ce', 0.0)
  return ce, by_kind.get('kl', 0.0) / ce, by_kind.get('attention', 0.0) / ce


def _diagnosis(study: Study) -> tuple[list[str], bytes | None]:
  name = _diagnosis_run(study)
  if name is None:
    return ['No EKD run recorded yet.'], None
  pulls = _pulls(study.dirs[name])
  if pulls is None:
    return [f'{name} logged no term gradients.'], None
  count, mean_norm, mean_term = pulls
  ranked = sorted(mean_norm, key=mean_norm.get, reverse=True)
  lines = [f'From `{name}` ({count} diagnosed steps; every term as weighted in the loss). The '
           'gradient norm is taken on the parameters every depth shares (the smallest '
           'sub-net\'s), where all terms pull on the same weights.', '',
           '| term | mean weighted value | mean gradient norm (shared parameters) |',
           '|---|---|---|']
  for key in ranked:
    lines.append(f'| {key} | {mean_term.get(key, float("nan")):.4f} | {mean_norm[key]:.4f} |')
  ce, kl, att = _shares(mean_norm)
  verdict = (': the distillation is a small correction to the hard labels' if kl + att < 0.5
             else '')
  lines += ['', f'The largest pull is `{ranked[0]}`. Summed over depths, the cross-entropy '
            f'terms\' gradient norms are {ce:.3f}; the KL terms pull {kl:.0%} of that and the '
            f'attention terms {att:.0%}{verdict}.']
  lines += _screen_pulls(study)
  series = [(_term_series([m for m in _metrics(study.dirs[name]) if 'epoch' not in m], prefix),
             title) for prefix, title in (('train/term/', 'weighted term'),
                                          ('train/grad_norm_shared/',
                                           'gradient norm, shared parameters'))]
  fig, canvas = file_io.new_figure((10.0, 4.0))
  for i, (curves, title) in enumerate(series):
    ax = fig.add_subplot(1, 2, i + 1)
    for key in sorted(curves):
      steps, values = zip(*curves[key])
      style = {'ce': '-', 'kl': '--', 'attention': ':'}[key.split('/')[0]]
      ax.plot(steps, values, style, label=key, lw=1.2)
    ax.set_yscale('log')
    ax.set_xlabel('step')
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.suptitle(f'Loss terms over {name}', fontsize=10)
  return lines, file_io.figure_png(fig, canvas)


def _screen_pulls(study: Study) -> list[str]:
  """How the screen's settings moved the distillation terms' pull against the CE terms'."""
  rows = []
  for label in plans.SCREEN:
    name = plans.screen_name(label)
    pulls = _pulls(study.dirs[name]) if name in study.found else None
    if pulls is not None:
      ce, kl, att = _shares(pulls[1])
      mark = ' (chosen)' if label == study.chosen else ''
      rows.append(f'| {label}{mark} | {ce:.3f} | {kl:.0%} | {att:.0%} |')
  if len(rows) < 2:
    return []
  return ['', 'The same on the screen\'s runs (10 epochs): the CE terms\' summed pull on the '
          'shared parameters, and the KL and attention terms\' as a fraction of it.', '',
          '| setting | CE | KL / CE | attention / CE |', '|---|---|---|---|', *rows]


def _convergence(study: Study) -> list[str]:
  if not study.convergence:
    return ['Not recorded yet.']
  lines = ['| run | depth | validation error, 30 epochs | longer | difference |',
           '|---|---|---|---|---|']
  verdicts = []
  for name in study.convergence:
    twin = re.sub(r'-e\d+(-seed\d+)$', r'\1', name)
    if twin not in study.found:
      lines.append(f'| {name} | - | (its twin {twin} not recorded yet) | | |')
      continue
    longer = {r['depth']: r['error'] for r in study.runs([name], 'validation')[0]['rows']}
    base = {r['depth']: r['error'] for r in study.runs([twin], 'validation')[0]['rows']}
    epochs = _epochs(study.dirs[name])
    for depth in sorted(longer, key=lambda d: -sum(d)):
      delta = longer[depth] - base[depth]
      verdicts.append(abs(delta) <= 0.2)
      lines.append(f'| {name} ({epochs} epochs) | {notation.format_depth(depth)} | '
                   f'{base[depth]:.2f} | {longer[depth]:.2f} | {delta:+.2f} |')
  if verdicts:
    lines += ['', 'Every depth within 0.2 pt of its 30-epoch twin: the regime has converged.'
              if all(verdicts) else
              '**Not every depth is within 0.2 pt of its 30-epoch twin**: the 30-epoch '
              'regime has not converged; more epochs are needed before the seeds count.']
  return lines


def _curves(study: Study, names: Sequence[str]) -> bytes | None:
  """Validation error over epochs, per depth (panels) and scheme (mean over seeds)."""
  curves: dict[tuple[str, notation.Depth], dict[float, list[float]]] = collections.defaultdict(
      lambda: collections.defaultdict(list))
  for name in names:
    run = study.runs([name])[0]
    for line in _metrics(study.dirs[name]):
      if 'epoch' not in line:
        continue
      for key, value in line.items():
        if key.startswith('val/accuracy/'):
          depth = notation.parse_depth(key.split('/', 2)[2])
          curves[run['mode'], depth][line['epoch']].append(100 * (1 - value))
  if not curves:
    return None
  fig, canvas = file_io.new_figure((4.0 * len(study.depths), 3.6))
  for i, depth in enumerate(study.depths):
    ax = fig.add_subplot(1, len(study.depths), i + 1)
    for (scheme, d), points in sorted(curves.items(), key=lambda kv: kv[0][0]):
      if d != depth:
        continue
      epochs = sorted(points)
      ax.plot(epochs, [statistics.fmean(points[e]) for e in epochs], label=scheme, lw=1.2)
    ax.set_title(notation.format_depth(depth), fontsize=10)
    ax.set_xlabel('epoch')
    if i == 0:
      ax.set_ylabel('validation error (%), mean over seeds')
    ax.set_ylim(top=min(30.0, ax.get_ylim()[1]))
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  return file_io.figure_png(fig, canvas)


def build(study: Study) -> tuple[str, str, dict[str, bytes]]:
  """(the folder's README.md, the block for the repository's README, figures and CSVs)."""
  files: dict[str, bytes] = {}
  preset = study.preset
  core_runs = study.runs(study.core) if study.core else []
  diffs = list(CORE_DIFFS)
  if study.chosen and study.chosen != plans.SHIPPED:
    diffs.append((study.chosen, 'individual'))
  result = None
  if core_runs:
    reference = paper.nearest(core_runs[0]['arch'], study.depths, 'cifar10')
    result = comparison.compare(core_runs, diffs, 'test', reference, nearest=False,
                                title=f'{preset.name}: {len(core_runs)} runs, '
                                f'{study.epochs} epochs')
    files.update({k: v for k, v in result.files.items() if k != 'comparison.md'})
  screen_lines, screen_png = _screen(study)
  diagnosis_lines, diagnosis_png = _diagnosis(study)
  curves_png = _curves(study, study.core)
  for name, png in (('screen.png', screen_png), ('diagnosis.png', diagnosis_png),
                    ('curves.png', curves_png)):
    if png is not None:
      files[name] = png
  command = f'python -m ddnn_jax.study --preset {preset.name}'
  status = _status(study)
  incomplete = bool(study.left() or study.waiting)
  n_so_far = ' (n so far; the study is still running)' if incomplete else ''
  table = result.markdown.split('\n', 2)[2].strip() if result else 'No runs of the regime yet.'
  claims = _claims(study, result) if result else []
  machines = _machines(study, list(study.found))
  paired_machines = _paired_machine_note(study, study.core)
  doc = [f'# Study `{preset.name}`: {preset.description}', '',
         f'Config: `{preset.config}` (Fashion-MNIST, 20,000 training images, 5,000 held out '
         'for validation, ResNet-20 width 16 with sub-nets 2-2-2 and 1-1-1). Continue the '
         f'study with `{command} --hours H`; regenerate this page and the README\'s Results '
         f'from the records alone with `{command} --report`. Each run\'s record is in '
         '`runs/<run>/` (config, results, evaluation metrics, command, wall time, machine).',
         '', '## Status', '', *status, '', f'## Results: test error (%){n_so_far}', '',
         table, '', '## The claims', '', *(claims or ['No paired runs yet.']), '',
         '![errors](comparison.png)' if 'comparison.png' in files else '',
         '![differences](differences.png)' if 'differences.png' in files else '',
         '', '## Validation curves', '',
         '![curves](curves.png)' if curves_png else 'No curves yet.', '',
         '## Screen: the EKD setting chosen on validation', '', *screen_lines, '',
         '![screen](screen.png)' if screen_png else '', '',
         '## Diagnosis: which term drives training', '', *diagnosis_lines, '',
         '![diagnosis](diagnosis.png)' if diagnosis_png else '', '',
         '## Convergence check', '', *_convergence(study), '',
         '## Where the runs ran', '', *(f'- {m}' for m in machines), *paired_machines, '']
  # The README's block: the tables without their explanations (the details page has
  # them), the claims, and where the study stands in one line.
  short = '\n'.join(line for line in table.splitlines()
                    if not line.startswith(('Top-1 test error', 'Paired differences')))
  left = study.left()
  hours = _hours_left(study, left)
  standing = (f'{len(study.found)} runs recorded, {len(left)} planned runs left'
              + (f' (about {hours:.1f} hours, {_parallel(study)} at once)' if hours else '')
              + ''.join(f'; still to be decided: {w}' for w in study.waiting) + '.')
  block = [f'Study `{preset.name}` ([details]({os.path.join(preset.record, README)})): test '
           f'error (%), mean ± std over n seeds{n_so_far}; bold where paired 95% intervals '
           'support it. Paired differences: mean [95% t-interval] (n).', '',
           short.replace('\n\n\n', '\n\n').strip(), '', *claims, '',
           _diagnosis_sentence(study), '', standing, '']
  return '\n'.join(doc).replace('\n\n\n', '\n\n'), '\n'.join(block), files


def _paired_machine_note(study: Study, names: Sequence[str]) -> list[str]:
  lines = {records.machine_line(study.found[n]).rsplit(',', 1)[0] for n in names}
  if len(lines) > 1:
    return ['', 'The paired runs ran on different CPUs: oneDNN\'s kernels for each round '
            'float32 differently, which adds to the seed-to-seed spread.']
  return []


def rewrite_block(text: str, name: str, block: str) -> str | None:
  """``text`` with the lines between the study's markers replaced; None without markers."""
  begin, end = f'<!-- study:{name}:begin -->', f'<!-- study:{name}:end -->'
  if begin not in text or end not in text:
    return None
  head, rest = text.split(begin, 1)
  _, tail = rest.split(end, 1)
  return f'{head}{begin}\n{block.strip()}\n{end}{tail}'


def main_report(preset: plans.Preset, record: str, depths: Sequence[notation.Depth],
                readme: str = README) -> list[str]:
  """Writes the report; returns the paths written."""
  study = Study(preset, record, depths)
  doc, block, files = build(study)
  os.makedirs(record, exist_ok=True)
  written = []
  for name, content in {README: doc.encode(), **files}.items():
    path = os.path.join(record, name)
    file_io.atomic_write(path, content)
    written.append(path)
  if os.path.isfile(readme):
    with open(readme, encoding='utf-8') as f:
      text = rewrite_block(f.read(), preset.name, block)
    if text is not None:
      file_io.atomic_write(readme, text.encode())
      written.append(readme)
  return written
