"""The run's workdir: created and proven writable, locked against a second live run,
and bound to one run identity (``config.json``).

The lock is an ``fcntl`` lock on ``workdir/.lock``, held by process 0 for the whole run:
the kernel drops it when the process dies, however it dies, so a lock left by a dead
run is simply taken over (with a warning naming it). Object-store workdirs (gs://) are
not locked: they have no file locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator

import ml_collections
from etils import epath
from jax.experimental import multihost_utils
import jax
import numpy as np

from ddnn_jax.core import errors, parallel
from ddnn_jax.training import config_lib

LOCK_FILE = '.lock'
CONFIG_FILE = 'config.json'
# What deployment needs to know of the data, so that a copied workdir works without it:
# class names, input shape, normalisation.
DATASET_FILE = 'dataset.json'


class WorkdirError(errors.UsageError):
  pass


def _is_remote(workdir: str) -> bool:
  return '://' in workdir


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def lock(path: str | os.PathLike, name: str = LOCK_FILE, what: str = 'workdir',
         instead: str = '--workdir') -> Iterator[None]:
  """Holds an exclusive lock on ``path/name``; WorkdirError if a live process holds it."""
  path = epath.Path(path)
  lock_path = os.fspath(path / name)
  fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = os.pread(fd, 4096, 0).decode(errors='replace').strip() or 'another process'
      raise WorkdirError(f'{what} {path} is in use by a live run ({owner}): wait for it '
                         f'to end or use another {instead}') from None
    previous = os.pread(fd, 4096, 0).decode(errors='replace').strip()
    if previous:
      print(f'warning: taking over the lock of {what} {path} left by a run that is no longer '
            f'running ({previous})', file=sys.stderr, flush=True)
    me = f'pid {os.getpid()} on {socket.gethostname()}, since {time.strftime("%Y-%m-%d %H:%M:%S")}'
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.encode(), 0)
    os.fsync(fd)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # A clean exit leaves no owner behind.
  finally:
    os.close(fd)  # Releases the lock.


def _agree(ok: bool, error: str) -> None:
  """Every process raises WorkdirError if process 0's check failed (multi-host)."""
  if jax.process_count() > 1:
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
  if not ok:
    raise WorkdirError(error or 'the workdir check failed on process 0')


@contextlib.contextmanager
def claim(workdir: str, config: ml_collections.ConfigDict) -> Iterator[epath.Path]:
  """Creates and locks ``workdir`` for this run and checks or writes its config.json.

  Raises WorkdirError (nothing written) if the workdir is unusable or used by a live
  run; errors.UsageError if it holds a run with another identity.
  """
  path = epath.Path(workdir)
  held: contextlib.AbstractContextManager = contextlib.nullcontext()
  error = ''
  with contextlib.ExitStack() as stack:
    if parallel.is_main_process():
      try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / '.write_test'
        probe.write_text('ok')
        probe.unlink()
        if not _is_remote(workdir):
          held = lock(path)
        stack.enter_context(held)
      except OSError as err:
        error = f'workdir {workdir} is not usable: {err}'
      except WorkdirError as err:
        error = str(err)
    _agree(not error, error)
    saved = path / CONFIG_FILE
    try:
      previous = json.loads(saved.read_text()) if saved.exists() else None
    except (OSError, ValueError) as err:
      raise WorkdirError(f'workdir {workdir}: cannot read {CONFIG_FILE} ({err})') from None
    if previous is not None:
      config_lib.check_resume(previous, config, workdir)
    elif parallel.is_main_process():
      # Atomic: other processes of a multi-host run may read it at the same moment.
      partial = path / f'{CONFIG_FILE}.tmp'
      partial.write_text(config.to_json(indent=2))
      partial.rename(saved)
    yield path


def write_dataset_facts(workdir: str, info, spec) -> None:
  """Writes ``workdir/dataset.json`` (``data.DatasetInfo`` and ``datasets.DatasetSpec`` of
  the run): its dataset, classes and their names, input shape and normalisation."""
  scale, shift = spec.normalization()
  facts = {'dataset': info.name, 'num_classes': info.num_classes,
           'class_names': list(info.class_names), 'image_shape': list(info.image_shape),
           'normalization': {'pixels': 'in [0, 255], fed as pixels * scale - shift',
                             'mean': list(spec.mean), 'std': list(spec.std),
                             'scale': [float(x) for x in scale],
                             'shift': [float(x) for x in shift]}}
  path = epath.Path(workdir) / DATASET_FILE
  text = json.dumps(facts, indent=2)
  if not path.exists() or path.read_text() != text:
    partial = path.parent / f'{DATASET_FILE}.tmp'
    partial.write_text(text)
    partial.rename(path)


def read_dataset_facts(workdir: str) -> dict | None:
  """``workdir/dataset.json`` as a dict, or None for runs written before it existed."""
  path = epath.Path(workdir) / DATASET_FILE
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as err:
    raise WorkdirError(f'cannot read {path}: {err}') from None
