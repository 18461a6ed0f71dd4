"""Where the time of one training step goes: a per-HLO-op profile of the compiled step.

  python bench/op_profile.py [--arch resnet56 --subnets 7-7-7,5-5-5,3-3-3] [--mode ekd]
      [--batch 128] [--steps 3] [--xla_flags "..."] [--out FILE.md]
  python bench/op_profile.py --arch resnet20 --mode infer --batch 256   # eval forward pass

Runs the jitted step under jax.profiler on one CPU device, sums the duration of every
XLA op over the timed steps and prints milliseconds per step by op kind (the op name
without its numeric suffix: convolutions, `transpose_copy_fusion` (the weight
gradients' input transposes), `loop_*_fusion` (elementwise chains), reductions, ...)
and the slowest single ops. Op time can exceed wall time when ops run concurrently.
Measures and prints; asserts nothing. DDNN_JAX_CPU_DEFAULTS=0 profiles without the CPU
defaults of ddnn_jax/cpu/defaults.py.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--arch', default='resnet56')
  parser.add_argument('--subnets', default='7-7-7,5-5-5,3-3-3')
  parser.add_argument('--mode', default='ekd',
                      help="a training mode, or infer: the full net's eval forward pass")
  parser.add_argument('--width', type=int, default=0, help='0: the standard width')
  parser.add_argument('--image', type=int, default=32)
  parser.add_argument('--channels', type=int, default=3)
  parser.add_argument('--classes', type=int, default=10)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=3, help='steps profiled')
  parser.add_argument('--top', type=int, default=15, help='slowest single ops listed')
  parser.add_argument('--xla_flags', default='', help='extra XLA_FLAGS for this run')
  parser.add_argument('--out', help='also write the tables (Markdown) here')
  return parser.parse_args()


ARGS = parse_args()
TRACEME = '--xla_cpu_enable_xprof_traceme=true'  # XLA CPU ops in the profile.
if TRACEME not in os.environ.get('XLA_FLAGS', ''):  # Not again after the tcmalloc re-exec.
  os.environ['XLA_FLAGS'] = ' '.join(filter(None, [
      os.environ.get('XLA_FLAGS', ''), ARGS.xla_flags, TRACEME]))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddnn_jax.cpu import defaults  # noqa: E402

defaults.reexec_with_tcmalloc()
defaults.apply()  # Flags only: one device, so op times are not split over devices.

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from ddnn_jax.training import steps  # noqa: E402
from ddnn_jax.nn import architectures, models, notation  # noqa: E402


def op_durations(trace_dir, op_names):
  """({op: total microseconds}, {op: calls}) of the HLO ops in ``op_names`` (not the
  runtime's own events) from the profile written in trace_dir."""
  path = glob.glob(f'{trace_dir}/**/*.trace.json.gz', recursive=True)[0]
  trace = json.load(gzip.open(path))
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  total, calls = collections.Counter(), collections.Counter()
  for event in events:
    if event.get('ph') == 'X' and event['name'] in op_names:
      total[event['name']] += event['dur']
      calls[event['name']] += 1
  return total, calls


INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = .*? (\w[\w-]*)\(.*?(?:calls=%(\S+?)[,\s]|$)',
                         re.M)


def hlo_ops(hlo_text):
  """(names of all instructions of the compiled HLO, those that are or fuse a convolution)."""
  bodies = dict(re.findall(r'^%(\S+) \(.*?\{\n(.*?)^\}', hlo_text, re.M | re.S))
  names, convolutions = set(), set()
  for name, op, called in INSTRUCTION.findall(hlo_text):
    names.add(name)
    if op == 'convolution' or (called and ' convolution(' in bodies.get(called, '')):
      convolutions.add(name)
  return names, convolutions


def main():
  image_shape = (ARGS.image, ARGS.image, ARGS.channels)
  model = models.create_model(ARGS.arch, ARGS.classes, width=ARGS.width or None)
  depths = architectures.depth_set(ARGS.arch, notation.parse_depths(ARGS.subnets))
  state = steps.create_train_state(jax.random.key(0), model, depths,
                                   optax.sgd(0.01, momentum=0.9), image_shape)
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(ARGS.batch, *image_shape)).astype(np.float32),
           'label': rng.integers(0, ARGS.classes, ARGS.batch).astype(np.int32)}
  if ARGS.mode == 'infer':  # The full net's eval forward pass (evaluate, search, predict).
    forward = jax.jit(lambda p, s, x: steps.depth_logits(model.apply, p, s, x, depths[0]))
    stats = state.batch_stats[notation.depth_name(depths[0])]

    def train(state, batch):
      return state, forward(state.params, stats, batch['image'])
    compiled = forward.lower(state.params, stats, batch['image']).compile()
  else:
    train, _ = steps.jit_steps(depths, ARGS.mode, steps.LossWeights(alpha=100.0))
    compiled = train.lower(state, batch).compile()
  op_names, convolutions = hlo_ops(compiled.as_text())
  for _ in range(2):  # Compile and warm up.
    state, metrics = train(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(ARGS.steps):
    state, metrics = train(state, batch)
  jax.block_until_ready(metrics)
  wall_ms = (time.perf_counter() - start) / ARGS.steps * 1e3

  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(ARGS.steps):
        state, metrics = train(state, batch)
      jax.block_until_ready(metrics)
    total, calls = op_durations(trace_dir, op_names)

  kinds, kind_calls = collections.Counter(), collections.Counter()
  for name, duration in total.items():
    kind = re.sub(r'[.\d]+$', '', name)
    if name in convolutions and 'conv' not in kind:
      kind += ' (fused convolution)'
    kinds[kind] += duration
    kind_calls[kind] += calls[name]
  op_ms = sum(kinds.values()) / ARGS.steps / 1e3
  lines = [f'{ARGS.arch} {ARGS.mode}, sub-nets {ARGS.subnets}, batch {ARGS.batch}, '
           f'{ARGS.image}x{ARGS.image}; XLA_FLAGS={os.environ["XLA_FLAGS"]!r}',
           f'wall {wall_ms:.0f} ms/step (unprofiled), op time {op_ms:.0f} ms/step', '',
           '| op kind | ms/step | share | ops/step |', '|---|---|---|---|']
  for kind, duration in kinds.most_common():
    ms = duration / ARGS.steps / 1e3
    if ms >= 0.005 * op_ms:
      lines.append(f'| `{kind}` | {ms:.1f} | {100 * ms / op_ms:.1f}% | '
                   f'{kind_calls[kind] // ARGS.steps} |')
  lines += ['', '| slowest ops | ms/step |', '|---|---|']
  for name, duration in total.most_common(ARGS.top):
    lines.append(f'| `{name}` | {duration / ARGS.steps / 1e3:.1f} |')
  text = '\n'.join(lines)
  print(text)
  if ARGS.out:
    with open(ARGS.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
