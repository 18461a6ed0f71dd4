"""Orbax checkpoints of a run: train state plus data-iterator position, finite states only.

``Checkpointer`` saves and restores a training run; ``restore_variables`` reads one
checkpoint for inference. ``workdir/checkpoints/<step>/`` holds ``state`` (step, params,
optimizer state, every depth's BN statistics), ``data`` (the train iterator's position)
and, for evaluated steps, ``metrics`` (eval accuracy per depth and their mean). The latest
``keep`` checkpoints are kept, plus the best by mean eval accuracy, across resumes.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ddnn_jax.core.errors import UsageError
from ddnn_jax.training import divergence

CHECKPOINT_DIR = 'checkpoints'


class CheckpointError(UsageError):
  """A checkpoint that cannot be read or written; str(err) is one line for the user."""


def _first_line(err: BaseException) -> str:
  text = str(err).strip()
  return text.splitlines()[0][:200] if text else type(err).__name__


def create_manager(workdir: str | os.PathLike, keep: int = 1,
                   read_only: bool = False) -> ocp.CheckpointManager:
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m['mean_accuracy'], reverse=False,
                                    n=1, keep_checkpoints_without_metrics=False),
  ])
  # best_fn also makes orbax write each step's metrics, so the best checkpoint is
  # still known (and kept) after a restart.
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=lambda m: m['mean_accuracy'], best_mode='max',
      create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(epath.Path(workdir) / CHECKPOINT_DIR, options=options,
                               item_names=('state', 'data'))


def state_items(state) -> dict[str, Any]:
  """What a checkpoint holds of a ``steps.TrainState`` (its functions are rebuilt)."""
  return {'step': state.step, 'params': state.params, 'opt_state': state.opt_state,
          'batch_stats': state.batch_stats}


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def is_finite(tree) -> bool:
  """Whether every floating-point leaf of ``tree`` is finite (one small device reduction)."""
  return bool(np.asarray(jax.device_get(_all_finite(tree))))


class Checkpointer:
  """A run's checkpoints: saves only finite states, reports failed writes in one line."""

  def __init__(self, workdir: str | os.PathLike, keep: int):
    self.manager = create_manager(workdir, keep)
    self._last_saved: int | None = None  # The step of the latest write started.

  @property
  def directory(self) -> str:
    return str(self.manager.directory)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, state):
    return restore_train_state(self.manager, state)

  def save(self, step: int, state, data_state: dict[str, Any],
           metrics: dict[str, float] | None = None) -> None:
    """Saves asynchronously. A non-finite state is never saved (divergence.Diverged, with
    the last good checkpoint); a failed write is a CheckpointError."""
    if not is_finite(state_items(state)):
      raise divergence.Diverged(divergence.diverged_message(
          step, ['train state'], self.latest_step(), self.directory))
    self._last_saved = step
    try:
      self.manager.save(step, metrics=metrics, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state_items(state)), data=ocp.args.JsonSave(data_state)))
    except Exception as err:  # noqa: BLE001 - disk full, permissions, remote storage errors.
      raise write_error(self.manager, step, err) from None

  def wait(self) -> None:
    """Waits for pending writes; CheckpointError (one line) if one failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as err:  # noqa: BLE001 - failures of the background write surface here.
      raise write_error(self.manager, self._last_saved, err) from None

  def close(self) -> None:
    """Waits for pending writes (CheckpointError if one failed), then closes."""
    try:
      self.wait()
    finally:
      self.manager.close()


def write_error(manager: ocp.CheckpointManager, step: int | None,
                err: BaseException) -> CheckpointError:
  earlier = [s for s in manager.all_steps() if s != step]
  kept = f'earlier checkpoints are intact (latest: {max(earlier)})' if earlier else (
      'no earlier checkpoint exists')
  # The cause is the last part of orbax's message, e.g. "No space left on device".
  text = str(err).strip()
  cause = text.splitlines()[0].rsplit(': ', 1)[-1][:200] if text else type(err).__name__
  which = f'checkpoint {step}' if step is not None else 'a checkpoint'
  return CheckpointError(f'cannot write {which} to {manager.directory} ({cause}); {kept}')


def restore_train_state(manager: ocp.CheckpointManager, state):
  """(state, data-iterator state) from the latest checkpoint, or (state, None) if none.

  ``state`` gives the structure, shapes and shardings to restore into.
  """
  step = manager.latest_step()
  if step is None:
    return state, None
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_items(state))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  except Exception as err:  # noqa: BLE001 - any failure to read means a damaged checkpoint.
    raise CheckpointError(
        f'checkpoint {step} in {manager.directory} cannot be restored ({_first_line(err)}); '
        'delete that step directory to resume from an earlier one, or use a new '
        '--workdir') from None
  return state.replace(**restored['state']), restored['data']


def resolve_step(manager: ocp.CheckpointManager, which: str | int) -> int:
  """'latest', 'best' (mean eval accuracy) or a step number, checked against the workdir."""
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f'{manager.directory} holds no checkpoint: train first '
                          '(python -m ddnn_jax.main)')
  if which == 'latest':
    return manager.latest_step()
  if which == 'best':
    return manager.best_step()
  step = int(which)
  if step not in steps:
    raise CheckpointError(f'{manager.directory} has no checkpoint {step}; it has '
                          f'{", ".join(map(str, sorted(steps)))}')
  return step


def restore_variables(workdir: str | os.PathLike, which: str | int = 'latest',
                      ) -> tuple[int, dict[str, Any], dict[str, Any]]:
  """(step, params, batch_stats by depth name) of a checkpoint, as host numpy arrays.

  For evaluation and deployment: whatever devices saved it, it loads on this one.
  """
  if not (epath.Path(workdir) / CHECKPOINT_DIR).exists():
    raise CheckpointError(f'{workdir} holds no checkpoint: train first (python -m ddnn_jax.main)')
  with _quiet_orbax():
    return _restore_variables(workdir, which)


@contextlib.contextmanager
def _quiet_orbax():
  """Orbax warns on every read-only load (read-only manager, no metadata file): nothing a
  user could act on, so loading a run for inference is quiet unless it fails."""
  previous = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(previous)


def _restore_variables(workdir, which):
  manager = create_manager(workdir, read_only=True)
  try:
    step = resolve_step(manager, which)
    path = epath.Path(manager.directory) / str(step) / 'state'
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    try:
      with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.metadata(path).item_metadata
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        restored = checkpointer.restore(path, target)
    except Exception as err:  # noqa: BLE001 - a damaged or foreign checkpoint.
      raise CheckpointError(f'checkpoint {step} in {manager.directory} cannot be read '
                            f'({_first_line(err)})') from None
  finally:
    manager.close()
  host = jax.device_get(restored)
  return step, host['params'], host['batch_stats']
