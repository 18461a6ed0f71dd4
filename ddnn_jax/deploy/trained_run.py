"""A trained run, loaded for evaluation and deployment: any depth, its batches, its accuracy.

``load_run`` reads a workdir's config, net and one checkpoint's variables (host arrays).
The depths a run trained keep the BN statistics they gathered; every other depth gets
statistics recalibrated on training images (``bn_calibration``); latencies are measured
and kept by ``latency``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from ddnn_jax.core import errors
from ddnn_jax.data import datasets, pipeline
from ddnn_jax.nn import architectures, models, notation
from ddnn_jax.training import checkpoints, config_lib, steps, workdir as workdir_lib


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
    blocks = sorted(enumerate_depths(self.full_depth),
                    key=lambda d: (-sum(d), tuple(-n for n in d)))
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
    return map_bn(shapes, lambda mean, var: {'mean': np.zeros(mean.shape, np.float32),
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


def batches_of(run: TrainedRun, split: str, batch_size: int,
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
    self._source = lambda: batches_of(run, split, batch_size, subset)
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


def map_bn(tree, fn):
  """Applies fn(mean, var) -> {'mean', 'var'} to every BatchNorm's statistics."""
  if isinstance(tree, dict) and set(tree) == {'mean', 'var'}:
    return fn(tree['mean'], tree['var'])
  return {k: map_bn(v, fn) for k, v in tree.items()}