"""Throughput of a chosen cascade against the full net alone, on the test split.

  python bench/cascade.py --workdir W [--cascade W/cascade/chosen.json] [--rounds 5]

One process, alternating rounds: in each round the whole test split goes through the
cascade's real early exit (``early_exit.Executor``) and through the full net, at batch 256,
then the first ``--batch1_images`` test images one at a time through both. Prints img/s
(median of the rounds) and their ratio, and the mean FLOPs per image the cascade realised
on the test split against the expected (validation) figure in chosen.json. Measures and
prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddnn_jax.cpu import defaults  # noqa: E402

defaults.apply()

import numpy as np  # noqa: E402

from ddnn_jax.deploy import bn_calibration, early_exit, trained_run  # noqa: E402
from ddnn_jax.nn import flops, notation  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--cascade', help='default: W/cascade/chosen.json')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--batch1_images', type=int, default=500)
  parser.add_argument('--rounds', type=int, default=5)
  args = parser.parse_args()
  path = args.cascade or os.path.join(args.workdir, 'cascade', 'chosen.json')
  run = trained_run.load_run(args.workdir)
  cascade = early_exit.read_chosen(path, run)
  full = run.full_depth
  stats = {d: bn_calibration.stats_for(run, d)[0] for d in {*cascade.depths, full}}
  images = np.concatenate([b['image'][b['mask'] > 0]
                           for b in trained_run.SplitCache(run, 'test', 512)])
  cascade_batched = early_exit.Executor(run, cascade, stats, args.batch)
  cascade_single = early_exit.Executor(run, cascade, stats, 1)
  full_apply = early_exit.cached_stage(run, full, 0, 0)
  full_params, full_stats = run.used_params(full), stats[full]

  def full_net(x, batch):
    out = []
    for i in range(0, len(x), batch):
      part = x[i:i + batch]
      pad = batch - len(part)
      padded = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)]) if pad else part
      out.append(np.asarray(full_apply(full_params, full_stats, padded)[0])[:len(part)])
    return np.concatenate(out)

  few = images[:args.batch1_images]
  variants = {
      f'cascade, batch {args.batch}': (lambda: cascade_batched.logits(images), len(images)),
      f'full net, batch {args.batch}': (lambda: full_net(images, args.batch), len(images)),
      'cascade, batch 1': (lambda: cascade_single.logits(few), len(few)),
      'full net, batch 1': (lambda: full_net(few, 1), len(few)),
  }
  for fn, _ in variants.values():  # Compile every bucket before timing.
    fn()
  times = {name: [] for name in variants}
  for _ in range(args.rounds):
    for name, (fn, _) in variants.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  rate = {name: n / statistics.median(times[name]) for name, (_, n) in variants.items()}

  _, stage = cascade_batched.logits(images)
  costs = early_exit.stage_costs(run.model, run.image_shape, cascade.depths, cascade.trunk)
  realised = early_exit.mean_cost(stage, costs)
  with open(path, encoding='utf-8') as f:
    expected = json.load(f).get('expected', {}).get('mean_flops')
  full_flops = flops.profile_subnet(run.model, run.image_shape, full).flops
  print(f'cascade {" -> ".join(map(notation.format_depth, cascade.depths))} ({cascade.trunk}), '
        f'thresholds {cascade.thresholds}; {len(images)} test images, {args.rounds} rounds')
  print('| variant | img/s | cascade / full net |\n|---|---|---|')
  for name in variants:
    pair = name.replace('cascade', 'full net') if name.startswith('cascade') else name
    ratio = rate[name] / rate[pair] if name.startswith('cascade') else 1.0
    print(f'| {name} | {rate[name]:.0f} | {ratio:.2f} |')
  print(f'mean FLOPs per image: realised on test {realised / 1e6:.2f}M, expected (validation) '
        + (f'{expected / 1e6:.2f}M ({100 * (realised / expected - 1):+.1f}%)' if expected else '-')
        + f'; full net {full_flops / 1e6:.2f}M ({realised / full_flops:.2f}x)')
  print('exits per stage (test): ' + ', '.join(
      f'{notation.format_depth(d)} {np.mean(stage == k):.1%}'
      for k, d in enumerate(cascade.depths)))


if __name__ == '__main__':
  main()
