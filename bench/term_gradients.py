"""What the diagnosis costs: the train step against the per-term gradient norms.

  python bench/term_gradients.py [--config configs/fmnist20k.py] [--mode ekd] [--repeats 5]

Times, on a synthetic batch of the config's shape (compiled first), one train step and
one call of ``steps.term_gradient_norms`` (a forward pass, then a backward pass per
weighted loss term), and prints their ratio and the share of a run's time the diagnosis
takes at ``train.term_gradients_every_steps`` (and at every log step). Nothing else may
run meanwhile. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/fmnist20k.py')
  parser.add_argument('--mode', default='ekd')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  from ddnn_jax.studies import records  # pylint: disable=g-import-not-at-top
  from ddnn_jax.training import config_lib  # pylint: disable=g-import-not-at-top
  from ddnn_jax.cpu import device_count  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(args.config)
  config.mode = args.mode
  if not config.train.term_gradients_every_steps:
    config.train.term_gradients_every_steps = config.train.log_every_steps
  device_count.apply_for_training(config.train.batch_size)
  import jax  # pylint: disable=g-import-not-at-top
  from ddnn_jax.training import trainer  # pylint: disable=g-import-not-at-top
  measured = trainer.measure_step_seconds(config, repeats=args.repeats)
  step, terms = measured['train_step_s'], measured['term_gradients_s']
  every, log_every = config.train.term_gradients_every_steps, config.train.log_every_steps
  print(f'{records.cpu_model()} ({records.instruction_set()}), {os.cpu_count()} cores, '
        f'{jax.device_count()} devices; {args.config} mode {args.mode}, batch '
        f'{config.train.batch_size}')
  print('| what | seconds | train steps |')
  print('|---|---|---|')
  print(f'| train step | {step:.3f} | 1 |')
  print(f'| term gradient norms | {terms:.3f} | {terms / step:.1f} |')
  for n in sorted({every, log_every}):
    print(f'| diagnosis every {n} steps: share of the training time | '
          f'{terms / (n * step + terms):.1%} | |')


if __name__ == '__main__':
  main()
