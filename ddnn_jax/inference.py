"""A trained run, loaded for evaluation and deployment: any depth, its BatchNorm statistics,
its accuracy and its latency.

The depths a run trained keep the BN statistics they gathered. Any other depth of the
net (there are prod(n_i) of them) gets statistics *recalibrated* on training images:
the exact mean and variance of every BatchNorm input over the calibration set, with the
layers before it normalised by each calibration batch's own statistics (as in training,
and as once-for-all's BN recalibration). With one batch holding the whole calibration
set, evaluation then sees exactly the statistics it normalises with.
"""

from __future__ import annotations

import dataclasses
import io
import json
import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from ddnn_jax.core import errors, file_io
from ddnn_jax.data import datasets, pipeline
from ddnn_jax.nn import architectures, models, notation
from ddnn_jax.training import checkpoints, config_lib, steps, workdir as workdir_lib

LATENCY_FILE = 'latency.json'
CALIBRATION_DIR = 'bn_calibration'
DEFAULT_CALIB_EXAMPLES = 2000
DEFAULT_CALIB_BATCH = 500


@dataclasses.dataclass
class TrainedRun:
  """A run's config, net and one checkpoint's variables (host arrays)."""
  workdir: str
  config: ml_collections.ConfigDict
  model: models.DDNN
  spec: datasets.DatasetSpec
  image_shape: tuple[int, int, int]
  step: int
  params: dict[str, Any]
  batch_stats: dict[str, Any]  # depth_name -> statistics, for the depths the run trained
  trained_depths: tuple[notation.Depth, ...]
  facts: dict[str, Any] | None = None  # workdir/dataset.json (None: a run from before it).

  @property
  def full_depth(self) -> notation.Depth:
    return self.model.stage_sizes

  def is_trained(self, depth: notation.Depth) -> bool:
    return notation.depth_name(depth) in self.batch_stats

  @property
  def widths(self) -> tuple[float, ...]:
    """The width multipliers the run's net has (model.widths), widest first."""
    return tuple(sorted(self.config.model.get('widths', (1.0,)), reverse=True))

  def resolve(self, spec: notation.DepthSpec) -> notation.Depth:
    """A depth of this net from a name ('resnet32'), text ('2-2-1', '2-2-1@0.5') or block
    counts, at one of the run's widths."""
    try:
      if isinstance(spec, str):
        spec = notation.parse_depth(spec)
      depth = architectures.resolve_depth(spec, self.config.model.arch)
    except ValueError as err:
      raise errors.UsageError(str(err)) from None
    if notation.width_of(depth) not in self.widths:
      raise errors.UsageError(
          f'depth {notation.format_depth(depth)}: width {notation.width_of(depth):g} is not one of '
          f'the run\'s model.widths ({", ".join(f"{w:g}" for w in self.widths)})')
    return depth

  def all_depths(self) -> list[notation.Depth]:
    """Every depth configuration of the net at every width: the full net first, then
    fewer blocks, then the same at each narrower width."""
    blocks = sorted(enumerate_depths(self.full_depth), key=lambda d: (-sum(d), tuple(-n for n in d)))
    return [notation.subnet(d, w) for w in self.widths for d in blocks]

  def used_params(self, depth: notation.Depth) -> dict[str, Any]:
    """The parameters ``depth`` runs: the full net's tree without the skipped blocks, and
    at a narrower width only the channels it runs (the leading ones of every layer)."""
    return models.select_used(self.params, self._shapes(depth)['params'])

  def _shapes(self, depth: notation.Depth):
    return models.variable_shapes(self.model, self.image_shape, depth)

  def full_net_stats(self, depth: notation.Depth) -> dict[str, Any] | None:
    """The full net's BN statistics of the modules ``depth`` runs (what a depth would be
    evaluated with if it were not recalibrated), or None if the run did not train it."""
    full = self.batch_stats.get(notation.depth_name(self.full_depth))
    if full is None or notation.width_of(depth) != 1.0:
      return None  # (Other widths normalise other channels.)
    return models.select_used(full, self._shapes(depth)['batch_stats'])

  def placeholder_stats(self, depth: notation.Depth) -> dict[str, Any]:
    """BN statistics of the right shapes for ``depth`` (zero means, unit variances)."""
    shapes = self._shapes(depth)['batch_stats']
    return _map_bn(shapes, lambda mean, var: {'mean': np.zeros(mean.shape, np.float32),
                                              'var': np.ones(var.shape, np.float32)})

  def class_names(self) -> tuple[str, ...]:
    """The label names the run trained with (from its dataset.json; older runs: from the
    data, if present), else the class indices as strings."""
    names = tuple(self.facts['class_names']) if self.facts else _class_names(self.config)
    return names if len(names) == self.spec.num_classes else tuple(
        str(i) for i in range(self.spec.num_classes))

  def normalization(self) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel: pixels in [0, 255] are fed as pixels * scale - shift."""
    if self.facts:
      norm = self.facts['normalization']
      return np.asarray(norm['scale'], np.float32), np.asarray(norm['shift'], np.float32)
    return self.spec.normalization()


def enumerate_depths(full: notation.Depth) -> list[notation.Depth]:
  return [tuple(int(n) for n in depth) for depth in np.ndindex(*full)
          for depth in [tuple(i + 1 for i in depth)]]


def _class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  try:
    data_dir = pipeline.ensure_prepared(config.data.dataset, config.data.data_dir, None)
    return pipeline.get_dataset_info(config.data.dataset, data_dir,
                                     config.data.image_size).class_names
  except (pipeline.DataError, ValueError):
    return ()


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / workdir_lib.CONFIG_FILE
  if not path.exists():
    raise errors.UsageError(f'{workdir} is not a ddnn_jax workdir (no {path.name}): give '
                            'the --workdir of a python -m ddnn_jax.main run')
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (OSError, ValueError) as err:
    raise errors.UsageError(f'cannot read {path}: {err}') from None


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the images a run's net takes."""
  spec = datasets.get(config.data.dataset)
  size = config.data.image_size or spec.image_size
  return (size, size, spec.image_shape[2])


