r"""A study: one preset trained in several schemes and seeds, resumable, then compared.

  python -m ddnn_jax.study --config configs/default.py --root DIR \
      [--schemes individual,ddnn,ekd,ipkd:2] [--seeds 3] [--detach | --status | --dry-run] \
      [--nice 10] [--config.KEY=VALUE ...] [-- EXTRA_MAIN_FLAGS ...]

Every run is ``python -m ddnn_jax.main`` in its own workdir under ``--root``:
``individual-<depth>-seed<k>`` (each depth of the preset trained alone) and
``<scheme>-seed<k>`` (every depth at once), ordered seed by seed so that the first seeds
of every scheme finish first. ``SCHEME:N`` gives one scheme N seeds instead of
``--seeds``. The same command continues a study: finished runs are skipped, stopped
ones resume from their last checkpoint. Each run logs to ``ROOT/logs/<run>.log``;
``ROOT/study.json`` records every run's command and outcome. SIGTERM or Ctrl-C stops
the run in flight after its current step (it saves) and ends the study with exit code
75. At the end ``python -m ddnn_jax.compare`` lays out every finished run in
``ROOT/comparison/``.

``--detach`` starts the study in the background (its own session, output in
``ROOT/study.log``) and returns; ``--status`` shows where each run stands.

Exit codes: 0 every run finished; 2 bad input (or a run refused its config: see its
log); 3 a run diverged (the others ran); 75 stopped by a signal; 1 a run crashed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from ddnn_jax import cli, errors, losses

MANIFEST = 'study.json'
LOCK = '.study.lock'
DEFAULT_SCHEMES = 'individual,ddnn,ekd'
EXIT_STOPPED, EXIT_DIVERGED, EXIT_USAGE = 75, 3, 2


@dataclasses.dataclass(frozen=True)
class Run:
  name: str  # The workdir's name under the root.
  mode: str
  seed: int
  overrides: tuple[str, ...]  # This run's own --config.* flags.


def parse_schemes(text: str, seeds: int) -> list[tuple[str, int]]:
  """'individual,ekd:5' -> [('individual', seeds), ('ekd', 5)]."""
  schemes = []
  for item in text.split(','):
    mode, _, count = item.partition(':')
    if mode not in losses.MODES:
      raise cli.UsageError(f'--schemes: unknown scheme {mode!r}; choose from '
                           f'{", ".join(losses.MODES)}')
    if count and not (count.isdigit() and int(count) >= 1):
      raise cli.UsageError(f'--schemes: {item!r} needs a seed count >= 1 after the colon')
    if mode in (m for m, _ in schemes):
      raise cli.UsageError(f'--schemes: {mode!r} is given twice')
    schemes.append((mode, int(count) if count else seeds))
  return schemes


def load_config(spec: str, overrides: Sequence[str]):
  """The config ``python -m ddnn_jax.main --config=SPEC OVERRIDES`` would train."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  values = flags.FlagValues()
  argv = ['study', f'--config={spec}', *overrides]
  # config_flags reads the overrides from sys_argv (default: sys.argv).
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  try:
    values(argv)
    return values.config
  except Exception as err:  # noqa: BLE001 - flag and config-file errors of every kind.
    raise cli.UsageError(cli.config_error_line(err)) from None


