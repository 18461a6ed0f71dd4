r"""Exports one depth of a trained run as a self-contained artifact.

  python -m ddnn_jax.export --workdir W --depth 2-2-2 --out DIR [--step N|best|latest] [--force]

DIR holds
  model.jax       ``jax.export`` serialized StableHLO of (variables, pixels) -> logits, with a
                  symbolic batch dimension; the dataset's normalisation is inside;
  variables.npz   only the parameters and BatchNorm statistics this depth uses
                  (recalibrated if the run did not train it), flat 'params/...' keys;
  metadata.json   depth, input shape and normalisation, class names, params, FLOPs,
                  accuracy, jax version.
Loading it needs exactly ``REQUIREMENTS`` (``LOADER`` below, also in the README): jax
(which brings jaxlib, numpy, ml_dtypes, opt_einsum and scipy) and flatbuffers, which
``jax.export`` deserialisation imports; nothing of ddnn_jax, flax or orbax (tested).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ddnn_jax import cli, deploy, errors, flops, inference, models, steps

# What a process loading an artifact imports, and what to pip install for it.
REQUIREMENTS = {
    'pip': ['jax>={version}', 'flatbuffers'],
    'imports': ['jax', 'jaxlib', 'numpy', 'ml_dtypes', 'opt_einsum', 'scipy', 'flatbuffers'],
    'note': ('jax.export artifacts load in this jax version and later ones (within '
             "jax.export's backward-compatibility window); jax itself brings jaxlib, "
             'numpy, ml_dtypes, opt_einsum and scipy'),
}

LOADER = '''\
import jax, numpy as np
exported = jax.export.deserialize(open('{out}/model.jax', 'rb').read())
variables = dict(np.load('{out}/variables.npz'))
logits = exported.call(variables, pixels)  # pixels: float32 [batch, H, W, C] in [0, 255]
'''


def export_depth(run: inference.TrainedRun, depth: models.Depth, batch_stats: dict[str, Any]
                 ) -> tuple[bytes, dict[str, np.ndarray]]:
  """(serialized StableHLO, flat variables) of ``depth``: pixels in [0, 255] -> logits."""
  scale, shift = run.normalization()
  flat = inference.flatten({'params': run.used_params(depth), 'batch_stats': batch_stats})

  def logits(variables: dict[str, jax.Array], pixels: jax.Array) -> jax.Array:
    tree = inference.unflatten(variables)
    images = pixels.astype(jnp.float32) * scale - shift  # As data.normalize does.
    return steps.depth_logits(run.model.apply, tree['params'], tree['batch_stats'], images,
                              depth)

  batch, = jax.export.symbolic_shape('batch')
  args = ({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()},
          jax.ShapeDtypeStruct((batch, *run.image_shape), jnp.float32))
  exported = jax.export.export(jax.jit(logits))(*args)
  return exported.serialize(), flat


def _error_on(run: inference.TrainedRun, depth: models.Depth) -> dict[str, float]:
  """Top-1 errors of ``depth`` from ``ddnn_jax.evaluate`` results at this step, by split."""
  found = {}
  for split in ('test', 'validation'):
    for row in deploy.read_rows(run.workdir, split):
      if deploy.row_depth(row) == depth and int(row['step']) == run.step:
        found[split] = float(row['top1_error'])
  return found


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog='python -m ddnn_jax.export',
                              description=__doc__.split('\n\n')[0])
  deploy.add_run_flags(parser)
  parser.add_argument('--depth', required=True, help='the depth to export, e.g. 2-2-2 or resnet32')
  parser.add_argument('--out', required=True, help='directory to write (new or empty)')
  parser.add_argument('--force', action='store_true', help='replace a non-empty --out')
  parser.add_argument('--calib_examples', type=cli.positive_int,
                      default=inference.DEFAULT_CALIB_EXAMPLES,
                      help='training images to recalibrate BN of a depth the run did not train')
  args = parser.parse_args(argv)
  out = os.path.abspath(args.out)
  if os.path.exists(out) and not os.path.isdir(out):
    raise errors.UsageError(f'--out {out} exists and is not a directory')
  if os.path.isdir(out) and os.listdir(out) and not args.force:
    raise errors.UsageError(f'--out {out} exists and is not empty (use --force to replace '
                                'it)')
  run = inference.load_run(args.workdir, args.step)
  depth = run.resolve(args.depth)

  stats, recalibrated = inference.stats_for(run, depth, args.calib_examples)
  serialized, variables = export_depth(run, depth, stats)
  size = flops.profile_subnet(run.model, run.image_shape, depth)
  scale, shift = run.normalization()
  metadata = {
      'depth': list(depth), 'depth_name': models.depth_name(depth),
      'arch': run.config.model.arch, 'name': models.depth_label(run.config.model.arch, depth),
      'dataset': run.config.data.dataset, 'workdir': os.path.abspath(run.workdir),
      'step': run.step, 'batch_norm': 'recalibrated' if recalibrated else 'trained',
      'input': {'shape': ['batch', *run.image_shape], 'dtype': 'float32',
                'pixels': 'in [0, 255]; normalised inside the model as pixels * scale - shift',
                'mean': list(run.spec.mean), 'std': list(run.spec.std),
                'scale': scale.tolist(), 'shift': shift.tolist()},
      'output': {'logits': ['batch', run.spec.num_classes]},
      'class_names': list(run.class_names()),
      'params': size.params, 'flops': size.flops,
      'top1_error': _error_on(run, depth),
      'jax_version': jax.__version__,
      'requirements': {**REQUIREMENTS,
                       'pip': [r.format(version=jax.__version__) for r in REQUIREMENTS['pip']]},
      'loader': LOADER.format(out=out),
  }
  # Written next to --out and renamed into place: never a half-written artifact.
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix='.export-', dir=parent)
  os.chmod(staging, 0o755)  # mkdtemp makes it private.
  try:
    epath.Path(staging, 'model.jax').write_bytes(serialized)
    buf = io.BytesIO()
    np.savez(buf, **variables)
    epath.Path(staging, 'variables.npz').write_bytes(buf.getvalue())
    epath.Path(staging, 'metadata.json').write_text(json.dumps(metadata, indent=2))
    if os.path.isdir(out):
      shutil.rmtree(out)
    os.rename(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  sizes = {name: os.path.getsize(os.path.join(out, name))
           for name in ('model.jax', 'variables.npz', 'metadata.json')}
  print(f'exported {models.format_depth(depth)} ({size.params:,} params, '
        f'{size.flops / 1e6:.2f}M FLOPs, BN {metadata["batch_norm"]}) to {out}: ' +
        ', '.join(f'{name} {n / 1024:.1f} KiB' for name, n in sizes.items()))
  print(f'load it with {" and ".join(metadata["requirements"]["pip"])} installed '
        '(nothing of ddnn_jax):\n' + LOADER.format(out=out))


if __name__ == '__main__':
  cli.run(main)