def load_run(workdir: str, step: str | int = 'latest') -> TrainedRun:
  """The run in ``workdir`` at a checkpoint: 'latest', 'best' or a step number."""
  config = load_config(workdir)
  step, params, batch_stats = checkpoints.restore_variables(workdir, step)
  trained = tuple(d for d in config_lib.depths_of(config) if notation.depth_name(d) in batch_stats)
  return TrainedRun(str(workdir), config, config_lib.model_from_config(config),
                    datasets.get(config.data.dataset), input_shape(config), step, params,
                    batch_stats, trained, workdir_lib.read_dataset_facts(workdir))


# --- inference of one depth ----------------------------------------------------------


def logits_fn(model: models.DDNN, depth: notation.Depth):
  """Jitted ``(params, batch_stats, normalised images) -> logits`` of one depth."""
  return jax.jit(lambda params, stats, images: steps.depth_logits(
      model.apply, params, stats, images, depth))


def require_data(run: TrainedRun, what: str) -> str:
  """The run's tfds data_dir; a one-line DataError saying that ``what`` needs the data if
  it is not there (a copied workdir predicts and exports without it, but evaluating a
  split or recalibrating BN statistics reads images)."""
  try:
    return pipeline.ensure_prepared(run.config.data.dataset, run.config.data.data_dir, None)
  except errors.DataError as err:
    raise errors.DataError(f'{what} needs the run\'s data: {err}') from None