def plan(spec: str, schemes: Sequence[tuple[str, int]], overrides: Sequence[str]) -> list[Run]:
  """Every run of the study, in the order they train; each run's config validated."""
  from ddnn_jax import config_lib, models  # pylint: disable=g-import-not-at-top
  base = load_config(spec, overrides)
  base.mode = 'ddnn' if base.model.subnets else 'individual'
  try:
    config_lib.validate(base)
    depths = config_lib.depths_of(base)
  except errors.UsageError as err:
    raise cli.UsageError(f'--config {spec}: {err}') from None
  runs = []
  for seed in range(max(count for _, count in schemes)):
    for mode, count in schemes:
      if seed >= count:
        continue
      if mode == 'individual':
        for k, depth in enumerate(depths):
          subnets = '()' if k == 0 else f'({tuple(depth)},)'
          runs.append(Run(f'individual-{models.depth_name(depth)}-seed{seed}', mode, seed,
                          ('--config.mode=individual', f'--config.model.subnets={subnets}',
                           f'--config.seed={seed}')))
      else:
        if not base.model.subnets:
          raise cli.UsageError(f'--schemes: {mode!r} needs sub-nets, and --config {spec} has none')
        runs.append(Run(f'{mode}-seed{seed}', mode, seed,
                        (f'--config.mode={mode}', f'--config.seed={seed}')))
  for run in runs:  # Every run's own config is valid too (e.g. the mode with the loss weights).
    try:
      config_lib.validate(load_config(spec, [*overrides, *run.overrides]))
    except errors.UsageError as err:
      raise cli.UsageError(f'run {run.name}: {err}') from None
  return runs


def main_argv(python: str, spec: str, root: str, run: Run, overrides: Sequence[str],
              extra: Sequence[str]) -> list[str]:
  return [python, '-m', 'ddnn_jax.main', f'--config={spec}',
          f'--workdir={os.path.join(root, run.name)}', *run.overrides, *overrides, *extra]


# --- what is on disk ----------------------------------------------------------------------


