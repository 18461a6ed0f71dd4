r"""Compares finished runs in the paper's layout: one row per depth, one column per scheme.

  python -m ddnn_jax.compare W1 W2 ... [--out DIR] [--split test|validation]
      [--diffs ekd-individual,ekd-ddnn] [--paper cifar10:r20_r16]

Each workdir is one run (``python -m ddnn_jax.main``) of the same dataset, full net and
training budget: ``individual`` runs fill the row of the depth they trained, DDNN/EKD/...
runs every row of their depth set. Several seeds of one scheme give mean ± std (n seeds).
Runs of two schemes with the same seed are paired: for each depth and each difference in
``--diffs`` (default: EKD − individual and EKD − DDNN; any ``A-B`` of two schemes) the
mean paired difference with its 95% t-interval over the n shared seeds. Bold marks only
what an interval supports: a difference whose interval excludes zero, and a row's best
scheme when its intervals against every other scheme in the row lie below zero.

The paper's columns (its Individual / DDNN / EKD errors, Tables 1 and 2 of
arXiv:2103.00793) are added whenever the runs are one of its groups (same dataset, full
net and depths, e.g. ``configs/cifar10.py:r56_r44`` runs); ``--paper DATASET:GROUP`` adds
a group's figures for orientation to runs of other data (by default the nearest group of
the same full net, e.g. CIFAR-10 r20_r16 beside Fashion-MNIST ResNet-20 runs).

Writes ``comparison.md``, ``comparison.csv`` (per depth and scheme),
``differences.csv``, ``comparison.png`` (errors per depth and scheme) and
``differences.png`` (the paired differences with their intervals) to ``--out``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ddnn_jax import cli
from ddnn_jax.core import errors, file_io
from ddnn_jax.studies import comparison
from ddnn_jax.studies.comparison import DEFAULT_DIFFS, SPLIT_COLUMNS


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog='python -m ddnn_jax.compare', doc=__doc__,
                              example='python -m ddnn_jax.compare runs/individual-* runs/ekd-seed* --out /tmp/comparison')
  parser.add_argument('workdirs', nargs='+', help='workdirs (or run records) of finished runs')
  parser.add_argument('--out', default='comparison', help='directory for the outputs')
  parser.add_argument('--split', choices=tuple(SPLIT_COLUMNS), default='test',
                      help='errors of the test split (default) or the held-out validation split')
  parser.add_argument('--diffs', default=DEFAULT_DIFFS,
                      help=f'paired differences A-B to report (default: {DEFAULT_DIFFS})')
  parser.add_argument('--paper', default=None, metavar='DATASET:GROUP',
                      help="the paper's Table 1/2 errors of this group beside the runs, for "
                      "orientation; 'none': no paper columns. Default: the runs' own paper "
                      "group if they are one, else the nearest group of their full net")
  args = parser.parse_args(argv)
  if len(set(map(os.path.abspath, args.workdirs))) != len(args.workdirs):
    raise errors.UsageError('a workdir is given twice')
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise errors.UsageError(f'--out {args.out} exists and is not a directory')
  diff_pairs = comparison.parse_diffs(args.diffs)
  reference = comparison.parse_paper(args.paper)
  runs = [comparison.read_run(w, args.split) for w in args.workdirs]
  comparison.check_diff_schemes(runs, diff_pairs)
  result = comparison.compare(runs, diff_pairs, args.split, reference,
                              nearest=args.paper is None)
  os.makedirs(args.out, exist_ok=True)
  for name, content in result.files.items():
    file_io.atomic_write(os.path.join(args.out, name), content)
  print(result.markdown, end='')
  print(f'wrote {", ".join(os.path.join(args.out, n) for n in result.files)}')


if __name__ == '__main__':
  cli.run(main)
