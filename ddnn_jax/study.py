r"""A study: one config trained in several schemes and seeds, resumable, recorded, compared.

  python -m ddnn_jax.study --preset fmnist20k [--hours 6 | --until 18:30]
  python -m ddnn_jax.study --config configs/default.py --root DIR \
      [--schemes individual,ddnn,ekd,ipkd:2] [--seeds 3] [--record DIR] \
      [--hours H | --until HH:MM] [--parallel N] [--detach | --status | --dry_run | --report] \
      [--nice 10] [--config.KEY=VALUE ...] [-- EXTRA_MAIN_FLAGS ...]

Every run is ``python -m ddnn_jax.main`` in its own workdir under ``--root``:
``individual-<depth>-seed<k>`` (each depth of the config trained alone) and
``<scheme>-seed<k>`` (every depth at once), ordered seed by seed so that the first seeds
of every scheme finish first. ``SCHEME:N`` gives one scheme N seeds instead of
``--seeds``. ``--preset NAME`` trains a named study instead (``ddnn_jax.studies.plans``:
its config, its runs in stages, its record folder): ``fmnist20k`` is the evidence study
of the EKD claim.

The same command continues a study: finished runs are skipped, stopped ones resume
from their last checkpoint. With ``--record DIR`` every finished run leaves its record
in ``DIR/runs/<run>/`` (``ddnn_jax.studies.records``: config, results, evaluation metrics, the
command, its wall time and where it ran; tens of kilobytes, meant to be committed); a
run with a record counts as finished even when its workdir is gone.

``--hours H`` / ``--until HH:MM`` fit the study to the time there is: a run starts only
when its expected time (from the records or earlier runs of its scheme and budget on as
many cores, else from a measured step time) fits what is left, and at the deadline the
runs in flight stop cleanly (they save; a later study resumes them while their workdirs
exist) and the study exits with 75. ``--parallel N`` trains N runs at once, each pinned
to its share of the cores (default 2 where there are 2 cores or more: more runs per
hour than one run on every core, ``bench/study_parallel.py``).

Each run logs to ``ROOT/logs/<run>.log``; ``ROOT/study.json`` records every run's
command and outcome. SIGTERM or Ctrl-C stops the runs in flight after their current
step (they save) and ends the study with exit code 75. At the end the finished runs are
compared (``python -m ddnn_jax.compare``, in ``ROOT/comparison/``); a preset writes its
report instead (``--report`` rewrites it from the records alone).

``--detach`` starts the study in the background (its own session, output in
``ROOT/study.log``) and returns; ``--status`` shows where each run stands.

Writes: ``ROOT/<run>/`` (workdirs), ``ROOT/logs/``, ``ROOT/study.json``,
``ROOT/comparison/``; with ``--record``, ``DIR/runs/<run>/``; a preset's report in its
record folder.

Exit codes: 0 every run finished; 2 bad input (or a run refused its config: see its
log); 3 a run diverged (the others ran); 75 stopped by a signal or the deadline, or runs
left that did not fit; 1 a run crashed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence

from ddnn_jax import cli
from ddnn_jax.core import errors
from ddnn_jax.studies import plans, runner

DEFAULT_SCHEMES = 'individual,ddnn,ekd'


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
  """(the study's own flags, --config.* overrides, everything after '--')."""
  own, overrides, extra = [], [], []
  argv = list(argv)
  if '--' in argv:
    extra = argv[argv.index('--') + 1:]
    argv = argv[:argv.index('--')]
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config.'):
      if '=' not in arg:
        if i + 1 >= len(argv) or argv[i + 1].startswith('--'):
          raise errors.UsageError(f'override {arg} needs a value')
        arg, i = f'{arg}={argv[i + 1]}', i + 1
      overrides.append(arg)
    else:
      own.append(arg)
    i += 1
  return own, overrides, extra


def build_parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(prog='python -m ddnn_jax.study', doc=__doc__,
                              example='python -m ddnn_jax.study --preset fmnist20k --hours 6')
  parser.add_argument('--preset', choices=tuple(plans.PRESETS),
                      help='a named study: its config, runs and record folder (e.g. '
                      'fmnist20k); instead of --config/--schemes/--seeds')
  parser.add_argument('--config', help='config file, e.g. configs/cifar10.py:r56_r44')
  parser.add_argument('--root', help='parent of the run workdirs (a preset: '
                      '~/ddnn_jax_studies/NAME)')
  parser.add_argument('--record', help="folder for the finished runs' records (DIR/runs/<run>/; "
                      "a preset: its own folder under docs/studies/)")
  parser.add_argument('--schemes', default=None,
                      help='modes, comma-separated; SCHEME:N gives that scheme N seeds '
                      f'(default: {DEFAULT_SCHEMES})')
  parser.add_argument('--seeds', type=cli.positive_int, default=None,
                      help='seeds 0..N-1 of every scheme without its own count (default: 3)')
  parser.add_argument('--parallel', type=cli.positive_int, default=None,
                      help='runs at once, each pinned to its share of the cores (default: '
                      f'{runner.default_parallel()} here)')
  when = parser.add_mutually_exclusive_group()
  when.add_argument('--hours', type=cli.positive_float,
                    help='time the study may take: start only runs that fit, stop the rest '
                    'at the end (they save)')
  when.add_argument('--until', metavar='HH:MM', help='the same, up to a time of day')
  parser.add_argument('--nice', type=int, default=0, help='niceness of the training runs '
                      '(default: 0)')
  parser.add_argument('--python', default=sys.executable, help='python that runs the jobs '
                      '(default: this one)')
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument('--detach', action='store_true', help='run in the background and return')
  mode.add_argument('--status', action='store_true', help='show where each run stands')
  mode.add_argument('--dry_run', action='store_true',
                    help='print the commands, run nothing')
  mode.add_argument('--report', action='store_true',
                    help="a preset: rewrite its report from the records alone")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ['--probe']:
    return runner.probe(argv[1:])
  own, overrides, extra = split_argv(argv)
  args = build_parser().parse_args(own)
  if not 0 <= args.nice <= 19:
    raise errors.UsageError(f'--nice {args.nice}: must be in 0..19')
  preset = plans.PRESETS.get(args.preset)
  if preset is not None:
    for flag in ('config', 'schemes', 'seeds'):
      if getattr(args, flag) is not None:
        raise errors.UsageError(f'--preset {preset.name} sets the runs: drop --{flag}')
    spec = preset.config
    record = args.record or preset.record
    root = args.root or os.path.join(os.path.expanduser('~'), 'ddnn_jax_studies', preset.name)
  else:
    if args.config is None or args.root is None:
      raise errors.UsageError('give --preset NAME, or --config and --root')
    if args.report:
      raise errors.UsageError('--report rewrites a preset\'s report: give --preset NAME')
    spec, record, root = args.config, args.record, args.root
  root = os.path.abspath(root)
  if os.path.exists(root) and not os.path.isdir(root):
    raise errors.UsageError(f'--root {root} exists and is not a directory')
  if record is not None and os.path.exists(record) and not os.path.isdir(record):
    raise errors.UsageError(f'--record {record} exists and is not a directory')
  parallel = args.parallel or runner.default_parallel()
  slots = runner.core_slots(parallel)
  if parallel > 1 and not shutil.which('taskset'):
    raise errors.UsageError(f'--parallel {parallel} pins runs to cores with taskset, which is '
                            'not installed (util-linux)')
  deadline = runner.parse_deadline(args.hours, args.until)
  depths, has_subnets = runner.base_depths(spec, overrides)
  if preset is not None:
    plan = lambda: preset.plan(depths, record)  # noqa: E731
  else:
    fixed = plans.scheme_runs(depths, has_subnets, plans.parse_schemes(
        args.schemes or DEFAULT_SCHEMES, args.seeds or 3))
    plan = lambda: (fixed, [])  # noqa: E731
  planner = runner.Planner(spec, overrides, extra, args.python, root, plan)
  if args.report:
    return _report(preset, record, depths)
  runs, waiting = planner()
  if args.dry_run:
    for run in runs:
      print(' '.join(_quote(a) for a in [*runner.pin_prefix(None), *planner.argv(run)]))
    for line in waiting:
      print(f'# waiting: {line}')
    return 0
  if args.status:
    print(runner.format_status(runner.status_rows(planner, runs, record), waiting), end='')
    return 0
  if args.detach:
    holder = runner.lock_holder(root)
    if holder:
      raise errors.UsageError(f'--root {root} is in use by a live study ({holder})')
    runner.detach(argv, root)
    return 0
  header = {'config': spec, 'overrides': overrides, 'extra': extra,
            'preset': args.preset, 'schemes': args.schemes, 'seeds': args.seeds}

  def finish(finished: list[str]) -> int:
    if preset is not None:
      return _report(preset, record, depths)
    return subprocess.call([args.python, '-m', 'ddnn_jax.compare', *finished,
                            '--out', os.path.join(root, 'comparison')])

  return runner.run_study(planner, record=record, slots=slots, deadline=deadline, nice=args.nice,
                          header=header, finish=finish)


def _report(preset: plans.Preset, record: str, depths) -> int:
  from ddnn_jax.studies import report  # pylint: disable=g-import-not-at-top
  written = report.main_report(preset, record, depths)
  print(f'wrote {", ".join(written)}')
  return 0


def _quote(arg: str) -> str:
  import shlex  # pylint: disable=g-import-not-at-top
  return shlex.quote(arg)


if __name__ == '__main__':
  sys.exit(cli.run(main) or 0)