def read_manifest(root: str) -> dict[str, Any]:
  try:
    with open(os.path.join(root, MANIFEST), encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    return {'runs': {}}
  except (OSError, ValueError) as err:
    raise cli.UsageError(f'cannot read {os.path.join(root, MANIFEST)}: {err}') from None


def write_manifest(root: str, manifest: dict[str, Any]) -> None:
  from ddnn_jax import reporting  # pylint: disable=g-import-not-at-top
  reporting.atomic_write(os.path.join(root, MANIFEST),
                         (json.dumps(manifest, indent=2) + '\n').encode())


def is_finished(root: str, run: Run, argv: Sequence[str], manifest: dict[str, Any]) -> bool:
  """Finished with this very command (a changed command runs again: main resumes)."""
  entry = manifest['runs'].get(run.name, {})
  return (entry.get('status') == 'finished' and entry.get('argv') == list(argv[1:])
          and os.path.isfile(os.path.join(root, run.name, 'results.csv')))


def latest_step(workdir: str) -> int | None:
  try:
    steps = [int(p) for p in os.listdir(os.path.join(workdir, 'checkpoints')) if p.isdigit()]
  except FileNotFoundError:
    return None
  return max(steps, default=None)


def last_epoch(workdir: str) -> float | None:
  """The epoch of the run's last evaluation (metrics.jsonl), or None."""
  try:
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
      epochs = [json.loads(line).get('epoch') for line in f if '"epoch"' in line]
  except (FileNotFoundError, ValueError):
    return None
  return max((e for e in epochs if e is not None), default=None)


def status_rows(root: str, runs: Sequence[Run], argvs: Sequence[Sequence[str]]
                ) -> list[dict[str, Any]]:
  manifest = read_manifest(root)
  rows = []
  for run, argv in zip(runs, argvs, strict=True):
    workdir = os.path.join(root, run.name)
    entry = manifest['runs'].get(run.name, {})
    if is_finished(root, run, argv, manifest):
      status = 'finished'
    elif entry.get('status') == 'running' and _lock_holder(workdir):
      status = 'running'
    elif entry and entry.get('argv') != list(argv[1:]):
      status = 'pending (command changed)'  # main resumes it with the new flags.
    elif entry:
      status = entry.get('status', 'unknown')
      status = 'stopped' if status == 'running' else status  # Its runner died.
    else:
      status = 'pending'
    rows.append({'run': run.name, 'status': status, 'step': latest_step(workdir),
                 'epoch': last_epoch(workdir), 'seconds': entry.get('seconds'),
                 'log': os.path.join(root, 'logs', f'{run.name}.log')})
  return rows


def _lock_holder(directory: str) -> str:
  """Who holds ``directory``'s lock file (a workdir's or the study's), '' if nobody."""
  import fcntl  # pylint: disable=g-import-not-at-top
  for name in ('.lock', LOCK):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      continue
    with open(path, 'rb') as f:
      try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
      except BlockingIOError:
        return f.read().decode(errors='replace').strip() or 'a live process'
  return ''


def format_status(rows: Sequence[dict[str, Any]]) -> str:
  lines = ['| run | status | checkpoint step | last eval epoch | minutes | log |',
           '|---|---|---|---|---|---|']
  for r in rows:
    minutes = '' if r['seconds'] is None else f'{r["seconds"] / 60:.1f}'
    epoch = '' if r['epoch'] is None else f'{r["epoch"]:g}'
    step = '' if r['step'] is None else str(r['step'])
    lines.append(f'| {r["run"]} | {r["status"]} | {step} | {epoch} | {minutes} | {r["log"]} |')
  counts = {}
  for r in rows:
    counts[r['status']] = counts.get(r['status'], 0) + 1
  return '\n'.join(lines) + '\n' + ', '.join(f'{n} {s}' for s, n in counts.items()) + '\n'


# --- running --------------------------------------------------------------------------------


class _Stop:
  """SIGTERM/SIGINT: forwarded once to the run in flight (which saves and exits 75)."""

  def __init__(self):
    self.requested: str | None = None
    self.child: subprocess.Popen | None = None

  def __call__(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signal.SIGTERM)


def _outcome(code: int) -> str:
  return {0: 'finished', EXIT_DIVERGED: 'diverged', EXIT_USAGE: 'refused',
          EXIT_STOPPED: 'stopped'}.get(code, 'stopped' if code < 0 else f'crashed (exit {code})')


def run_study(root: str, runs: Sequence[Run], argvs: Sequence[Sequence[str]], nice: int,
              compare_python: str, header: dict[str, Any]) -> int:
  """Runs every unfinished run in order, then compares the finished ones; the exit code."""
  from ddnn_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(root, 'logs'), exist_ok=True)
  stop = _Stop()
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, stop)
  worst = 0
  os.nice(nice)  # Inherited by every run (a preexec_fn would fork this jax process).
  with workdir_lib.lock(root, LOCK, what='study root', instead='--root'):
    manifest = read_manifest(root)
    manifest.update(header)
    for i, (run, argv) in enumerate(zip(runs, argvs, strict=True)):
      if stop.requested:
        break
      if is_finished(root, run, argv, manifest):
        print(f'[{i + 1}/{len(runs)}] {run.name}: finished, kept', flush=True)
        continue
      log_path = os.path.join(root, 'logs', f'{run.name}.log')
      print(f'[{i + 1}/{len(runs)}] {run.name}: training (log {log_path})', flush=True)
      start = time.time()
      previous = manifest['runs'].get(run.name, {})
      # Time spent before a stop counts when the same command resumes.
      earlier = previous.get('seconds', 0.0) if previous.get('argv') == list(argv[1:]) else 0.0
      manifest['runs'][run.name] = {'argv': list(argv[1:]), 'status': 'running',
                                    'started': time.strftime('%Y-%m-%d %H:%M:%S')}
      write_manifest(root, manifest)
      with open(log_path, 'ab') as log:
        log.write(f'\n$ {" ".join(argv)}\n'.encode())
        log.flush()
        # Its own session: a terminal's Ctrl-C reaches the study, which forwards it once.
        stop.child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        code = stop.child.wait()
        stop.child = None
      seconds = time.time() - start
      entry = manifest['runs'][run.name]
      entry.update(status=_outcome(code), exit_code=code,
                   seconds=round(seconds + earlier, 1))
      write_manifest(root, manifest)
      print(f'[{i + 1}/{len(runs)}] {run.name}: {entry["status"]} after {seconds / 60:.1f} min',
            flush=True)
      if code == EXIT_USAGE:
        print(f'error: run {run.name} refused its config: see {log_path}', file=sys.stderr)
        return EXIT_USAGE
      if code == EXIT_STOPPED or code < 0:
        stop.requested = stop.requested or 'the run itself'
        break
      if code != 0:
        worst = worst or (EXIT_DIVERGED if code == EXIT_DIVERGED else 1)
    if stop.requested:
      print(f'study stopped ({stop.requested}); the same command continues it', flush=True)
      return EXIT_STOPPED
    finished = [os.path.join(root, r.name) for r, a in zip(runs, argvs)
                if is_finished(root, r, a, manifest)]
  if finished:
    compare = [compare_python, '-m', 'ddnn_jax.compare', *finished,
               '--out', os.path.join(root, 'comparison')]
    code = subprocess.call(compare)
    worst = worst or (1 if code else 0)
  return worst


