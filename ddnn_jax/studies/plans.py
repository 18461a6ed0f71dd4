"""Which runs a study trains, in which order: schemes × seeds, or a preset's staged plan.

A run is ``python -m ddnn_jax.main`` with its own ``--config.*`` flags in its own workdir.
A study of schemes (``--schemes individual,ddnn,ekd --seeds 3``) is fixed in advance. A
preset (``PRESETS``) is a plan in stages, some of which depend on what earlier stages
found: the study asks it again after every finished run, with the runs recorded so far
(``ddnn_jax.studies.records``), and it returns every run it can decide on now plus a line for
each stage still waiting.

The ``fmnist20k`` preset is the evidence study of the EKD claim (``configs/fmnist20k.py``):

1. the screen, on the validation split, 10 epochs, seed 0: EKD as shipped, ``loss.w`` 0.3
   and 3, ``loss.alpha`` 0 and 10, ``loss.temperature`` 4, ``ekd_no_ensemble``, DDNN;
2. seed 0 of every depth trained alone (individual), DDNN and EKD, 30 epochs;
3. the convergence check: EKD and the full net alone at 60 epochs, seed 0;
4. seeds 1-2 of individual, DDNN and EKD; the EKD setting the screen chose
   (``choose_setting``) at seeds 0-2 if it is not the shipped one; ``ekd_no_ensemble``
   at seeds 0-1;
5. seeds 3-4 of individual, DDNN and EKD if an interval of a claim still contains zero.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ddnn_jax.core import errors
from ddnn_jax.nn import notation
from ddnn_jax.studies import comparison, records, stats
from ddnn_jax.training import config_lib, losses


@dataclasses.dataclass(frozen=True)
class Run:
  name: str  # The workdir's (and the record's) name.
  mode: str
  seed: int
  overrides: tuple[str, ...]  # This run's own --config.* flags.
  label: str | None = None  # Its scheme in comparisons when not its mode (config.label).

  @property
  def scheme(self) -> str:
    return self.label or self.mode


def parse_schemes(text: str, seeds: int) -> list[tuple[str, int]]:
  """'individual,ekd:5' -> [('individual', seeds), ('ekd', 5)]."""
  schemes = []
  for item in text.split(','):
    mode, _, count = item.partition(':')
    if mode not in losses.MODES:
      raise errors.UsageError(f'--schemes: unknown scheme {mode!r}; choose from '
                              f'{", ".join(losses.MODES)}')
    if count and not (count.isdigit() and int(count) >= 1):
      raise errors.UsageError(f'--schemes: {item!r} needs a seed count >= 1 after the colon')
    if mode in (m for m, _ in schemes):
      raise errors.UsageError(f'--schemes: {mode!r} is given twice')
    schemes.append((mode, int(count) if count else seeds))
  return schemes


def individual_runs(depths: Sequence[notation.Depth], seed: int,
                    extra: tuple[str, ...] = (), suffix: str = '') -> list[Run]:
  """Each depth trained alone: the full net (no sub-nets), then each sub-net."""
  runs = []
  for k, depth in enumerate(depths):
    subnets = '()' if k == 0 else f'({tuple(depth)},)'
    runs.append(Run(f'individual-{notation.depth_name(depth)}{suffix}-seed{seed}', 'individual',
                    seed, ('--config.mode=individual', f'--config.model.subnets={subnets}',
                           f'--config.seed={seed}', *extra)))
  return runs


def variant_run(label: str, mode: str, seed: int, overrides: Sequence[str] = (),
                prefix: str = '', suffix: str = '') -> Run:
  """Every depth at once in ``mode``; a ``label`` other than the mode names a variant."""
  flags = (f'--config.mode={mode}', *(() if label == mode else (f'--config.label={label}',)),
           f'--config.seed={seed}', *overrides)
  return Run(f'{prefix}{label}{suffix}-seed{seed}', mode, seed, flags,
             None if label == mode else label)


def scheme_runs(depths: Sequence[notation.Depth], has_subnets: bool,
                schemes: Sequence[tuple[str, int]]) -> list[Run]:
  """A study of schemes, seed by seed, so that the first seeds of every scheme finish
  first: ``individual-<depth>-seed<k>`` and ``<scheme>-seed<k>``."""
  runs = []
  for seed in range(max(count for _, count in schemes)):
    for mode, count in schemes:
      if seed >= count:
        continue
      if mode == 'individual':
        runs += individual_runs(depths, seed)
      elif not has_subnets:
        raise errors.UsageError(f'--schemes: {mode!r} needs sub-nets, and the config has none')
      else:
        runs.append(variant_run(mode, mode, seed))
  return runs


# --- the fmnist20k evidence study -------------------------------------------------------

SCREEN_EPOCHS = 10
CONVERGENCE_EPOCHS = 60
# label -> (mode, overrides): the screen's settings, EKD as shipped first.
SCREEN = {
    'ekd': ('ekd', ()),
    'ekd_w0.3': ('ekd', ('--config.loss.w=0.3',)),
    'ekd_w3': ('ekd', ('--config.loss.w=3.0',)),
    'ekd_alpha0': ('ekd', ('--config.loss.alpha=0.0',)),
    'ekd_alpha10': ('ekd', ('--config.loss.alpha=10.0',)),
    'ekd_t4': ('ekd', ('--config.loss.temperature=4.0',)),
    'ekd_no_ensemble': ('ekd_no_ensemble', ()),
    'ddnn': ('ddnn', ()),
}
SHIPPED = 'ekd'
# The chosen setting's full net may be this much worse than the shipped one's (points).
FULL_NET_TOLERANCE = 0.1
CORE = ('individual', 'ddnn', 'ekd')
# A full net "keeps its accuracy" if EKD - individual stays below this (points, 95% upper).
KEEP_MARGIN = 0.2


def screen_name(label: str) -> str:
  return f'screen-{label}-seed0'


@dataclasses.dataclass(frozen=True)
class Setting:
  label: str
  full_error: float  # Validation error of the full net (%).
  subnet_error: float  # Mean validation error of the sub-nets (%).
  eligible: bool  # Full net within FULL_NET_TOLERANCE of the shipped setting's.


def screen_results(record_root: str) -> dict[str, Setting] | None:
  """The screen's EKD settings with their validation errors, or None until every
  screen run is recorded."""
  found = records.read_all(record_root)
  if any(screen_name(label) not in found for label in SCREEN):
    return None
  errors_by_label = {}
  for label in SCREEN:
    run = comparison.read_run(records.run_dir(record_root, screen_name(label)), 'validation')
    rows = run['rows']  # The full net first (most FLOPs).
    rows = sorted(rows, key=lambda r: -r['flops'])
    errors_by_label[label] = (rows[0]['error'], sum(r['error'] for r in rows[1:]) / (len(rows) - 1))
  shipped_full = errors_by_label[SHIPPED][0]
  return {label: Setting(label, full, sub, full <= shipped_full + FULL_NET_TOLERANCE + 1e-9)
          for label, (full, sub) in errors_by_label.items() if label != 'ddnn'}


def choose_setting(settings: Mapping[str, Setting]) -> str:
  """The EKD setting with the lowest mean sub-net validation error among those whose full
  net is not worse than the shipped one's by more than FULL_NET_TOLERANCE (the shipped
  one wins ties)."""
  eligible = [s for s in settings.values() if s.eligible]
  return min(eligible, key=lambda s: (s.subnet_error, s.label != SHIPPED)).label


def core_differences(record_root: str, names: Sequence[str]
                     ) -> dict[tuple[notation.Depth, str, str], stats.Difference]:
  """EKD - individual and EKD - DDNN per depth over the recorded runs ``names``."""
  runs = [comparison.read_run(records.run_dir(record_root, n)) for n in names]
  rows, _ = comparison.comparison(runs)
  return comparison.differences(rows, (('ekd', 'individual'), ('ekd', 'ddnn')))


def fmnist20k_plan(depths: Sequence[notation.Depth], record_root: str
                   ) -> tuple[list[Run], list[str]]:
  """The runs of the evidence study decided so far, in order, and the stages waiting."""
  found = records.read_all(record_root)
  epochs = lambda n: (f'--config.train.num_epochs={n}',)  # noqa: E731
  runs = [variant_run(label, mode, 0, (*overrides, *epochs(SCREEN_EPOCHS)), prefix='screen-')
          for label, (mode, overrides) in SCREEN.items()]
  waiting = []

  def core(seed: int) -> list[Run]:
    return [*individual_runs(depths, seed), variant_run('ddnn', 'ddnn', seed),
            variant_run('ekd', 'ekd', seed)]

  runs += core(0)
  runs += [variant_run('ekd', 'ekd', 0, epochs(CONVERGENCE_EPOCHS), suffix=f'-e{CONVERGENCE_EPOCHS}'),
           *individual_runs(depths[:1], 0, epochs(CONVERGENCE_EPOCHS),
                            suffix=f'-e{CONVERGENCE_EPOCHS}')]
  settings = screen_results(record_root)
  chosen = None if settings is None else choose_setting(settings)
  if chosen is None:
    done = sum(screen_name(label) in found for label in SCREEN)
    waiting.append(f'the validation-chosen EKD setting at seeds 0-2 waits for the screen '
                   f'({done} of {len(SCREEN)} runs recorded)')

  def chosen_run(seed: int) -> list[Run]:
    if chosen is None or chosen == SHIPPED:
      return []
    mode, overrides = SCREEN[chosen]
    return [variant_run(chosen, mode, seed, overrides)]

  no_ensemble = lambda seed: [variant_run('ekd_no_ensemble', 'ekd_no_ensemble', seed)]  # noqa: E731
  runs += [*core(1), *chosen_run(0), *no_ensemble(0),
           *core(2), *chosen_run(1), *no_ensemble(1), *chosen_run(2)]
  first_three = [r.name for seed in range(3) for r in core(seed)]
  if all(n in found for n in first_three):
    diffs = core_differences(record_root, first_three)
    if any(d.low is None or d.low <= 0 <= d.high for d in diffs.values()):
      runs += [*core(3), *core(4)]
  else:
    done = sum(n in found for n in first_three)
    waiting.append(f'seeds 3-4 of individual, ddnn and ekd (if an interval still contains '
                   f'zero) wait for their seeds 0-2 ({done} of {len(first_three)} recorded)')
  return runs, waiting


@dataclasses.dataclass(frozen=True)
class Preset:
  name: str
  config: str  # The --config of every run.
  record: str  # Where the runs' records go (relative to the repository root).
  plan: Callable[[Sequence[notation.Depth], str], tuple[list[Run], list[str]]]
  description: str


PRESETS = {
    'fmnist20k': Preset(
        'fmnist20k', 'configs/fmnist20k.py', os.path.join('docs', 'studies', 'fmnist20k'),
        fmnist20k_plan,
        'the EKD claim on 20,000 Fashion-MNIST images: screen, seeds, convergence check'),
}


def budget(config: Mapping[str, Any]) -> tuple[Any, ...]:
  """What a run's wall time depends on, from its config (a ``config.json`` dict): runs
  with the same budget take about the same time on the same cores."""
  def get(dotted: str) -> Any:
    try:
      return config_lib.get_field(config, dotted)
    except KeyError:  # Saved before the field existed.
      return None
  subnets = get('model.subnets')
  return (get('label') or get('mode'), str(subnets), get('model.arch'), get('model.width'),
          str(get('model.widths')), get('data.dataset'), get('data.train_subset'),
          get('data.validation_examples'), get('train.batch_size'), get('train.num_epochs'),
          get('train.term_gradients_every_steps'))
