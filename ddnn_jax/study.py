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
``--seeds``. ``--preset NAME`` trains a named study instead (``ddnn_jax.study_plan``:
its config, its runs in stages, its record folder): ``fmnist20k`` is the evidence study
of the EKD claim.

The same command continues a study: finished runs are skipped, stopped ones resume
from their last checkpoint. With ``--record DIR`` every finished run leaves its record
in ``DIR/runs/<run>/`` (``ddnn_jax.records``: config, results, evaluation metrics, the
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

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ddnn_jax import cli, records, study_plan
from ddnn_jax.core import errors
from ddnn_jax.study_plan import Run

MANIFEST = 'study.json'
LOCK = '.study.lock'
DEFAULT_SCHEMES = 'individual,ddnn,ekd'
EXIT_STOPPED, EXIT_DIVERGED, EXIT_USAGE = 75, 3, 2
# Seconds a run takes besides its steps (start-up, compilation, data) when estimated from
# a measured step time.
STARTUP_SECONDS = 60.0
POLL_SECONDS = 2.0


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
    raise errors.UsageError(errors.one_line(err, argv)) from None


def base_depths(spec: str, overrides: Sequence[str]):
  """The depths of the config (full net first) and whether it has sub-nets."""
  from ddnn_jax.training import config_lib  # pylint: disable=g-import-not-at-top
  base = load_config(spec, overrides)
  base.mode = 'ddnn' if base.model.subnets else 'individual'
  try:
    config_lib.validate(base)
    return config_lib.depths_of(base), bool(base.model.subnets)
  except errors.UsageError as err:
    raise errors.UsageError(f'--config {spec}: {err}') from None


class Planner:
  """The study's runs, asked again after every finished run (a preset decides later
  stages from the records); each run's config is validated once and kept."""

  def __init__(self, spec: str, overrides: Sequence[str], extra: Sequence[str], python: str,
               root: str, plan: Callable[[], tuple[list[Run], list[str]]]):
    self.spec, self.overrides, self.extra = spec, list(overrides), list(extra)
    self.python, self.root, self._plan = python, root, plan
    self._configs: dict[str, dict[str, Any]] = {}

  def __call__(self) -> tuple[list[Run], list[str]]:
    from ddnn_jax.training import config_lib  # pylint: disable=g-import-not-at-top
    runs, waiting = self._plan()
    for run in runs:
      if run.name not in self._configs:
        config = load_config(self.spec, [*self.overrides, *run.overrides])
        try:
          config_lib.validate(config)
        except errors.UsageError as err:
          raise errors.UsageError(f'run {run.name}: {err}') from None
        self._configs[run.name] = json.loads(config.to_json())
    return runs, waiting

  def config(self, run: Run) -> dict[str, Any]:
    return self._configs[run.name]

  def key(self, run: Run) -> list[str]:
    """What identifies the run's command: its flags without the python and the workdir."""
    return [f'--config={self.spec}', *run.overrides, *self.overrides, *self.extra]

  def workdir(self, run: Run) -> str:
    return os.path.join(self.root, run.name)

  def argv(self, run: Run) -> list[str]:
    key = self.key(run)
    return [self.python, '-m', 'ddnn_jax.main', key[0], f'--workdir={self.workdir(run)}',
            *key[1:]]


# --- what is on disk ----------------------------------------------------------------------


def read_manifest(root: str) -> dict[str, Any]:
  try:
    with open(os.path.join(root, MANIFEST), encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    return {'runs': {}}
  except (OSError, ValueError) as err:
    raise errors.UsageError(f'cannot read {os.path.join(root, MANIFEST)}: {err}') from None


def write_manifest(root: str, manifest: dict[str, Any]) -> None:
  from ddnn_jax.core import file_io  # pylint: disable=g-import-not-at-top
  file_io.atomic_write(os.path.join(root, MANIFEST),
                       (json.dumps(manifest, indent=2) + '\n').encode())


def recorded(record: str | None, name: str, key: Sequence[str]) -> bool:
  """Whether ``record`` holds this run's record, made by this very command."""
  if record is None:
    return False
  found = records.read(records.run_dir(record, name))
  return found is not None and found.get('key') == list(key)


def is_finished(planner: Planner, run: Run, manifest: dict[str, Any],
                record: str | None = None) -> bool:
  """Recorded, or finished in its workdir with this very command (a changed command runs
  again: main resumes)."""
  if recorded(record, run.name, planner.key(run)):
    return True
  entry = manifest['runs'].get(run.name, {})
  return (entry.get('status') == 'finished' and entry.get('argv') == planner.argv(run)[1:]
          and os.path.isfile(os.path.join(planner.workdir(run), 'results.csv')))


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


def status_rows(planner: Planner, runs: Sequence[Run], record: str | None
                ) -> list[dict[str, Any]]:
  manifest = read_manifest(planner.root)
  rows = []
  for run in runs:
    workdir = planner.workdir(run)
    entry = manifest['runs'].get(run.name, {})
    if recorded(record, run.name, planner.key(run)):
      status = 'recorded'
    elif is_finished(planner, run, manifest):
      status = 'finished'
    elif entry.get('status') == 'running' and _lock_holder(workdir):
      status = 'running'
    elif entry and entry.get('argv') != planner.argv(run)[1:]:
      status = 'pending (command changed)'  # main resumes it with the new flags.
    elif entry:
      status = entry.get('status', 'unknown')
      status = 'stopped' if status == 'running' else status  # Its runner died.
    else:
      status = 'pending'
    seconds = entry.get('seconds')
    if status == 'recorded':
      seconds = records.read(records.run_dir(record, run.name)).get('wall_seconds')
    rows.append({'run': run.name, 'status': status, 'step': latest_step(workdir),
                 'epoch': last_epoch(workdir), 'seconds': seconds,
                 'log': os.path.join(planner.root, 'logs', f'{run.name}.log')})
  return rows


def format_status(rows: Sequence[dict[str, Any]], waiting: Sequence[str] = ()) -> str:
  lines = ['| run | status | checkpoint step | last eval epoch | minutes | log |',
           '|---|---|---|---|---|---|']
  for r in rows:
    minutes = '' if r['seconds'] is None else f'{r["seconds"] / 60:.1f}'
    epoch = '' if r['epoch'] is None else f'{r["epoch"]:g}'
    step = '' if r['step'] is None else str(r['step'])
    lines.append(f'| {r["run"]} | {r["status"]} | {step} | {epoch} | {minutes} | {r["log"]} |')
  counts: dict[str, int] = {}
  for r in rows:
    counts[r['status']] = counts.get(r['status'], 0) + 1
  return '\n'.join([*lines, ', '.join(f'{n} {s}' for s, n in counts.items()),
                    *(f'waiting: {w}' for w in waiting)]) + '\n'


# --- how long a run takes ------------------------------------------------------------------


def _past_seconds(planner: Planner, run: Run, cores: int, record: str | None,
                  manifest: dict[str, Any]) -> float | None:
  """Mean wall time of the recorded (else finished) runs with this run's budget on as many
  cores; None if there are none."""
  want = study_plan.budget(planner.config(run))
  seconds = []
  if record is not None:
    for name, found in records.read_all(record).items():
      config_path = os.path.join(records.run_dir(record, name), 'config.json')
      used = (found.get('machine') or {}).get('cores') or []
      try:
        with open(config_path, encoding='utf-8') as f:
          same = study_plan.budget(json.load(f)) == want
      except (OSError, ValueError):
        continue
      if same and len(used) == cores:
        seconds.append(found['wall_seconds'])
  if not seconds:
    for name, entry in manifest['runs'].items():
      config_path = os.path.join(planner.root, name, 'config.json')
      if entry.get('status') != 'finished' or entry.get('cores', cores) != cores:
        continue
      try:
        with open(config_path, encoding='utf-8') as f:
          if study_plan.budget(json.load(f)) == want:
            seconds.append(entry['seconds'])
      except (OSError, ValueError):
        continue
  return sum(seconds) / len(seconds) if seconds else None


def probe_seconds(planner: Planner, run: Run, cores: Sequence[int]) -> float:
  """A run's expected wall time from its step time, measured in a process of its own on
  its cores (``train.measure_step_seconds``)."""
  argv = [*_pin(cores), planner.python, '-m', 'ddnn_jax.study', '--probe',
          planner.key(run)[0], *planner.key(run)[1:]]
  result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
  if result.returncode:
    raise errors.UsageError(f'run {run.name}: measuring its step time failed: '
                            f'{(result.stderr.strip().splitlines() or ["?"])[-1]}')
  measured = json.loads(result.stdout.strip().splitlines()[-1])
  return STARTUP_SECONDS + measured['seconds']


class Estimator:
  """Expected seconds a run still needs: past runs of its budget, else a measured step
  time (cached per budget), scaled by the part its workdir has still to train."""

  def __init__(self, planner: Planner, record: str | None):
    self.planner, self.record = planner, record
    self._probed: dict[tuple[Any, ...], float] = {}

  def __call__(self, run: Run, cores: Sequence[int], manifest: dict[str, Any]) -> float:
    full = _past_seconds(self.planner, run, len(cores), self.record, manifest)
    if full is None:
      budget = (*study_plan.budget(self.planner.config(run)), len(cores))
      if budget not in self._probed:
        self._probed[budget] = probe_seconds(self.planner, run, cores)
      full = self._probed[budget]
    done = last_epoch(self.planner.workdir(run)) or 0.0
    epochs = self.planner.config(run)['train']['num_epochs']
    return full * max(0.0, 1.0 - done / epochs)


def probe(key: Sequence[str]) -> int:
  """``--probe``: prints the measured seconds of a run's steps (JSON) and returns 0."""
  spec, overrides = key[0].removeprefix('--config='), list(key[1:])
  config = load_config(spec, overrides)
  from ddnn_jax.cpu import device_count  # pylint: disable=g-import-not-at-top
  device_count.apply_for_training(config.train.batch_size)
  from ddnn_jax.training import trainer  # pylint: disable=g-import-not-at-top
  try:
    print(json.dumps(trainer.measure_step_seconds(config)))
  except errors.UsageError as err:
    raise errors.UsageError(str(err)) from None
  return 0


# --- running --------------------------------------------------------------------------------


def _pin(cores: Sequence[int] | None) -> list[str]:
  return [] if cores is None else ['taskset', '-c', ','.join(map(str, cores))]


def core_slots(parallel: int) -> list[list[int]]:
  """The cores of each of ``parallel`` runs at once: this process's cores, split evenly."""
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else list(
      range(os.cpu_count() or 1))
  if parallel > len(cores):
    raise errors.UsageError(f'--parallel {parallel}: this process may use {len(cores)} cores')
  size = len(cores) // parallel
  return [cores[i * size:(i + 1) * size] for i in range(parallel)]


def default_parallel() -> int:
  """Two runs at once where there are two cores or more (bench/study_parallel.py)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else 1
  return 2 if cores >= 2 and shutil.which('taskset') else 1


class _Stop:
  """SIGTERM/SIGINT or the deadline: forwarded once to every run in flight (each saves and
  exits 75)."""

  def __init__(self):
    self.requested: str | None = None
    self.children: list[subprocess.Popen] = []

  def request(self, reason: str) -> None:
    if self.requested:
      return
    self.requested = reason
    for child in self.children:
      if child.poll() is None:
        child.send_signal(signal.SIGTERM)

  def __call__(self, signum, frame):
    del frame
    self.request(signal.Signals(signum).name)


def _outcome(code: int) -> str:
  return {0: 'finished', EXIT_DIVERGED: 'diverged', EXIT_USAGE: 'refused',
          EXIT_STOPPED: 'stopped'}.get(code, 'stopped' if code < 0 else f'crashed (exit {code})')


def _minutes(seconds: float) -> str:
  return f'{seconds / 60:.0f} min' if seconds >= 60 else f'{seconds:.0f} s'


def run_study(planner: Planner, *, record: str | None, slots: Sequence[Sequence[int]],
              deadline: float | None, nice: int, header: dict[str, Any],
              finish: Callable[[list[str]], int]) -> int:
  """Trains every unfinished run (``len(slots)`` at once), records each finished one, then
  ``finish(finished run directories)``; returns the exit code."""
  from ddnn_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  root = planner.root
  os.makedirs(os.path.join(root, 'logs'), exist_ok=True)
  stop = _Stop()
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, stop)
  estimate = Estimator(planner, record)
  worst, left_out = 0, {}  # left_out: run -> why it was not started.
  os.nice(nice)  # Inherited by every run (a preexec_fn would fork this jax process).
  pin = len(slots) > 1
  with workdir_lib.lock(root, LOCK, what='study root', instead='--root'):
    manifest = read_manifest(root)
    manifest.update(header)
    flight: dict[int, tuple[Run, subprocess.Popen, float, Any]] = {}  # slot -> run in flight
    announced: set[str] = set()
    while True:
      runs, waiting = planner()
      order = {run.name: i + 1 for i, run in enumerate(runs)}
      busy = {run.name for run, *_ in flight.values()}
      for run in runs:
        if run.name not in announced and run.name not in busy and is_finished(
            planner, run, manifest, record):
          announced.add(run.name)
          print(f'[{order[run.name]}/{len(runs)}] {run.name}: finished, kept', flush=True)
      free = [s for s in range(len(slots)) if s not in flight]
      for slot in free if not stop.requested else ():
        for run in runs:
          if (run.name in busy or run.name in left_out
              or is_finished(planner, run, manifest, record)):
            continue
          if deadline is not None:
            needed = estimate(run, slots[slot], manifest)
            left = deadline - time.time()
            if needed > left:
              left_out[run.name] = f'needs ~{_minutes(needed)}, {_minutes(max(left, 0))} left'
              print(f'[{order[run.name]}/{len(runs)}] {run.name}: {left_out[run.name]}: '
                    'not started', flush=True)
              continue
          flight[slot] = _start(planner, run, slots[slot] if pin else None, manifest, stop)
          busy.add(run.name)
          where = f' on cores {",".join(map(str, slots[slot]))}' if pin else ''
          print(f'[{order[run.name]}/{len(runs)}] {run.name}: training{where} (log '
                f'{os.path.join(root, "logs", run.name + ".log")})', flush=True)
          break
      if not flight:
        break
      time.sleep(POLL_SECONDS)
      if deadline is not None and time.time() >= deadline:
        stop.request('the deadline')
      for slot, (run, child, started, log) in list(flight.items()):
        code = child.poll()
        if code is None:
          continue
        del flight[slot]
        announced.add(run.name)
        log.close()
        stop.children.remove(child)
        seconds = time.time() - started
        entry = manifest['runs'][run.name]
        total = seconds + entry.pop('earlier', 0.0)
        entry.update(status=_outcome(code), exit_code=code, seconds=round(total, 1),
                     cores=len(slots[slot]))
        if code == 0 and record is not None:
          records.write(planner.workdir(run), records.run_dir(record, run.name),
                        key=planner.key(run), command=planner.argv(run), seconds=total,
                        cores=slots[slot])
          entry['record'] = records.run_dir(record, run.name)
        write_manifest(root, manifest)
        print(f'[{order.get(run.name, "?")}/{len(runs)}] {run.name}: {entry["status"]} after '
              f'{seconds / 60:.1f} min' + (f', recorded in {entry["record"]}'
                                           if 'record' in entry and code == 0 else ''),
              flush=True)
        if code == EXIT_USAGE:
          print(f'error: run {run.name} refused its config: see '
                f'{os.path.join(root, "logs", run.name + ".log")}', file=sys.stderr)
          stop.request('a refused config')
          worst = EXIT_USAGE
        elif code == EXIT_STOPPED or code < 0:
          stop.request('the run itself')
        elif code != 0:
          worst = worst or (EXIT_DIVERGED if code == EXIT_DIVERGED else 1)
    if worst == EXIT_USAGE:
      return EXIT_USAGE
    runs, waiting = planner()
    if stop.requested:
      print(f'study stopped ({stop.requested}); the same command continues it', flush=True)
      return EXIT_STOPPED
    if left_out:
      print(f'{len(left_out)} runs did not fit the time left; the same command continues '
            'the study', flush=True)
      return EXIT_STOPPED
    for line in waiting:
      print(f'waiting: {line}', flush=True)
    finished = [records.run_dir(record, r.name) if recorded(record, r.name, planner.key(r))
                else planner.workdir(r) for r in runs
                if is_finished(planner, r, manifest, record)]
  code = finish(finished) if finished else 0
  return worst or (1 if code else 0)


def _start(planner: Planner, run: Run, cores: Sequence[int] | None, manifest: dict[str, Any],
           stop: _Stop):
  argv = planner.argv(run)
  previous = manifest['runs'].get(run.name, {})
  # Time spent before a stop counts when the same command resumes.
  earlier = previous.get('seconds', 0.0) if previous.get('argv') == argv[1:] else 0.0
  manifest['runs'][run.name] = {'argv': argv[1:], 'status': 'running', 'earlier': earlier,
                                'started': time.strftime('%Y-%m-%d %H:%M:%S')}
  write_manifest(planner.root, manifest)
  log = open(os.path.join(planner.root, 'logs', f'{run.name}.log'), 'ab')  # noqa: SIM115
  log.write(f'\n$ {" ".join([*_pin(cores), *argv])}\n'.encode())
  log.flush()
  # Its own session: a terminal's Ctrl-C reaches the study, which forwards it once.
  child = subprocess.Popen([*_pin(cores), *argv], stdout=log, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, start_new_session=True)
  stop.children.append(child)
  return run, child, time.time(), log


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
        f'  stop:    kill {child.pid}   (the runs in flight save; the same command continues)')


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


def parse_deadline(hours: float | None, until: str | None,
                   now: datetime.datetime | None = None) -> float | None:
  """The deadline as a time stamp: ``hours`` from now, or the next ``until`` (HH:MM, local
  time; tomorrow's if today's has passed)."""
  now = now or datetime.datetime.now()
  if hours is not None:
    return now.timestamp() + hours * 3600
  if until is None:
    return None
  try:
    at = datetime.datetime.strptime(until, '%H:%M').time()
  except ValueError:
    raise errors.UsageError(f'--until {until!r}: give a time of day as HH:MM, e.g. 18:30') from None
  when = datetime.datetime.combine(now.date(), at)
  if when <= now:
    when += datetime.timedelta(days=1)
  return when.timestamp()


def build_parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(prog='python -m ddnn_jax.study', doc=__doc__,
                              example='python -m ddnn_jax.study --preset fmnist20k --hours 6')
  parser.add_argument('--preset', choices=tuple(study_plan.PRESETS),
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
                      f'{default_parallel()} here)')
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
    return probe(argv[1:])
  own, overrides, extra = split_argv(argv)
  args = build_parser().parse_args(own)
  if not 0 <= args.nice <= 19:
    raise errors.UsageError(f'--nice {args.nice}: must be in 0..19')
  preset = study_plan.PRESETS.get(args.preset)
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
  parallel = args.parallel or default_parallel()
  slots = core_slots(parallel)
  if parallel > 1 and not shutil.which('taskset'):
    raise errors.UsageError(f'--parallel {parallel} pins runs to cores with taskset, which is '
                            'not installed (util-linux)')
  deadline = parse_deadline(args.hours, args.until)
  depths, has_subnets = base_depths(spec, overrides)
  if preset is not None:
    plan = lambda: preset.plan(depths, record)  # noqa: E731
  else:
    fixed = study_plan.scheme_runs(depths, has_subnets, study_plan.parse_schemes(
        args.schemes or DEFAULT_SCHEMES, args.seeds or 3))
    plan = lambda: (fixed, [])  # noqa: E731
  planner = Planner(spec, overrides, extra, args.python, root, plan)
  if args.report:
    return _report(preset, record, depths)
  runs, waiting = planner()
  if args.dry_run:
    for run in runs:
      print(' '.join(_quote(a) for a in [*_pin(None), *planner.argv(run)]))
    for line in waiting:
      print(f'# waiting: {line}')
    return 0
  if args.status:
    print(format_status(status_rows(planner, runs, record), waiting), end='')
    return 0
  if args.detach:
    if _lock_holder(root):
      raise errors.UsageError(f'--root {root} is in use by a live study ({_lock_holder(root)})')
    detach(argv, root)
    return 0
  header = {'config': spec, 'overrides': overrides, 'extra': extra,
            'preset': args.preset, 'schemes': args.schemes, 'seeds': args.seeds}

  def finish(finished: list[str]) -> int:
    if preset is not None:
      return _report(preset, record, depths)
    return subprocess.call([args.python, '-m', 'ddnn_jax.compare', *finished,
                            '--out', os.path.join(root, 'comparison')])

  return run_study(planner, record=record, slots=slots, deadline=deadline, nice=args.nice,
                   header=header, finish=finish)


def _report(preset: study_plan.Preset, record: str, depths) -> int:
  from ddnn_jax import study_report  # pylint: disable=g-import-not-at-top
  written = study_report.main_report(preset, record, depths)
  print(f'wrote {", ".join(written)}')
  return 0


def _quote(arg: str) -> str:
  import shlex  # pylint: disable=g-import-not-at-top
  return shlex.quote(arg)


if __name__ == '__main__':
  sys.exit(cli.run(main) or 0)
