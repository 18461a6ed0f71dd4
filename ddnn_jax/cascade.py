r"""Builds confidence cascades over a trained run's depths and picks one for a budget.

  python -m ddnn_jax.cascade --workdir W [--step best|latest|N] [--depths front|all|LIST] \
      [--stages 2|3] [--score maxprob|margin|entropy] [--trunk recompute|reuse|both] \
      [--max_flops X | --max_latency_ms X | --max_error_increase PT]

A cascade runs its first depth on every input and passes on to the next, deeper depth
only the inputs whose calibrated confidence is below that stage's threshold
(``ddnn_jax.deploy.early_exit``; chosen by ``ddnn_jax.deploy.cascade_choice``). Every
candidate depth's logits are computed once per split and cached in
``W/cascade/logits/<step>/``; a temperature per depth is fitted on the validation split
(ECE before and after is printed); cascades of 2 (and, with
``--stages 3``, 3) depths of increasing FLOPs are tried over a grid of thresholds. Their
cost is the mean per input (each input pays the stages it reaches), in FLOPs and in
measured batch-1 latency. Everything is chosen on the validation split; the test split
reports, with the thresholds fixed. The default budget is ``--max_error_increase 0``: the
cheapest cascade whose validation error is no worse than the full net's.

Writes ``W/cascade/candidates.csv`` (every cascade and thresholds tried), ``front.csv``
(the validation front of error against mean FLOPs, with test figures),
``front.png`` (test error against mean FLOPs, the cascade front over the single depths),
``budgets.csv`` (cascade against the best single depth at 5 FLOPs budgets) and
``chosen.json`` (for ``predict --cascade``, ``DynamicModel.predict(cascade=)`` and
``export --cascade``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ddnn_jax import cli
from ddnn_jax.core import errors
from ddnn_jax.deploy import bn_calibration, cascade_choice, early_exit, trained_run


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog='python -m ddnn_jax.cascade', doc=__doc__,
                              example='python -m ddnn_jax.cascade --workdir /tmp/ddnn --max_error_increase 0.15')
  cli.add_run_flags(parser)
  parser.add_argument('--depths', default='front',
                      help="'front' (the depths on the static validation front of "
                      "python -m ddnn_jax.search), 'all', or depths, e.g. 1-1-1,2-2-2,3-3-3")
  parser.add_argument('--stages', type=int, choices=(2, 3), default=2,
                      help='longest cascade: 2 depths, or also 3')
  parser.add_argument('--score', choices=early_exit.SCORES, default='maxprob',
                      help="a stage's confidence in its answer: the top probability, its "
                      'margin over the second, or the negative entropy (each calibrated)')
  parser.add_argument('--trunk', choices=(*early_exit.TRUNKS, 'both'), default='recompute',
                      help="later stages recompute from the image, reuse the "
                      "previous stage's shared leading blocks, or both are tried")
  budget = parser.add_mutually_exclusive_group()
  budget.add_argument('--max_flops', type=cli.parse_flops,
                      help='the most accurate cascade within this mean FLOPs per input, e.g. 15M')
  budget.add_argument('--max_latency_ms', type=cli.positive_float,
                      help='the most accurate cascade within this mean batch-1 latency')
  budget.add_argument('--max_error_increase', type=float, default=None, metavar='PT',
                      help="the cheapest cascade (mean FLOPs) whose validation error is at most "
                      "PT points above the full net's (default 0)")
  parser.add_argument('--calib_examples', type=cli.positive_int,
                      default=bn_calibration.DEFAULT_CALIB_EXAMPLES,
                      help='training images for BN recalibration of untrained depths')
  parser.add_argument('--batch_size', type=cli.positive_int, default=512,
                      help='batch of the logits passes')
  parser.add_argument('--latency_repeats', type=cli.positive_int, default=20,
                      help='timed calls per latency (their median; after warm-up)')
  args = parser.parse_args(argv)
  if args.max_error_increase is not None and not 0 <= args.max_error_increase < 100:
    raise errors.UsageError(f'--max_error_increase {args.max_error_increase:g}: must be in '
                            '[0, 100) points')
  run = trained_run.load_run(args.workdir, args.step)
  if not run.config.data.validation_examples:
    raise errors.UsageError(
        f'{run.workdir} held out no validation examples (data.validation_examples=0): a '
        'cascade is fitted on the validation split; train with data.validation_examples > 0')
  depths, how = cascade_choice.candidate_depths(run, args.depths)
  if len(set(depths)) < 2:
    raise errors.UsageError(f'--depths gives {len(set(depths))} depth: a cascade needs at '
                            'least 2 (e.g. --depths all)')
  trunks = early_exit.TRUNKS if args.trunk == 'both' else (args.trunk,)
  result = cascade_choice.build(run, depths, how, args.stages, args.score, trunks, args,
                                cli.progress)
  print(result['report'], end='')


if __name__ == '__main__':
  cli.run(main)