"""The check to run the day an accelerator is lent: what this machine gives ddnn_jax.

  bench/accelerator_check.sh            # full size: ResNet-50 EKD at 224, batch 256, bf16
  bench/accelerator_check.sh --tiny     # CPU smoke size (< 1 min; CI runs it)

One line per measured figure (``name: value``), then a summary line. Everything printed
is measured here: the devices, compile seconds, the ResNet-50 EKD step of the paper's
Table 2 set ([3,4,4,3] + [3,3,3,3]) on synthetic ImageNet-shaped data, the default
group's (ResNet-20 + [2,2,2] + [1,1,1]) EKD step, peak memory per device, and one
sharded step (batch over every device) against the same step on one device.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddnn_jax.cpu import device_count  # noqa: E402

ARGS = None


def _args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true', help='CPU smoke sizes')
  parser.add_argument('--steps', type=int, default=0, help='timed steps (default 10; tiny 2)')
  return parser.parse_args()


def _line(name: str, value: str) -> None:
  print(f'{name}: {value}', flush=True)


def _step_figures(label, model, depths, image_shape, batch, mesh, steps_timed):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from ddnn_jax.training import steps  # pylint: disable=g-import-not-at-top
  from ddnn_jax.core import parallel  # pylint: disable=g-import-not-at-top
  state = parallel.replicate(steps.create_train_state(
      jax.random.key(0), model, depths, optax.sgd(0.01, momentum=0.9), image_shape), mesh)
  rng = np.random.default_rng(0)
  data = parallel.shard_batch({
      'image': rng.normal(size=(batch, *image_shape)).astype(np.float32),
      'label': rng.integers(0, model.num_classes, batch).astype(np.int32)}, mesh)
  train, _ = steps.jit_steps(depths, 'ekd', steps.LossWeights(alpha=100.0), mesh=mesh)
  start = time.perf_counter()
  compiled = train.lower(state, data).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  state, metrics = compiled(state, data)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps_timed):
    state, metrics = compiled(state, data)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps_timed
  _line(f'{label} compile_s', f'{compile_s:.1f}')
  _line(f'{label} img_per_s', f'{batch / seconds:.1f}')
  _line(f'{label} step_ms', f'{1e3 * seconds:.1f}')
  _line(f'{label} peak_mib_per_device', f'{peak / 2**20:.0f}')
  return batch / seconds


def _sharded_equals_unsharded(model, depths, image_shape, batch):
  """Max relative difference of loss and parameters after one step: batch over every
  device against one device."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from ddnn_jax.training import steps  # pylint: disable=g-import-not-at-top
  from ddnn_jax.core import parallel  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  host = {'image': rng.normal(size=(batch, *image_shape)).astype(np.float32),
          'label': rng.integers(0, model.num_classes, batch).astype(np.int32)}
  results = []
  for devices in (jax.devices(), jax.devices()[:1]):
    mesh = parallel.create_mesh(devices)
    state = parallel.replicate(steps.create_train_state(
        jax.random.key(0), model, depths, optax.sgd(0.1, momentum=0.9), image_shape), mesh)
    train, _ = steps.jit_steps(depths, 'ekd', steps.LossWeights(alpha=100.0), mesh=mesh)
    state, metrics = train(state, parallel.shard_batch(host, mesh))
    results.append(jax.device_get((metrics['loss'], state.params)))
  (loss_a, params_a), (loss_b, params_b) = results
  diffs = [abs(float(loss_a) - float(loss_b)) / max(abs(float(loss_b)), 1e-12)]
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
    diffs.append(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12)))
  return max(diffs)


def main():
  args = _args()
  if args.tiny:  # Smoke sizes compile in a fraction of the time at XLA's -O0.
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                               + ' --xla_backend_optimization_level=0').strip()
  device_count.apply_for_training()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ddnn_jax.nn import architectures, models  # pylint: disable=g-import-not-at-top
  from ddnn_jax.core import parallel  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  devices = jax.devices()
  _line('devices', f'{len(devices)} x {devices[0].platform} ({devices[0].device_kind})')
  _line('processes', str(jax.process_count()))
  steps_timed = args.steps or (2 if args.tiny else 10)
  mesh = parallel.create_mesh()
  n = len(devices)
  if args.tiny:
    r50 = models.create_model('resnet50', 10, width=8, dtype=jnp.bfloat16)
    r50_shape, r50_batch = (32, 32, 3), 2 * n
    r20 = models.create_model('resnet20', 10, width=4)
    r20_shape, r20_batch = (28, 28, 1), 4 * n
  else:
    r50 = models.create_model('resnet50', 1000, dtype=jnp.bfloat16)
    r50_shape, r50_batch = (224, 224, 3), 256
    r20 = models.create_model('resnet20', 10)
    r20_shape, r20_batch = (28, 28, 1), 128
  r50_batch = -(-r50_batch // n) * n  # Divisible by the device count.
  r20_batch = -(-r20_batch // n) * n
  r50_rate = _step_figures('resnet50_ekd_table2', r50,
                           architectures.depth_set('resnet50', [(3, 4, 4, 3), (3, 3, 3, 3)]),
                           r50_shape, r50_batch, mesh, steps_timed)
  r20_rate = _step_figures('resnet20_ekd_default_group', r20,
                           architectures.depth_set('resnet20', [(2, 2, 2), (1, 1, 1)]),
                           r20_shape, r20_batch, mesh, steps_timed)
  check = models.create_model('resnet20', 10, width=4)
  diff = _sharded_equals_unsharded(check, architectures.depth_set('resnet20', [(1, 1, 1)]),
                                   (28, 28, 1), 4 * n)
  equal = diff < 1e-4
  _line('sharded_vs_one_device_max_rel_diff', f'{diff:.2e} ({"equal" if equal else "DIFFERENT"}'
        ' within 1e-4)')
  _line('summary', f'{len(devices)} {devices[0].platform} devices; ResNet-50 EKD '
        f'{r50_rate:.1f} img/s at batch {r50_batch}; ResNet-20 EKD {r20_rate:.1f} img/s at batch '
        f'{r20_batch}; sharded step {"equals" if equal else "DIFFERS FROM"} one device; '
        f'{time.perf_counter() - start:.0f} s')
  return 0 if equal else 1


if __name__ == '__main__':
  sys.exit(main())
