"""Convolution layout on this backend: a ResNet stage's 3x3 convolution, forward and both
gradients, in NHWC (what flax and ddnn_jax use) against NCHW, alternating rounds.

  python bench/conv_layout.py [--batch 128 --size 32 --channels 16,32,64 --rounds 5]

Measures and prints; asserts nothing. Runs with ddnn_jax's CPU flags
(DDNN_JAX_CPU_DEFAULTS=0: without).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddnn_jax.cpu import defaults  # noqa: E402

defaults.apply()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

LAYOUTS = {'NHWC': ('NHWC', 'HWIO', 'NHWC'), 'NCHW': ('NCHW', 'OIHW', 'NCHW')}


def step_fn(layout):
  numbers = LAYOUTS[layout]

  def loss(kernel, x):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=numbers)
    return jnp.sum(jax.nn.relu(y) ** 2)

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--size', type=int, default=32)
  parser.add_argument('--channels', default='16,32,64')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--calls', type=int, default=10)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  print(f'batch {args.batch}; ms per forward+backward (median of {args.rounds} rounds)')
  print('| channels | size | NHWC ms | NCHW ms | NCHW / NHWC |\n|---|---|---|---|---|')
  for i, c in enumerate(int(c) for c in args.channels.split(',')):
    size = args.size >> i  # Each ResNet stage halves the map.
    x = rng.normal(size=(args.batch, size, size, c)).astype(np.float32)
    k = rng.normal(size=(3, 3, c, c)).astype(np.float32) * 0.1
    inputs = {'NHWC': (k, x), 'NCHW': (k.transpose(3, 2, 0, 1), x.transpose(0, 3, 1, 2))}
    fns = {layout: step_fn(layout) for layout in LAYOUTS}
    times = {layout: [] for layout in LAYOUTS}
    for layout, fn in fns.items():
      jax.block_until_ready(fn(*inputs[layout]))
    for _ in range(args.rounds):
      for layout, fn in fns.items():
        start = time.perf_counter()
        for _ in range(args.calls):
          out = fn(*inputs[layout])
        jax.block_until_ready(out)
        times[layout].append((time.perf_counter() - start) / args.calls * 1e3)
    nhwc, nchw = (statistics.median(times[layout]) for layout in ('NHWC', 'NCHW'))
    print(f'| {c} | {size} | {nhwc:.2f} | {nchw:.2f} | {nchw / nhwc:.2f} |', flush=True)


if __name__ == '__main__':
  main()
