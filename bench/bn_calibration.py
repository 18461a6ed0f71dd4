"""How many calibration images BN recalibration needs: validation error of untrained
depths of a finished run against the number of training images their statistics are
computed on (and with the full net's statistics, for reference).

  python bench/bn_calibration.py --workdir W [--depths 2-1-1,1-3-2,...]
      [--examples 100,250,500,1000,2000,5000] [--out FILE.md]

Statistics are recalibrated afresh here (the cache in W/bn_calibration is neither read
nor written). Measures and prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddnn_jax.cpu import defaults  # noqa: E402

defaults.apply()

from ddnn_jax.deploy import bn_calibration, trained_run  # noqa: E402
from ddnn_jax.nn import notation  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--depths', default='2-1-1,1-2-1,1-1-2,3-1-1,1-3-3,3-2-1',
                      help='untrained depths to recalibrate')
  parser.add_argument('--examples', default='100,250,500,1000,2000,5000')
  parser.add_argument('--out', help='also write the table (Markdown) here')
  args = parser.parse_args()

  run = trained_run.load_run(args.workdir)
  depths = [run.resolve(d) for d in args.depths.split(',')]
  trained = [d for d in depths if run.is_trained(d)]
  if trained:
    parser.error(f'trained depths have their own statistics: {trained}')
  sizes = [int(n) for n in args.examples.split(',')]
  validation = trained_run.SplitCache(run, 'validation', 500)
  header = ['depth', 'full-net BN'] + [f'{n}' for n in sizes]
  rows = []
  for depth in depths:
    errors = [100 * (1 - trained_run.accuracy(run, depth, run.full_net_stats(depth), validation))]
    for n in sizes:
      stats = bn_calibration.recalibrate(run, depth, bn_calibration.calibration_batches(run, n))
      errors.append(100 * (1 - trained_run.accuracy(run, depth, stats, validation)))
    rows.append([notation.format_depth(depth)] + errors)
    print(' '.join(f'{e:.2f}' if isinstance(e, float) else e for e in rows[-1]), flush=True)
  means = ['mean'] + [statistics.mean(r[i] for r in rows) for i in range(1, len(header))]
  lines = [f'validation top-1 error (%) by calibration images, {args.workdir} step {run.step}',
           '', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for row in rows + [means]:
    lines.append('| ' + ' | '.join(f'{v:.2f}' if isinstance(v, float) else v for v in row) + ' |')
  print('\n'.join(lines))
  if args.out:
    pathlib.Path(args.out).write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
