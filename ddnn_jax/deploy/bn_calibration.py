"""BatchNorm statistics for depths a run did not train: recalibrated on training images.

Any depth of the net a run did not train (there are prod(n_i) of them) gets statistics
*recalibrated* on training images: the exact mean and variance of every BatchNorm input
over the calibration set, with the layers before it normalised by each calibration
batch's own statistics (as in training, and as once-for-all's BN recalibration). With one
batch holding the whole calibration set, evaluation then sees exactly the statistics it
normalises with. They are kept per checkpoint in ``W/bn_calibration/<step>/``.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from ddnn_jax.core import errors, file_io
from ddnn_jax.deploy import trained_run
from ddnn_jax.nn import models, notation

CALIBRATION_DIR = 'bn_calibration'
DEFAULT_CALIB_EXAMPLES = 2000
DEFAULT_CALIB_BATCH = 500


# --- BatchNorm recalibration -----------------------------------------------------------


def recalibrate(run: trained_run.TrainedRun, depth: notation.Depth, batches: Iterable[dict]
                ) -> dict[str, Any]:
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
    weighted = trained_run.map_bn(moments, lambda mean, var: {'mean': n * mean.astype(np.float64),
                                                   'var': n * (var + np.square(mean)).astype(
                                                       np.float64)})
    sums = weighted if sums is None else jax.tree.map(np.add, sums, weighted)
    total += n
  if not total:
    raise errors.UsageError('no calibration images')
  return trained_run.map_bn(sums, lambda s1, s2: {
      'mean': (s1 / total).astype(np.float32),
      'var': np.maximum(s2 / total - np.square(s1 / total), 0.0).astype(np.float32)})


def calibration_batches(run: trained_run.TrainedRun, examples: int,
                        batch_size: int = DEFAULT_CALIB_BATCH) -> list[dict[str, np.ndarray]]:
  """``examples`` training images (not held out, not augmented), in a fixed random order."""
  return list(trained_run.batches_of(run, 'calibration', min(batch_size, examples),
                                     subset=examples))


def _calibration_path(run: trained_run.TrainedRun, depth: notation.Depth, examples: int
                      ) -> epath.Path:
  return (epath.Path(run.workdir) / CALIBRATION_DIR / str(run.step) /
          f'{notation.depth_name(depth)}-{examples}.npz')


def stats_for(run: trained_run.TrainedRun, depth: notation.Depth,
              calib_examples: int = DEFAULT_CALIB_EXAMPLES, batches: Sequence[dict] | None = None
              ) -> tuple[dict[str, Any], bool]:
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
