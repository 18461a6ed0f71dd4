"""Where the convolution time goes: a ResNet stage's 3x3 convolution, forward, input
gradient and weight gradient, as XLA compiles it, as the rewrites one could make instead
(im2col patches + one dot; nine shifted dots), as ddnn_jax's oneDNN custom calls run it
(ddnn_jax/cpu/onednn.py, where built), and as PyTorch's oneDNN runs it.

  python bench/conv_kernels.py [--batch 32 --shapes 32x16,16x32,8x64 --rounds 3]
      [--torch_python /tmp/torchref/bin/python]

--batch 32 is what one device sees in the default run (batch 128 over 4 CPU devices).
Prints ms and GFLOP/s per kernel (median of alternating rounds) and the rewrites' error
against XLA's own convolution; with --torch_python, the same shapes in PyTorch (its own
venv, never a dependency) in NCHW and channels-last. Measures and prints; asserts
nothing. Runs with ddnn_jax's CPU flags (DDNN_JAX_CPU_DEFAULTS=0: without).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddnn_jax.cpu import defaults  # noqa: E402

defaults.apply()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ddnn_jax.core import parallel  # noqa: E402
from ddnn_jax.cpu import onednn  # noqa: E402

NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def conv_flop(batch, size, channels):
  """FLOPs of one 3x3, stride-1, channels-to-channels convolution (or of one gradient)."""
  return 2 * batch * size * size * 9 * channels * channels


def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NUMBERS)


def _shifted(x):
  """The nine 3x3 taps of the zero-padded input, each (B, H, W, C)."""
  _, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return [padded[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)]


def forward_im2col(x, w, g):
  del g
  patches = jnp.stack(_shifted(x), axis=3)  # (B, H, W, 9, C)
  return jnp.einsum('bhwkc,kco->bhwo', patches, w.reshape(9, *w.shape[2:]))


def weight_grad_im2col(x, w, g):
  patches = jnp.stack(_shifted(x), axis=3)
  return jnp.einsum('bhwkc,bhwo->kco', patches, g).reshape(w.shape)


def weight_grad_taps(x, w, g):
  return jnp.stack([jnp.einsum('bhwc,bhwo->co', tap, g) for tap in _shifted(x)]).reshape(w.shape)


def onednn_conv(x, w):
  with jax.sharding.use_abstract_mesh(ONE_DEVICE):  # One device convolves it all.
    return onednn.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NUMBERS)


ONE_DEVICE = parallel.create_mesh(jax.devices()[:1]).abstract_mesh
KERNELS = {
    'forward': lambda x, w, g: conv(x, w),
    'forward, im2col + dot': forward_im2col,
    'input grad': lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0],
    'weight grad': lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0],
    'weight grad, im2col + dot': weight_grad_im2col,
    'weight grad, 9 shifted dots': weight_grad_taps,
}
ONEDNN_KERNELS = {
    'oneDNN forward': lambda x, w, g: onednn_conv(x, w),
    'oneDNN input grad': lambda x, w, g: jax.vjp(lambda x: onednn_conv(x, w), x)[1](g)[0],
    'oneDNN weight grad': lambda x, w, g: jax.vjp(lambda w: onednn_conv(x, w), w)[1](g)[0],
}
if onednn.active():  # ddnn_jax's convolutions (ddnn_jax/cpu/onednn.py), where built.
  KERNELS.update(ONEDNN_KERNELS)
HLO_MARKS = {'convolution': r' convolution\(', 'dot': r' dot\(',
             'onednn_fusion': r'%onednn_fusion[.\d]* = ', 'ynn_fusion': r'%ynn_fusion[.\d]* = ',
             'xnn_fusion': r'%xnn_fusion[.\d]* = '}
REFERENCE = {'forward, im2col + dot': 'forward', 'weight grad, im2col + dot': 'weight grad',
             'weight grad, 9 shifted dots': 'weight grad', 'oneDNN forward': 'forward',
             'oneDNN input grad': 'input grad', 'oneDNN weight grad': 'weight grad'}

TORCH = r"""
import json, sys, time, torch
batch, shapes, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def seconds(f, n=20):
  f(); start = time.perf_counter()
  for _ in range(n): f()
  return (time.perf_counter() - start) / n