def detach(argv: Sequence[str], root: str) -> None:
  """Starts this study in the background, in its own session, and returns."""
  os.makedirs(root, exist_ok=True)
  log_path = os.path.join(root, 'study.log')
  rest = [a for a in argv if a != '--detach']
  with open(log_path, 'ab') as log:
    child = subprocess.Popen([sys.executable, '-m', 'ddnn_jax.study', *rest], stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, cwd=os.getcwd())
  print(f'study started in the background: pid {child.pid}\n'
        f'  follow:  tail -f {log_path}\n'
        f'  status:  python -m ddnn_jax.study {" ".join(rest)} --status\n'
        f'  stop:    kill {child.pid}   (the run in flight saves; the same command continues)')


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
          raise cli.UsageError(f'override {arg} needs a value')
        arg, i = f'{arg}={argv[i + 1]}', i + 1
      overrides.append(arg)
    else:
      own.append(arg)
    i += 1
  return own, overrides, extra


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  own, overrides, extra = split_argv(argv)
  parser = cli.ArgumentParser(prog='python -m ddnn_jax.study',
                              description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', required=True, help='config file, e.g. configs/cifar10.py:r56_r44')
  parser.add_argument('--root', required=True, help='parent of the run workdirs')
  parser.add_argument('--schemes', default=DEFAULT_SCHEMES,
                      help='modes, comma-separated; SCHEME:N gives that scheme N seeds '
                      f'(default: {DEFAULT_SCHEMES})')
  parser.add_argument('--seeds', type=cli.positive_int, default=3,
                      help='seeds 0..N-1 of every scheme without its own count (default: 3)')
  parser.add_argument('--nice', type=int, default=0, help='niceness of the training runs')
  parser.add_argument('--python', default=sys.executable, help='python that runs the jobs')
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument('--detach', action='store_true', help='run in the background and return')
  mode.add_argument('--status', action='store_true', help='show where each run stands')
  mode.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
  args = parser.parse_args(own)
  if not 0 <= args.nice <= 19:
    raise cli.UsageError(f'--nice {args.nice}: must be in 0..19')
  root = os.path.abspath(args.root)
  if os.path.exists(root) and not os.path.isdir(root):
    raise cli.UsageError(f'--root {args.root} exists and is not a directory')
  runs = plan(args.config, parse_schemes(args.schemes, args.seeds), overrides)
  argvs = [main_argv(args.python, args.config, root, run, overrides, extra) for run in runs]
  if args.dry_run:
    for argv_ in argvs:
      print(' '.join(_quote(a) for a in argv_))
    return 0
  if args.status:
    print(format_status(status_rows(root, runs, argvs)), end='')
    return 0
  if args.detach:
    if _lock_holder(root):
      raise cli.UsageError(f'--root {args.root} is in use by a live study ({_lock_holder(root)})')
    detach(argv, root)
    return 0
  header = {'config': args.config, 'overrides': overrides, 'extra': extra,
            'schemes': args.schemes, 'seeds': args.seeds}
  return run_study(root, runs, argvs, args.nice, args.python, header)


def _quote(arg: str) -> str:
  import shlex  # pylint: disable=g-import-not-at-top
  return shlex.quote(arg)


if __name__ == '__main__':
  sys.exit(cli.run(main) or 0)
