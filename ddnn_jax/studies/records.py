"""Run records: the small part of a finished run that a repository can keep.

A record is a directory ``RECORDS/<run>/`` with the run's ``config.json``,
``results.csv``, ``results.md``, ``dataset.json``, its ``metrics.jsonl`` cut to the
evaluation lines, the diagnosis' lines (``train.term_gradients_every_steps``) and at most
``MAX_TRAIN_LINES`` evenly spaced other train lines, and
``record.json``: the exact command, the wall seconds, and where it ran (CPU model and
instruction set, cores, library versions, commit). No checkpoints, no TensorBoard files:
a record is tens of kilobytes. ``python -m ddnn_jax.compare`` reads a record as it reads
the workdir it came from; ``python -m ddnn_jax.study`` counts a run with a record as
finished even when its workdir is gone.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

RECORD_FILE = 'record.json'
COPIED = ('config.json', 'results.csv', 'results.md', 'dataset.json')
METRICS_FILE = 'metrics.jsonl'
MAX_TRAIN_LINES = 60
_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'onednn-cpu-gomp')


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def instruction_set() -> str:
  """The widest x86 vector extension the CPU has (oneDNN's kernels, and their float32
  rounding, follow it), or the machine name elsewhere."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
  except OSError:
    flags = []
  for flag, name in (('avx512f', 'AVX-512'), ('avx2', 'AVX2'), ('avx', 'AVX')):
    if flag in flags:
      return name
  return platform.machine()


def machine(cores: Sequence[int] | None = None) -> dict[str, Any]:
  """Where a run ran: CPU, instruction set, the cores it was given, library versions."""
  versions = {}
  for package in _PACKAGES:
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      pass
  return {'cpu': cpu_model(), 'isa': instruction_set(), 'cpu_count': os.cpu_count(),
          'cores': None if cores is None else list(cores), 'python': platform.python_version(),
          'packages': versions}


def commit(directory: str = '.') -> str:
  """The checkout's commit, with '+changes' when it has uncommitted changes to tracked
  files; '' outside a git checkout."""
  def git(*args: str) -> str:
    return subprocess.run(['git', '-C', directory, *args], capture_output=True, text=True,
                          check=True).stdout.strip()
  try:
    head = git('rev-parse', 'HEAD')
    dirty = git('status', '--porcelain', '--untracked-files=no')
  except (OSError, subprocess.CalledProcessError):
    return ''
  return head + ('+changes' if dirty else '')


def machine_line(record: Mapping[str, Any]) -> str:
  """'AMD EPYC (AVX-512), 2 cores' for a record."""
  where = record.get('machine', {})
  cores = where.get('cores')
  count = len(cores) if cores else where.get('cpu_count')
  return f'{where.get("cpu", "unknown CPU")} ({where.get("isa", "?")}), {count} core' + (
      's' if count != 1 else '')


def _metrics_lines(workdir: str) -> list[str]:
  """metrics.jsonl with every evaluation and diagnosis line and at most MAX_TRAIN_LINES
  other train lines."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    return []
  with open(path, encoding='utf-8') as f:
    lines = [line if line.endswith('\n') else line + '\n' for line in f if line.strip()]
  # Evaluations and the diagnosis' lines (term gradient norms) are kept whole.
  whole = ['"epoch"' in line or '"train/grad_norm/' in line for line in lines]
  train = [i for i, w in enumerate(whole) if not w]
  keep = set(i for i, w in enumerate(whole) if w)
  if len(train) > MAX_TRAIN_LINES:  # Evenly spaced, the last one kept.
    step = len(train) / MAX_TRAIN_LINES
    keep.update(train[len(train) - 1 - int(j * step)] for j in range(MAX_TRAIN_LINES))
  else:
    keep.update(train)
  return [lines[i] for i in sorted(keep)]


def write(workdir: str, record_dir: str, *, key: Sequence[str], command: Sequence[str],
          seconds: float, cores: Sequence[int] | None = None,
          repository: str = '.') -> str:
  """Writes the record of the finished run in ``workdir`` to ``record_dir`` (replacing an
  older one) and returns its path. ``key`` is what identifies the run's command in a study
  (its flags without the workdir), ``command`` the exact argv it ran with. Written
  whole or not at all."""
  missing = [n for n in ('config.json', 'results.csv') if not os.path.isfile(
      os.path.join(workdir, n))]
  if missing:
    raise FileNotFoundError(f'{workdir} has no {" or ".join(missing)}: not a finished run')
  parent = os.path.dirname(os.path.abspath(record_dir))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(record_dir)}.')
  try:
    for name in COPIED:
      if os.path.isfile(os.path.join(workdir, name)):
        shutil.copyfile(os.path.join(workdir, name), os.path.join(staging, name))
    with open(os.path.join(staging, METRICS_FILE), 'w', encoding='utf-8') as f:
      f.writelines(_metrics_lines(workdir))
    record = {'key': list(key), 'command': list(command), 'wall_seconds': round(seconds, 1),
              'finished': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
              'machine': machine(cores), 'commit': commit(repository)}
    with open(os.path.join(staging, RECORD_FILE), 'w', encoding='utf-8') as f:
      f.write(json.dumps(record, indent=2) + '\n')
    for name in os.listdir(staging):
      os.chmod(os.path.join(staging, name), 0o644)
    os.chmod(staging, 0o755)
    if os.path.isdir(record_dir):
      shutil.rmtree(record_dir)
    os.replace(staging, record_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return record_dir


def read(record_dir: str) -> dict[str, Any] | None:
  """A record's record.json, or None when ``record_dir`` holds no (whole) record."""
  try:
    with open(os.path.join(record_dir, RECORD_FILE), encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def read_all(records: str) -> dict[str, dict[str, Any]]:
  """Every run recorded under ``records`` (its ``runs/`` folder): name -> record.json."""
  runs = os.path.join(records, 'runs')
  if not os.path.isdir(runs):
    return {}
  found = {}
  for name in sorted(os.listdir(runs)):
    record = read(os.path.join(runs, name))
    if record is not None and not name.startswith('.'):
      found[name] = record
  return found


def run_dir(records: str, name: str) -> str:
  return os.path.join(records, 'runs', name)