for shape in shapes.split(','):
  size, channels = map(int, shape.split('x'))
  for layout in ('NCHW', 'channels_last'):
    fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
    layer = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(memory_format=fmt)
    x = torch.randn(batch, channels, size, size).to(memory_format=fmt).requires_grad_()
    g = torch.randn(batch, channels, size, size).to(memory_format=fmt)
    def train():
      layer(x).backward(g)
    def forward():
      with torch.no_grad():
        layer(x)
    for kernel, f in (('forward', forward), ('forward + both grads', train)):
      ms = sorted(seconds(f) for _ in range(rounds))[rounds // 2] * 1e3
      print(json.dumps({'shape': shape, 'layout': layout, 'kernel': kernel, 'ms': ms}))
"""


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--shapes', default='32x16,16x32,8x64', help='SIZExCHANNELS per stage')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=20, help='calls timed per round')
  parser.add_argument('--torch_python', help='a python with torch: also time PyTorch')
  parser.add_argument('--show_hlo', action='store_true',
                      help='print what each kernel compiled to (e.g. under oneDNN XLA_FLAGS)')
  args = parser.parse_args()
  print(f'{jax.device_count()} device(s); XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; '
        f'batch {args.batch}')
  print('| shape | kernel | ms | GFLOP/s | max error / max |\n|---|---|---|---|---|')
  totals = {}
  for shape in args.shapes.split(','):
    size, channels = map(int, shape.split('x'))
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (args.batch, size, size, channels))
    w = jax.random.normal(keys[1], (3, 3, channels, channels))
    g = jax.random.normal(keys[2], (args.batch, size, size, channels))
    compiled = {name: jax.jit(f).lower(x, w, g).compile() for name, f in KERNELS.items()}
    if args.show_hlo:  # Which library each kernel went to: XLA's own conv or a fusion's.
      for name, f in compiled.items():
        text = f.as_text()
        found = {what: len(re.findall(pattern, text)) for what, pattern in HLO_MARKS.items()}
        print(f'{shape} {name}: ' + ', '.join(f'{k} {v}' for k, v in found.items() if v))
    outputs = {name: f(x, w, g) for name, f in compiled.items()}
    times = {name: [] for name in KERNELS}
    for _ in range(args.rounds):
      for name, f in compiled.items():
        jax.block_until_ready(f(x, w, g))
        start = time.perf_counter()
        for _ in range(args.steps):
          out = f(x, w, g)
        jax.block_until_ready(out)
        times[name].append((time.perf_counter() - start) / args.steps)
    flop = conv_flop(args.batch, size, channels)
    for name in KERNELS:
      seconds = statistics.median(times[name])
      error = '-'
      if name in REFERENCE:
        want = outputs[REFERENCE[name]]
        error = f'{float(jnp.max(jnp.abs(outputs[name] - want)) / jnp.max(jnp.abs(want))):.1e}'
      label = name if name in ONEDNN_KERNELS else f'XLA {name}'
      print(f'| {shape} | {label} | {seconds * 1e3:.2f} | {flop / seconds / 1e9:.0f} | '
            f'{error} |', flush=True)
    totals[shape] = sum(statistics.median(times[k]) for k in
                        ('forward', 'input grad', 'weight grad')) * 1e3
    print(f'| {shape} | XLA forward + both grads | {totals[shape]:.2f} | '
          f'{3 * flop / totals[shape] / 1e6:.0f} | - |', flush=True)
    if 'oneDNN forward' in KERNELS:
      ms = sum(statistics.median(times[k]) for k in ONEDNN_KERNELS) * 1e3
      print(f'| {shape} | oneDNN forward + both grads (XLA / oneDNN time '
            f'{totals[shape] / ms:.2f}) | {ms:.2f} | {3 * flop / ms / 1e6:.0f} | - |', flush=True)
  if args.torch_python:
    out = subprocess.run([args.torch_python, '-c', TORCH, str(args.batch), args.shapes,
                          str(args.rounds)], check=True, capture_output=True, text=True)
    for line in out.stdout.splitlines():
      row = json.loads(line)
      size, channels = map(int, row['shape'].split('x'))
      flop = conv_flop(args.batch, size, channels) * (1 if row['kernel'] == 'forward' else 3)
      ratio = (f' (XLA / torch time {totals[row["shape"]] / row["ms"]:.2f})'
               if row['kernel'] != 'forward' else '')
      print(f'| {row["shape"]} | torch {row["layout"]} {row["kernel"]}{ratio} | '
            f'{row["ms"]:.2f} | {flop / row["ms"] / 1e6:.0f} | - |')


if __name__ == '__main__':
  main()
