"""Graceful stops: on SIGTERM or SIGINT the run finishes its step, saves it and exits 75.

Preemptible TPU VMs, SLURM and Kubernetes send SIGTERM some time before they take the
machine. The handlers only set a flag; the training loop asks ``requested()`` after
every step. With several processes that question is a tiny all-gather, so every
process sees the same answer at the same step, whichever of them got the signal.
(jax's own preemption service is switched off in ``parallel.initialize_distributed``: it
polls once a second, so processes would stop about a second of steps later, and it
ignores SIGINT.) A second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" - rerun the same command to continue.
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run stopped on a signal after saving a checkpoint at ``step``."""

  def __init__(self, step: int, reason: str):
    super().__init__(f'stopped by {reason} after step {step}; a checkpoint at step {step} '
                     'was saved: run the same command again to continue')
    self.step = step


class StopSignals:
  """Context manager installing the SIGTERM/SIGINT handlers (main thread only)."""

  def __init__(self):
    self._received: str | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    del frame
    if self._received and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C: stop now, without a checkpoint.
    self._received = signal.Signals(signum).name

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def requested(self) -> str | None:
    """The signal that asks this run to stop, if any, agreed by every process.

    With several processes this is a collective: all of them must call it at the
    same steps.
    """
    if jax.process_count() == 1:
      return self._received
    stop = multihost_utils.process_allgather(np.int32(self._received is not None))
    if not np.any(stop):
      return None
    return self._received or 'a signal to another process'
