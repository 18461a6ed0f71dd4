"""Measured latency of a depth: median milliseconds of its compiled apply, per backend.

``LatencyTable`` keeps them in ``W/latency.json``, keyed by backend (``backend_key``) and
depth, so every deploy tool reads what another measured on the same machine kind.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import numpy as np
from etils import epath

from ddnn_jax.core import file_io
from ddnn_jax.deploy import trained_run
from ddnn_jax.nn import notation

LATENCY_FILE = 'latency.json'


# --- latency ---------------------------------------------------------------------------


def backend_key() -> str:
  """Where latencies were measured: the jax backend and device kind, e.g. 'cpu' or
  'gpu:NVIDIA H100 80GB HBM3'."""
  device = jax.devices()[0]
  kind = device.device_kind
  return device.platform if kind.lower() == device.platform else f'{device.platform}:{kind}'


def measure_latency(run: trained_run.TrainedRun, depth: notation.Depth, batch_stats,
                    batch_size: int, repeats: int = 20, warmup: int = 3) -> float:
  """Median milliseconds of ``repeats`` timed calls at ``batch_size``, after warm-up calls
  (the first compiles), on the current backend."""
  apply = trained_run.logits_fn(run.model, depth)
  params = jax.device_put(run.used_params(depth))
  stats = jax.device_put(batch_stats)
  images = jax.device_put(np.zeros((batch_size, *run.image_shape), np.float32))
  return median_ms(lambda: apply(params, stats, images), repeats, warmup)


def median_ms(call, repeats: int = 20, warmup: int = 3) -> float:
  """Median milliseconds of ``repeats`` calls of ``call()`` (its result waited for), after
  ``warmup`` calls (the first compiles)."""
  if repeats < 1:
    raise ValueError('repeats must be >= 1')
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(call())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


class LatencyTable:
  """``workdir/latency.json``: {backend: {depth name: {"batch_<n>_ms": median, ...}}}."""

  def __init__(self, workdir: str):
    self.path = epath.Path(workdir) / LATENCY_FILE
    self.table: dict[str, dict[str, dict[str, float]]] = (
        json.loads(self.path.read_text()) if self.path.exists() else {})

  def get(self, depth: notation.Depth, batch_size: int, backend: str | None = None
          ) -> float | None:
    row = self.table.get(backend or backend_key(), {}).get(notation.depth_name(depth), {})
    return row.get(f'batch_{batch_size}_ms')

  def put(self, depth: notation.Depth, batch_size: int, ms: float) -> None:
    row = self.table.setdefault(backend_key(), {}).setdefault(notation.depth_name(depth), {})
    row[f'batch_{batch_size}_ms'] = round(ms, 4)

  def measure(self, run: trained_run.TrainedRun, depth: notation.Depth, batch_stats,
              batch_size: int, repeats: int = 20, remeasure: bool = False) -> float:
    known = self.get(depth, batch_size)
    if known is None or remeasure:
      known = measure_latency(run, depth, batch_stats, batch_size, repeats)
      self.put(depth, batch_size, known)
    return known

  def save(self) -> None:
    file_io.atomic_write(str(self.path),
                         json.dumps(self.table, indent=2, sort_keys=True).encode())
