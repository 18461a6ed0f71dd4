"""Exported artifacts: a depth or a cascade as jax.export files that need no ddnn_jax.

A depth is ``model.jax`` (its serialized inference function, BN folded in as the run
computes it), ``variables.npz`` and ``metadata.json``; a cascade is one such directory per
stage and ``cascade.json`` (thresholds, temperatures, the score). ``LOADER`` and
``CASCADE_LOADER`` are the few lines that load them with jax and numpy alone.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ddnn_jax.deploy import bn_calibration, early_exit, evaluation, trained_run
from ddnn_jax.nn import architectures, flops, models, notation
from ddnn_jax.training import steps

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

CASCADE_LOADER = '''\
import json, jax, numpy as np
spec = json.load(open('{out}/cascade.json'))
stages = [(jax.export.deserialize(open(f"{out}/{{s['dir']}}/model.jax", 'rb').read()),
           dict(np.load(f"{out}/{{s['dir']}}/variables.npz"))) for s in spec['stages']]

def confidence(logits, temperature, score):  # In [0, 1]; higher: more confident.
  z = logits.astype(np.float64) / temperature
  p = np.exp(z - z.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
  if score == 'maxprob': return p.max(-1)
  if score == 'margin': top = np.sort(p, -1); return top[:, -1] - top[:, -2]
  h = -np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300)), 0.0), -1)
  return np.clip(1 - h / np.log(p.shape[-1]), 0.0, 1.0)

def classify(pixels):  # float32 [batch, H, W, C] in [0, 255] -> (logits, exit stage)
  logits_out = np.zeros((len(pixels), spec['num_classes']), np.float32)
  stage_out = np.full(len(pixels), len(stages) - 1)
  alive, x = np.arange(len(pixels)), pixels
  for k, ((model, variables), stage) in enumerate(zip(stages, spec['stages'])):
    out = model.call(variables, x)
    logits, handed = (np.asarray(out[0]), np.asarray(out[1])) if stage['hands_on'] else (
        np.asarray(out), None)
    if k == len(stages) - 1:
      logits_out[alive] = logits
      break
    t = spec['thresholds'][k]
    stop = (confidence(logits, spec['temperatures'][k], spec['score']) >= t) & (t < 1)
    logits_out[alive[stop]], stage_out[alive[stop]] = logits[stop], k
    alive = alive[~stop]
    if not len(alive):
      break
    x = handed[~stop] if spec['stages'][k + 1]['input'] == 'previous' else pixels[alive]
  return logits_out, stage_out
'''


def export_stage(run: trained_run.TrainedRun, depth: notation.Depth, batch_stats: dict[str, Any],
                 resume_at: int = 0, capture_at: int = 0) -> tuple[bytes, dict[str, np.ndarray]]:
  """(serialized StableHLO, flat variables) of ``depth`` as a cascade stage
  (``DDNN.cascade_stage``): from pixels in [0, 255] (normalised inside), or with
  ``resume_at`` from the previous stage's output; to logits, and with ``capture_at`` also
  the output the next stage continues from. Defaults: one depth, pixels -> logits."""
  scale, shift = run.normalization()
  flat = bn_calibration.flatten({'params': run.used_params(depth), 'batch_stats': batch_stats})

  def stage(variables: dict[str, jax.Array], x: jax.Array):
    tree = bn_calibration.unflatten(variables)
    v = {'params': tree['params'], 'batch_stats': tree['batch_stats']}
    if not resume_at:
      x = x.astype(jnp.float32) * scale - shift  # As data.normalize does.
    if not resume_at and not capture_at:
      return steps.depth_logits(run.model.apply, v['params'], v['batch_stats'], x, depth)
    logits, handed = run.model.apply(v, x, depth, resume_at, capture_at,
                                     method=models.DDNN.cascade_stage)
    return (logits, handed) if capture_at else logits

  batch, = jax.export.symbolic_shape('batch')
  shape = run.image_shape if not resume_at else _handed_shape(run, depth, resume_at)
  args = ({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()},
          jax.ShapeDtypeStruct((batch, *shape), jnp.float32))
  exported = jax.export.export(jax.jit(stage))(*args)
  return exported.serialize(), flat


def export_depth(run: trained_run.TrainedRun, depth: notation.Depth, batch_stats: dict[str, Any]
                 ) -> tuple[bytes, dict[str, np.ndarray]]:
  """(serialized StableHLO, flat variables) of ``depth``: pixels in [0, 255] -> logits."""
  return export_stage(run, depth, batch_stats)


def _handed_shape(run: trained_run.TrainedRun, depth: notation.Depth, module: int):
  """(H, W, C) of ``depth``'s output of its module number ``module``."""
  variables = models.variable_shapes(run.model, run.image_shape, depth)
  image = jax.ShapeDtypeStruct((1, *run.image_shape), jnp.float32)
  _, handed = jax.eval_shape(lambda v, x: run.model.apply(
      v, x, depth, 0, module, method=models.DDNN.cascade_stage), variables, image)
  return handed.shape[1:]