def _batches(run: TrainedRun, split: str, batch_size: int,
             subset: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  config = run.config
  data_dir = require_data(run, f'the {split} split')
  try:
    yield from pipeline.create_eval_iterator(
        config.data.dataset, data_dir, global_batch_size=batch_size,
        image_size=config.data.image_size, subset=subset, split=split,
        validation_examples=config.data.validation_examples)
  except ValueError as err:
    raise errors.UsageError(str(err)) from None


class SplitCache:
  """A split's eval batches, read once and kept in memory when they fit (for searches
  that evaluate hundreds of depths on the same images)."""

  def __init__(self, run: TrainedRun, split: str, batch_size: int, subset: int | None = None,
               max_bytes: int = 1 << 30):
    self._source = lambda: _batches(run, split, batch_size, subset)
    size = subset or (run.config.data.validation_examples if split == 'validation' else None)
    per_image = 4 * int(np.prod(run.image_shape))
    self._cached: list[dict[str, np.ndarray]] | None = None
    self._keep = size is not None and size * per_image <= max_bytes

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    if self._cached is not None:
      return iter(self._cached)
    if not self._keep:
      return self._source()
    self._cached = list(self._source())
    return iter(self._cached)


def accuracy(run: TrainedRun, depth: notation.Depth, batch_stats, batches: Iterable[dict]
             ) -> float:
  """Top-1 accuracy of ``depth`` with ``batch_stats`` over ``batches`` (padding masked)."""
  apply = logits_fn(run.model, depth)
  params = jax.device_put(run.used_params(depth))
  stats = jax.device_put(batch_stats)
  correct = count = 0.0
  for batch in batches:
    logits = np.asarray(apply(params, stats, batch['image']))
    mask = batch.get('mask', np.ones(len(batch['label']), np.float32))
    correct += float(np.sum((logits.argmax(-1) == batch['label']) * mask))
    count += float(np.sum(mask))
  return correct / count


# --- BatchNorm recalibration -----------------------------------------------------------


def recalibrate(run: TrainedRun, depth: notation.Depth, batches: Iterable[dict]) -> dict[str, Any]:
  """Exact BatchNorm statistics of ``depth`` over the calibration ``batches``.

  Each batch runs in train mode; every BatchNorm's batch mean and variance are
  combined over all batches, weighted by their sizes, into the mean and variance of the
  whole set (E[x^2] - E[x]^2, not an average of variances, and not a running average).
  Only statistics come out: the parameters are not touched.
  """
  moments_fn = jax.jit(lambda params, images: run.model.apply(
      {'params': params}, images, (depth,), method=models.DDNN.batch_moments,
      mutable=['batch_stats'])[0][1][0])
  params = jax.device_put(run.used_params(depth))
  total, sums = 0, None
  for batch in batches:
    images = batch['image'][batch['mask'] > 0] if 'mask' in batch else batch['image']
    if not len(images):
      continue
    moments = jax.device_get(moments_fn(params, images))
    n = len(images)
    # Per BatchNorm: n * mean and n * E[x^2] (E[x^2] = var + mean^2), summed over batches.
    weighted = _map_bn(moments, lambda mean, var: {'mean': n * mean.astype(np.float64),
                                                   'var': n * (var + np.square(mean)).astype(
                                                       np.float64)})
    sums = weighted if sums is None else jax.tree.map(np.add, sums, weighted)
    total += n
  if not total:
    raise errors.UsageError('no calibration images')
  return _map_bn(sums, lambda s1, s2: {
      'mean': (s1 / total).astype(np.float32),
      'var': np.maximum(s2 / total - np.square(s1 / total), 0.0).astype(np.float32)})


def _map_bn(tree, fn):
  """Applies fn(mean, var) -> {'mean', 'var'} to every BatchNorm's statistics."""
  if isinstance(tree, dict) and set(tree) == {'mean', 'var'}:
    return fn(tree['mean'], tree['var'])
  return {k: _map_bn(v, fn) for k, v in tree.items()}


def calibration_batches(run: TrainedRun, examples: int, batch_size: int = DEFAULT_CALIB_BATCH
                        ) -> list[dict[str, np.ndarray]]:
  """``examples`` training images (not held out, not augmented), in a fixed random order."""
  return list(_batches(run, 'calibration', min(batch_size, examples), subset=examples))


def _calibration_path(run: TrainedRun, depth: notation.Depth, examples: int) -> epath.Path:
  return (epath.Path(run.workdir) / CALIBRATION_DIR / str(run.step) /
          f'{notation.depth_name(depth)}-{examples}.npz')


def stats_for(run: TrainedRun, depth: notation.Depth, calib_examples: int = DEFAULT_CALIB_EXAMPLES,
              batches: Sequence[dict] | None = None) -> tuple[dict[str, Any], bool]:
  """(BatchNorm statistics of ``depth``, whether they were recalibrated).

  A trained depth has its own. Any other is recalibrated once per checkpoint and kept in
  ``workdir/bn_calibration/<step>/`` (so deployment needs no data afterwards).
  """
  name = notation.depth_name(depth)
  if name in run.batch_stats:
    return run.batch_stats[name], False
  path = _calibration_path(run, depth, calib_examples)
  if path.exists():
    with path.open('rb') as f:
      return unflatten(dict(np.load(f))), True
  stats = recalibrate(run, depth, batches if batches is not None else
                      calibration_batches(run, calib_examples))
  path.parent.mkdir(parents=True, exist_ok=True)
  _atomic_npz(path, flatten(stats))
  return stats, True


def flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, np.ndarray]:
  """{'a': {'b': x}} -> {'a/b': x}: the layout of .npz files."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}/'))
    else:
      flat[f'{prefix}{key}'] = np.asarray(value)
  return flat


def unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    *path, leaf = key.split('/')
    node = tree
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _atomic_npz(path: epath.Path, arrays: dict[str, np.ndarray]) -> None:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  file_io.atomic_write(str(path), buf.getvalue())


# --- latency ---------------------------------------------------------------------------


def backend_key() -> str:
  """Where latencies were measured: the jax backend and device kind, e.g. 'cpu' or
  'gpu:NVIDIA H100 80GB HBM3'."""
  device = jax.devices()[0]
  kind = device.device_kind
  return device.platform if kind.lower() == device.platform else f'{device.platform}:{kind}'


def measure_latency(run: TrainedRun, depth: notation.Depth, batch_stats, batch_size: int,
                    repeats: int = 20, warmup: int = 3) -> float:
  """Median milliseconds of ``repeats`` timed calls at ``batch_size``, after warm-up calls
  (the first compiles), on the current backend."""
  apply = logits_fn(run.model, depth)
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

  def measure(self, run: TrainedRun, depth: notation.Depth, batch_stats, batch_size: int,
              repeats: int = 20, remeasure: bool = False) -> float:
    known = self.get(depth, batch_size)
    if known is None or remeasure:
      known = measure_latency(run, depth, batch_stats, batch_size, repeats)
      self.put(depth, batch_size, known)
    return known

  def save(self) -> None:
    file_io.atomic_write(str(self.path),
                         json.dumps(self.table, indent=2, sort_keys=True).encode())
