"""Cost of one training step per mode, as ratios measured in one run.

  python bench/train_step.py [--arch resnet56 --subnets resnet44,resnet32 --batch 128]

Prints the median step time of `individual` (full net alone), `ddnn`, `ipkd` and `ekd`
and each mode's ratio to the full net alone. The paper's claim to check: EKD costs
about what training all depths with hard labels costs (the distillation terms are
cheap next to the extra forward/backward passes), i.e. ekd/ddnn close to 1.
"""

import argparse
import statistics
import time

import jax
import numpy as np
import optax

from ddnn_jax import models, steps


def time_mode(model, arch, subnets, mode, batch, image_shape, repeats):
  depths = models.depth_set(arch, [] if mode == 'individual' else subnets)
  state = steps.create_train_state(jax.random.key(0), model, depths,
                                   optax.sgd(0.01, momentum=0.9), image_shape)
  train, _ = steps.jit_steps(depths, mode, steps.LossWeights(alpha=100.0))
  rng = np.random.default_rng(0)
  data = {'image': rng.normal(size=(batch, *image_shape)).astype(np.float32),
          'label': rng.integers(0, model.num_classes, batch).astype(np.int32)}
  data = jax.device_put(data)
  state, metrics = train(state, data)  # Compile.
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = train(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--arch', default='resnet20')
  parser.add_argument('--subnets', default='1-1-1,2-2-2',
                      help='comma-separated depths: names or dash-separated block counts')
  parser.add_argument('--width', type=int, default=8)
  parser.add_argument('--image', type=int, default=32)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=10)
  args = parser.parse_args()
  subnets = models.parse_depths(args.subnets)
  model = models.create_model(args.arch, 10, width=args.width)
  image_shape = (args.image, args.image, 3)
  print(f'{args.arch} width {args.width}, sub-nets {args.subnets}, batch {args.batch}, '
        f'{image_shape[0]}x{image_shape[1]}, {jax.devices()[0].platform}')
  results = {mode: time_mode(model, args.arch, subnets, mode, args.batch, image_shape,
                             args.repeats)
             for mode in ('individual', 'ddnn', 'ipkd', 'ekd')}
  base = results['individual']
  print('| mode | step (ms) | / full net alone |')
  print('|---|---|---|')
  for mode, seconds in results.items():
    print(f'| {mode} | {1e3 * seconds:.1f} | {seconds / base:.2f} |')
  print(f'ekd / ddnn = {results["ekd"] / results["ddnn"]:.3f}')


if __name__ == '__main__':
  main()
