"""What one training step costs, per mode, as ratios measured in one run.

  python bench/train_step.py [--arch resnet56 --subnets resnet44,resnet32 --batch 128]
      [--modes individual,ddnn,ekd] [--rounds 5 --steps 5] [--devices 2]
      [--xla_flags "--xla_cpu_..."] [--remat] [--compare_remat] [--out FILE.md]

For each mode (and each depth of the set trained alone, `individual <depth>`) it reports:
img/s (median over alternating rounds), the FLOPs of the compiled step (XLA's
cost_analysis, summed over devices) and the FLOP/s achieved, peak memory of the step per
device (memory_analysis: arguments + outputs + temporaries - donated), compile time, and
the step time relative to the full net trained alone and to the sum of all depths trained
alone. The EKD step without the shared trunk (each depth its own forward pass) is
measured as well, for the speed-up of the shared trunk. Nothing here is asserted: it
measures and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--arch', default='resnet20')
  parser.add_argument('--subnets', default='2-2-2,1-1-1',
                      help='comma-separated depths: names or dash-separated block counts')
  parser.add_argument('--width', type=int, default=0, help='0: the standard width')
  parser.add_argument('--image', type=int, default=32)
  parser.add_argument('--channels', type=int, default=3)
  parser.add_argument('--classes', type=int, default=10)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--modes', default='individual,ddnn,ekd',
                      help='modes to measure; individual = every depth trained alone; '
                      "infer = the full net's eval forward pass at --batch")
  parser.add_argument('--rounds', type=int, default=5, help='alternating rounds (median)')
  parser.add_argument('--steps', type=int, default=5, help='steps timed per round')
  parser.add_argument('--devices', type=int, default=0,
                      help="CPU devices (the batch is sharded over them); 0: ddnn_jax's default")
  parser.add_argument('--xla_flags', default='', help='extra XLA_FLAGS for this run')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--remat', action='store_true', help='model.remat for every step')
  parser.add_argument('--compare_remat', action='store_true',
                      help='also measure the EKD step with model.remat (memory vs time)')
  parser.add_argument('--no_per_depth', action='store_true',
                      help='skip the EKD step without the shared trunk')
  parser.add_argument('--out', help='also write the table (Markdown) here')
  parser.add_argument('--json', help='also append one JSON line per step measured here')
  return parser.parse_args()


ARGS = parse_args()
# XLA reads its flags once, when jax starts: set them before it does.
os.environ['XLA_FLAGS'] = ' '.join(filter(None, [
    os.environ.get('XLA_FLAGS', ''), ARGS.xla_flags,
    f'--xla_force_host_platform_device_count={ARGS.devices}' if ARGS.devices else '']))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddnn_jax.cpu import defaults, device_count  # noqa: E402

# As python -m ddnn_jax.main does (DDNN_JAX_CPU_DEFAULTS=0: neither).
defaults.reexec_with_tcmalloc()
device_count.apply_for_training(ARGS.batch)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from ddnn_jax.training import steps  # noqa: E402
from ddnn_jax.nn import architectures, flops, models, notation  # noqa: E402
from ddnn_jax.core import parallel  # noqa: E402
from ddnn_jax.cpu import onednn  # noqa: E402


def xla_flops(make_jitted, mesh, *args) -> float:
  """FLOPs per step from XLA's cost analysis of the program with XLA's own convolutions
  (oneDNN's custom calls count none), traced afresh by ``make_jitted()``."""
  with onednn.disabled():
    compiled = make_jitted().lower(*args).compile()
  # XLA analyses the partitioned program: one device's share of FLOPs.
  return compiled.cost_analysis()['flops'] * mesh.size


def compile_step(model, depths, mode, batch, image_shape, shared_trunk, mesh):
  """(compiled train step, state, batch, compile seconds, cost and memory analyses)."""
  state = steps.create_train_state(jax.random.key(0), model, depths,
                                   optax.sgd(0.01, momentum=0.9), image_shape)
  state = parallel.replicate(state, mesh)
  rng = np.random.default_rng(0)
  data = {'image': rng.normal(size=(batch, *image_shape)).astype(np.float32),
          'label': rng.integers(0, model.num_classes, batch).astype(np.int32)}
  data = parallel.shard_batch(data, mesh)
  train, _ = steps.jit_steps(depths, mode, steps.LossWeights(alpha=100.0), mesh=mesh,
                             shared_trunk=shared_trunk)
  start = time.perf_counter()
  compiled = train.lower(state, data).compile()
  compile_s = time.perf_counter() - start
  flops = xla_flops(lambda: steps.jit_steps(depths, mode, steps.LossWeights(alpha=100.0),
                                            mesh=mesh, shared_trunk=shared_trunk)[0],
                    mesh, state, data)
  memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  state, metrics = compiled(state, data)  # Warm-up.
  jax.block_until_ready(metrics)
  return {'step': compiled, 'state': state, 'data': data, 'compile_s': compile_s,
          'flops': flops, 'peak_bytes': peak, 'times': []}


def compile_infer(model, depth, batch, image_shape, mesh):
  """The eval-mode forward pass of ``depth`` (BN with its running statistics), like
  compile_step: what evaluate, search and predict run."""
  state = steps.create_train_state(jax.random.key(0), model, (depth,),
                                   optax.sgd(0.01), image_shape)
  params = parallel.replicate(state.params, mesh)
  stats = parallel.replicate(state.batch_stats[notation.depth_name(depth)], mesh)
  images = parallel.shard_batch({'image': np.random.default_rng(0).normal(
      size=(batch, *image_shape)).astype(np.float32)}, mesh)['image']
  # The mesh while tracing: oneDNN's convolutions then run per device (as in jit_steps).
  forward = jax.jit(parallel.traced_in_mesh(
      lambda p, s, x: steps.depth_logits(model.apply, p, s, x, depth), mesh))
  start = time.perf_counter()
  compiled = forward.lower(params, stats, images).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  jax.block_until_ready(compiled(params, stats, images))

  def step(state, data):
    del data
    return state, compiled(params, stats, images)

  return {'step': step, 'state': None, 'data': None, 'compile_s': compile_s,
          'flops': xla_flops(lambda: jax.jit(lambda p, s, x: steps.depth_logits(
              model.apply, p, s, x, depth)), mesh, params, stats, images),
          'peak_bytes': peak, 'times': []}


def main():
  subnets = notation.parse_depths(ARGS.subnets)
  dtype = jnp.dtype(ARGS.dtype)
  image_shape = (ARGS.image, ARGS.image, ARGS.channels)
  mesh = parallel.create_mesh()
  depths = architectures.depth_set(ARGS.arch, subnets)

  def model(remat=ARGS.remat):
    return models.create_model(ARGS.arch, ARGS.classes, width=ARGS.width or None, dtype=dtype,
                               remat=remat)

  # name -> (depths, mode, shared trunk, remat)
  configs = {}
  for mode in ARGS.modes.split(','):
    if mode == 'infer':
      configs[f'infer {notation.format_depth(depths[0])}'] = ((depths[0],), 'infer', True, False)
    elif mode == 'individual':
      for depth in depths:
        name = f'individual {notation.format_depth(depth)}'
        configs[name] = ((depth,), 'individual', True, ARGS.remat)
    else:
      configs[mode] = (depths, mode, True, ARGS.remat)
  if 'ekd' in configs and not ARGS.no_per_depth:
    configs['ekd, no shared trunk'] = (depths, 'ekd', False, ARGS.remat)
  if 'ekd' in configs and ARGS.compare_remat:
    name = 'ekd, no remat' if ARGS.remat else 'ekd, remat'
    configs[name] = (depths, 'ekd', True, not ARGS.remat)

  print(f'{ARGS.arch} width {ARGS.width or "standard"}, sub-nets {ARGS.subnets}, batch '
        f'{ARGS.batch}, {image_shape[0]}x{image_shape[1]}x{image_shape[2]}, {ARGS.dtype}, '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s), XLA_FLAGS='
        f'{os.environ["XLA_FLAGS"]!r}, LD_PRELOAD={os.environ.get("LD_PRELOAD", "")!r}',
        flush=True)
  runs = {}
  for name, (d, mode, shared, remat) in configs.items():
    if mode == 'infer':
      runs[name] = compile_infer(model(), d[0], ARGS.batch, image_shape, mesh)
    else:
      runs[name] = compile_step(model(remat), d, mode, ARGS.batch, image_shape, shared, mesh)
    print(f'  compiled {name}: {runs[name]["compile_s"]:.1f} s', flush=True)
  # Alternating rounds: slow drifts of the machine (heat, other load) hit every config.
  for _ in range(ARGS.rounds):
    for run in runs.values():
      start = time.perf_counter()
      state = run['state']
      for _ in range(ARGS.steps):
        state, metrics = run['step'](state, run['data'])
      jax.block_until_ready(metrics)
      run['state'] = state
      run['times'].append((time.perf_counter() - start) / ARGS.steps)

  seconds = {name: statistics.median(run['times']) for name, run in runs.items()}
  full = f'individual {notation.format_depth(depths[0])}'
  alone = [f'individual {notation.format_depth(d)}' for d in depths]
  base = seconds.get(full)
  total = sum(seconds[n] for n in alone) if all(n in seconds for n in alone) else None
  total_flops = sum(runs[n]['flops'] for n in alone) if total else None
  forward = flops.shared_trunk_flops(model(), image_shape, depths) / sum(
      flops.profile_subnet(model(), image_shape, d).flops for d in depths)
  lines = [
      '| step | ms | img/s | GFLOP/step | GFLOP/s | peak MiB/device | compile s | / full alone | '
      '/ sum alone | FLOPs / sum alone |',
      '|---|---|---|---|---|---|---|---|---|---|']
  for name, run in runs.items():
    s = seconds[name]
    cells = [name, f'{1e3 * s:.1f}', f'{ARGS.batch / s:.0f}', f'{run["flops"] / 1e9:.2f}',
             f'{run["flops"] / s / 1e9:.1f}', f'{run["peak_bytes"] / 2**20:.0f}',
             f'{run["compile_s"]:.1f}', f'{s / base:.3f}' if base else '-',
             f'{s / total:.3f}' if total else '-',
             f'{run["flops"] / total_flops:.3f}' if total else '-']
    lines.append('| ' + ' | '.join(cells) + ' |')
  table = '\n'.join(lines)
  print(table)
  notes = [f'forward multiply-adds of the shared trunk / sum of the depths alone: {forward:.3f}']
  if 'ekd' in seconds and 'ekd, no shared trunk' in seconds:
    notes.append(f'shared-trunk speed-up of the EKD step: '
                 f'{seconds["ekd, no shared trunk"] / seconds["ekd"]:.2f}x')
  for line in notes:
    print(line)
  if ARGS.out:
    with open(ARGS.out, 'w', encoding='utf-8') as f:
      f.write(' '.join(sys.argv) + '\n\n' + table + '\n\n' + '\n'.join(notes) + '\n')
  if ARGS.json:
    with open(ARGS.json, 'a', encoding='utf-8') as f:
      for name, run in runs.items():
        f.write(json.dumps({
            'step': name, 'step_s': seconds[name], 'img_per_s': ARGS.batch / seconds[name],
            'flops': run['flops'], 'peak_bytes': run['peak_bytes'],
            'compile_s': run['compile_s'], 'times': run['times'],
            'xla_flags': os.environ['XLA_FLAGS'], 'devices': jax.device_count()}) + '\n')


if __name__ == '__main__':
  main()
