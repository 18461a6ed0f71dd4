"""``DynamicModel``: one shared parameter tree, any of its depths at run time.

  model = ddnn_jax.DynamicModel.load('/tmp/ddnn', depths='trained')
  prediction = model.predict(pixels, depth=(2, 2, 2))    # or latency_ms=1.0
  prediction.probabilities, prediction.depth
  prediction = model.predict(pixels, cascade='/tmp/ddnn/cascade/chosen.json')
  prediction.exit_depths                                 # the depth that answered, per image

Each depth has its own compiled apply (``steps.depth_logits``, as evaluation uses) over
the one parameter tree and its own BatchNorm statistics; switching depth picks another
compiled function and never recompiles or reloads (a second trace of a depth raises).
``latency_ms`` picks the most accurate depth, by the accuracy ``ddnn_jax.evaluate``
measured, whose measured batch-1 latency on this backend fits. ``cascade`` runs a
confidence cascade for real (``early_exit.Executor``): each image stops at the first depth
confident enough.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ddnn_jax.core import errors
from ddnn_jax.deploy import bn_calibration, early_exit, evaluation, latency, trained_run
from ddnn_jax.nn import notation
from ddnn_jax.training import steps


@dataclasses.dataclass(frozen=True)
class Prediction:
  probabilities: np.ndarray  # [batch, classes]
  depth: notation.Depth | None  # The depth that ran (None for a cascade: see exit_depths).
  # A cascade: per input, the depth that answered it (its probabilities are calibrated at
  # that depth's temperature).
  exit_depths: tuple[notation.Depth, ...] | None = None

  def top(self, k: int = 5) -> list[list[tuple[int, float]]]:
    """Per image, the k most probable (class index, probability), most probable first."""
    order = np.argsort(-self.probabilities, axis=-1)[:, :k]
    return [[(int(c), float(p[c])) for c in row] for row, p in zip(order, self.probabilities)]


def choose(run: trained_run.TrainedRun, depths: Sequence[notation.Depth],
           error_rates: dict[notation.Depth, float], latencies: dict[notation.Depth, float],
           latency_ms: float) -> notation.Depth:
  """The most accurate of ``depths`` whose batch-1 latency is within ``latency_ms``."""
  known = [d for d in depths if d in error_rates and d in latencies]
  if not known:
    raise errors.UsageError(
        f'no depth of {run.workdir} has both an evaluated accuracy and a measured latency on '
        f'{latency.backend_key()}: run python -m ddnn_jax.evaluate on it first')
  fitting = [d for d in known if latencies[d] <= latency_ms]
  if not fitting:
    fastest = min(known, key=latencies.get)
    raise errors.UsageError(
        f'no depth runs within {latency_ms:g} ms: the fastest, {notation.format_depth(fastest)}, '
        f'takes {latencies[fastest]:.2f} ms at batch 1 on {latency.backend_key()}')
  return min(fitting, key=lambda d: (error_rates[d], latencies[d]))


class DynamicModel:
  """A trained run's depths, each ready to run, over one parameter tree."""

  def __init__(self, run: trained_run.TrainedRun, depths: Sequence[notation.Depth],
               batch_stats: dict[notation.Depth, Any], error_rates: dict[notation.Depth, float],
               latencies: dict[notation.Depth, float], batch_size: int,
               calib_examples: int = bn_calibration.DEFAULT_CALIB_EXAMPLES):
    self.run = run
    self.depths = tuple(depths)
    self.batch_size = batch_size
    self.class_names = run.class_names()
    self.errors = error_rates  # Evaluated top-1 error (%) of the depths that have one.
    self.latencies = latencies  # Measured ms at batch 1 on this backend.
    self._params = jax.device_put(run.params)  # The one shared tree.
    self._stats = {d: jax.device_put(batch_stats[d]) for d in self.depths}
    self._scale, self._shift = run.normalization()
    self._guards = {d: steps.trace_guard(
        lambda params, stats, images, d=d: steps.depth_logits(
            run.model.apply, params, stats, images, d),
        1, f'depth {notation.format_depth(d)}') for d in self.depths}
    self._apply = {d: jax.jit(guard) for d, guard in self._guards.items()}
    self._executors: dict[early_exit.Cascade, early_exit.Executor] = {}
    self._calib_examples = calib_examples

  @property
  def traces(self) -> dict[notation.Depth, int]:
    """How many times each depth's apply was compiled (at most once)."""
    return {d: guard.traces for d, guard in self._guards.items()}

  @classmethod
  def load(cls, workdir: str, depths: str | Sequence[notation.DepthSpec] = 'trained',
           step: str | int = 'latest', batch_size: int = 1,
           calib_examples: int = bn_calibration.DEFAULT_CALIB_EXAMPLES) -> DynamicModel:
    """Loads ``workdir``'s checkpoint (``step``) with ``depths``: 'trained', 'all',
    'evaluated' (those with an accuracy and a latency, for ``latency_ms``) or a list of
    depths (names or block counts); untrained ones get recalibrated BN statistics.

    ``predict`` runs the images in batches of ``batch_size`` (the last one padded), so
    each depth compiles once. Accuracies come from ``evaluate`` results of this step
    (validation split first); latencies from ``workdir/latency.json`` on this backend.
    """
    run = trained_run.load_run(workdir, step)
    error_rates, latencies = evaluation.measured(run)
    if depths == 'evaluated':
      chosen = [d for d in run.all_depths() if d in error_rates and d in latencies]
    elif isinstance(depths, str):
      chosen = evaluation.parse_depths(run, depths)
    else:
      chosen = list(dict.fromkeys(run.resolve(d) for d in depths))
    if not chosen:
      raise errors.UsageError(f'no depths to load from {workdir}' + (
          ': none has an evaluated accuracy and latency (run python -m ddnn_jax.evaluate)'
          if depths == 'evaluated' else ''))
    stats = {d: bn_calibration.stats_for(run, d, calib_examples)[0] for d in chosen}
    return cls(run, chosen, stats, {d: error_rates[d] for d in chosen if d in error_rates},
               {d: latencies[d] for d in chosen if d in latencies}, batch_size, calib_examples)

  def choose(self, latency_ms: float) -> notation.Depth:
    """The most accurate loaded depth whose measured batch-1 latency is within ``latency_ms``."""
    return choose(self.run, self.depths, self.errors, self.latencies, latency_ms)

  def logits(self, pixels: np.ndarray, depth: notation.DepthSpec) -> np.ndarray:
    """Logits [batch, classes] of ``depth`` for images [batch, H, W, C] of pixels in
    [0, 255] (uint8 or float), normalised here as in training."""
    depth = self.run.resolve(depth)
    if depth not in self._apply:
      raise errors.UsageError(f'depth {notation.format_depth(depth)} was not loaded; loaded: '
                                  f'{", ".join(map(notation.format_depth, self.depths))}')
    pixels = np.asarray(pixels)
    if pixels.ndim != 4 or pixels.shape[1:] != self.run.image_shape:
      raise ValueError(f'images must be [batch, {", ".join(map(str, self.run.image_shape))}], '
                       f'got {list(pixels.shape)}')
    images = pixels.astype(np.float32) * self._scale - self._shift
    n = len(images)
    padded = -(-n // self.batch_size) * self.batch_size
    images = np.concatenate([images, np.zeros((padded - n, *images.shape[1:]), np.float32)])
    apply = self._apply[depth]
    out = [np.asarray(apply(self._params, self._stats[depth], images[i:i + self.batch_size]))
           for i in range(0, padded, self.batch_size)]
    return np.concatenate(out)[:n]

  def cascade_executor(self, cascade: str | dict | early_exit.Cascade) -> early_exit.Executor:
    """The real early exit of a cascade (a ``chosen.json`` path, its dict, or a Cascade)
    over this model's parameter tree, compiled once and kept."""
    if isinstance(cascade, str):
      cascade = early_exit.read_chosen(cascade, self.run)
    elif isinstance(cascade, dict):
      cascade = early_exit.from_json(cascade, self.run)
    if cascade not in self._executors:
      stats = {d: bn_calibration.stats_for(self.run, d, self._calib_examples)[0]
               for d in cascade.depths}
      self._executors[cascade] = early_exit.Executor(self.run, cascade, stats, self.batch_size)
    return self._executors[cascade]

  def predict(self, pixels: np.ndarray, depth: notation.DepthSpec | None = None,
              latency_ms: float | None = None,
              cascade: str | dict | early_exit.Cascade | None = None) -> Prediction:
    """Class probabilities from ``depth``, from the best depth within ``latency_ms``, or
    per input from a ``cascade`` (default: the full net if loaded, else the deepest)."""
    if sum(x is not None for x in (depth, latency_ms, cascade)) > 1:
      raise ValueError('give one of depth, latency_ms and cascade')
    if cascade is not None:
      executor = self.cascade_executor(cascade)
      pixels = np.asarray(pixels)
      if pixels.ndim != 4 or pixels.shape[1:] != self.run.image_shape:
        raise ValueError(f'images must be [batch, {", ".join(map(str, self.run.image_shape))}]'
                         f', got {list(pixels.shape)}')
      logits, stage = executor.predict(pixels)
      temps = np.asarray(executor.cascade.temperatures)[stage][:, None]
      return Prediction(early_exit.softmax(logits / temps), None,
                        tuple(executor.cascade.depths[k] for k in stage))
    if latency_ms is not None:
      depth = self.choose(latency_ms)
    elif depth is None:
      depth = max(self.depths, key=lambda d: (d == self.run.full_depth, sum(d)))
    depth = self.run.resolve(depth)
    logits = self.logits(pixels, depth)
    return Prediction(np.asarray(jax.nn.softmax(logits, axis=-1)), depth)