def _error_on(run: trained_run.TrainedRun, depth: notation.Depth) -> dict[str, float]:
  """Top-1 errors of ``depth`` from ``ddnn_jax.evaluate`` results at this step, by split."""
  found = {}
  for split in ('test', 'validation'):
    for row in evaluation.read_rows(run.workdir, split):
      if evaluation.row_depth(row) == depth and int(row['step']) == run.step:
        found[split] = float(row['top1_error'])
  return found


def requirements() -> dict[str, Any]:
  return {**REQUIREMENTS, 'pip': [r.format(version=jax.__version__) for r in REQUIREMENTS['pip']]}


def _input_metadata(run: trained_run.TrainedRun) -> dict[str, Any]:
  scale, shift = run.normalization()
  return {'shape': ['batch', *run.image_shape], 'dtype': 'float32',
          'pixels': 'in [0, 255]; normalised inside the model as pixels * scale - shift',
          'mean': list(run.spec.mean), 'std': list(run.spec.std),
          'scale': scale.tolist(), 'shift': shift.tolist()}


def depth_metadata(run: trained_run.TrainedRun, depth: notation.Depth, recalibrated: bool,
                   loader: str) -> dict[str, Any]:
  size = flops.profile_subnet(run.model, run.image_shape, depth)
  return {
      'depth': list(depth), 'depth_name': notation.depth_name(depth),
      'arch': run.config.model.arch,
      'name': architectures.depth_label(run.config.model.arch, depth),
      'dataset': run.config.data.dataset, 'workdir': os.path.abspath(run.workdir),
      'step': run.step, 'batch_norm': 'recalibrated' if recalibrated else 'trained',
      'input': _input_metadata(run),
      'output': {'logits': ['batch', run.spec.num_classes]},
      'class_names': list(run.class_names()),
      'params': size.params, 'flops': size.flops,
      'top1_error': _error_on(run, depth),
      'jax_version': jax.__version__, 'requirements': requirements(), 'loader': loader,
  }


def write_artifact(directory: str, serialized: bytes, variables: dict[str, np.ndarray],
                    metadata: dict[str, Any]) -> None:
  os.makedirs(directory, exist_ok=True)
  epath.Path(directory, 'model.jax').write_bytes(serialized)
  buf = io.BytesIO()
  np.savez(buf, **variables)
  epath.Path(directory, 'variables.npz').write_bytes(buf.getvalue())
  epath.Path(directory, 'metadata.json').write_text(json.dumps(metadata, indent=2))


def write_cascade(run: trained_run.TrainedRun, cascade: early_exit.Cascade, chosen: dict,
                   calib_examples: int, staging: str, out: str) -> str:
  plan = early_exit.stage_plan(run.model.arch, cascade.depths, cascade.trunk)
  stages = []
  for k, (depth, (resume, capture)) in enumerate(zip(cascade.depths, plan)):
    stats, recalibrated = bn_calibration.stats_for(run, depth, calib_examples)
    serialized, variables = export_stage(run, depth, stats, resume, capture)
    metadata = depth_metadata(run, depth, recalibrated, CASCADE_LOADER.format(out=out))
    metadata['cascade_stage'] = {'index': k, 'input': 'previous' if resume else 'pixels',
                                 'hands_on': bool(capture), 'resumes_after_module': resume}
    write_artifact(os.path.join(staging, f'stage{k}'), serialized, variables, metadata)
    stages.append({'dir': f'stage{k}', 'depth': notation.format_depth(depth),
                   'input': 'previous' if resume else 'pixels', 'hands_on': bool(capture),
                   'flops': metadata['flops']})
  spec = {**early_exit.to_json(cascade, run), 'stages': stages,
          'num_classes': run.spec.num_classes, 'class_names': list(run.class_names()),
          'input': _input_metadata(run), 'expected': chosen.get('expected'),
          'test': chosen.get('test'), 'jax_version': jax.__version__,
          'requirements': requirements(), 'loader': CASCADE_LOADER.format(out=out)}
  epath.Path(staging, 'cascade.json').write_text(json.dumps(spec, indent=2))
  return (f'exported the cascade {" -> ".join(s["depth"] for s in stages)} '
          f'({cascade.trunk}, {len(stages)} stages) to {out}')
