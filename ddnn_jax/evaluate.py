r"""Evaluates any depth of a trained run: accuracy, size, FLOPs and measured latency.

  python -m ddnn_jax.evaluate --workdir W [--depths all|trained|2-3-1,resnet44] \
      [--step N|best|latest] [--split test|validation] [--calib_examples 2000]

Trained depths use their own BatchNorm statistics; every other depth gets statistics
recalibrated on ``--calib_examples`` training images (``ddnn_jax.deploy.bn_calibration``).
Writes ``W/evaluation/<split>.csv|.md|.png`` (rows of earlier evaluations of the same split
and step are kept) and the latencies to ``W/latency.json``, keyed by backend and depth.
"""

from __future__ import annotations

from collections.abc import Sequence

from etils import epath

from ddnn_jax import cli
from ddnn_jax.deploy import evaluation, latency, trained_run


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog='python -m ddnn_jax.evaluate', doc=__doc__,
                              example='python -m ddnn_jax.evaluate --workdir /tmp/ddnn --depths all')
  cli.add_run_flags(parser)
  parser.add_argument('--depths', default='trained',
                      help="'all' (every depth configuration), 'trained' (default) or depths, "
                      'e.g. 2-3-1,resnet32')
  parser.add_argument('--split', default='test', choices=('test', 'validation'),
                      help="'test' (reported numbers) or 'validation' (held out of train)")
  cli.add_measure_flags(parser)
  parser.add_argument('--full_net_bn', action='store_true',
                      help="also evaluate untrained depths with the full net's BN statistics")
  args = parser.parse_args(argv)
  run = trained_run.load_run(args.workdir, args.step)
  depths = evaluation.parse_depths(run, args.depths)
  evaluation.check_split(run, args.split)
  rows = evaluation.evaluate_depths(run, depths, args.split, args.calib_examples, args.batch_size,
                                    args.latency_repeats, args.full_net_bn, progress=cli.progress)
  rows = evaluation.merge_rows(evaluation.read_rows(args.workdir, args.split), rows)
  paths = evaluation.write_evaluation(run, args.split, rows, args.batch_size)
  print(evaluation.format_table(rows, args.batch_size), end='')
  print(f'wrote {paths["csv"]}, {paths["md"]}, {paths["png"]}; latencies in '
        f'{epath.Path(args.workdir) / latency.LATENCY_FILE}')


if __name__ == '__main__':
  cli.run(main)
