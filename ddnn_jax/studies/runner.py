"""Running a study: its runs in order, resumable, pinned to cores, fitted to a deadline.

A ``Planner`` turns a study's plan (``plans``) into commands, one ``python -m
ddnn_jax.main`` per run in its own workdir under the study's root; ``run_study`` starts
them ``--parallel`` at a time on their share of the cores, skips finished ones (a
manifest, ``ROOT/study.json``, and the run records, ``records``), starts a run only if
its expected time (``Estimator``: the records, earlier runs, else a measured step time,
``probe``) fits before the deadline, and stops the runs in flight cleanly at the
deadline or a signal (exit 75). ``python -m ddnn_jax.study`` parses the flags and calls
it; ``--probe`` and ``--detach`` run that command again as a child process.
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

from ddnn_jax.core import errors
from ddnn_jax.studies import plans, records
from ddnn_jax.studies.plans import Run

MANIFEST = 'study.json'
LOCK = '.study.lock'
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


def lock_holder(directory: str) -> str:
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
    elif entry.get('status') == 'running' and lock_holder(workdir):
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
  want = plans.budget(planner.config(run))
  seconds = []
  if record is not None:
    for name, found in records.read_all(record).items():
      config_path = os.path.join(records.run_dir(record, name), 'config.json')
      used = (found.get('machine') or {}).get('cores') or []
      try:
        with open(config_path, encoding='utf-8') as f:
          same = plans.budget(json.load(f)) == want
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
          if plans.budget(json.load(f)) == want:
            seconds.append(entry['seconds'])
      except (OSError, ValueError):
        continue
  return sum(seconds) / len(seconds) if seconds else None


def probe_seconds(planner: Planner, run: Run, cores: Sequence[int]) -> float:
  """A run's expected wall time from its step time, measured in a process of its own on
  its cores (``train.measure_step_seconds``)."""
  argv = [*pin_prefix(cores), planner.python, '-m', 'ddnn_jax.study', '--probe',
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
      budget = (*plans.budget(self.planner.config(run)), len(cores))
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


def pin_prefix(cores: Sequence[int] | None) -> list[str]:
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
  log.write(f'\n$ {" ".join([*pin_prefix(cores), *argv])}\n'.encode())
  log.flush()
  # Its own session: a terminal's Ctrl-C reaches the study, which forwards it once.
  child = subprocess.Popen([*pin_prefix(cores), *argv], stdout=log, stderr=subprocess.STDOUT,
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
