r"""Trains and evaluates a DDNN.

  python -m ddnn_jax.main --config configs/default.py --workdir /tmp/ddnn \
      [--config.train.num_epochs=1 ...]

Multi-host GPU clusters add --coordinator_address=HOST:PORT --num_processes=N
--process_id=I; SLURM and Open MPI jobs are detected without flags; TPU pod slices
pass --distributed (launch/tpu_vm.sh does).

Writes the workdir: ``config.json``, ``dataset.json``, ``checkpoints/`` (the latest,
and the best by mean validation accuracy), ``metrics.jsonl`` and ``tb/`` (train and
evaluation metrics), ``results.md``/``results.csv`` (every depth's params, FLOPs, test
and validation error) and ``accuracy_vs_flops.png``.

Exit codes: 0 done; 2 bad input (config, data, workdir, checkpoint), one ``error:``
line; 3 diverged (a loss went non-finite; the latest checkpoint is the last finite
state); 75 stopped by SIGTERM/SIGINT after saving a checkpoint (rerun to continue).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ddnn_jax.cli import fail
from ddnn_jax.core import errors
from ddnn_jax.cpu import defaults, device_count

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host GPU).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host GPU).')
flags.DEFINE_integer('process_id', None, 'Index of this process (multi-host GPU).')
flags.DEFINE_bool('distributed', False, 'Join the multi-process run jax detects (TPU pod slices).')
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/default.py.',
                                lock_config=True)


HELP_FLAGS = ('-h', '--help', '--helpshort', '--helpfull', '-?')
EXAMPLE = 'python -m ddnn_jax.main --config configs/default.py --workdir /tmp/ddnn'


def usage() -> str:
  """The help: this docstring, the flags with their defaults, an example."""
  lines = [__doc__.strip(), '', 'Flags:']
  for name in ('config', 'workdir', 'coordinator_address', 'num_processes', 'process_id',
               'distributed'):
    flag = FLAGS[name]
    default = '' if flag.default in (None, False) else f' (default: {flag.default})'
    lines.append(f'  --{name}: {flag.help}{default}')
  lines += ['  --config.KEY=VALUE: override one config field, e.g. --config.train.num_epochs=1',
            '', 'Example:', f'  {EXAMPLE}']
  return '\n'.join(lines)


def parse_flags(argv: list[str]) -> list[str]:
  if any(arg in HELP_FLAGS for arg in argv[1:]):
    print(usage())
    sys.exit(0)
  # absl would print a usage dump (and config_flags a traceback): one line instead.
  try:
    rest = FLAGS(argv)
    if FLAGS.config is not None:
      FLAGS.config.keys()  # A config file that failed to load only says so on access.
    return rest
  except Exception as err:  # noqa: BLE001 - flag and config-file errors of every kind.
    fail(errors.one_line(err, argv))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.config is None or not FLAGS.workdir:
    fail('both --config and --workdir are required, e.g. '
         '--config configs/default.py --workdir /tmp/ddnn')
  logging.set_verbosity(logging.ERROR)  # Orbax logs every file it writes, tfds its decoder.
  device_count.apply_for_training(FLAGS.config.train.batch_size, FLAGS.num_processes or 1)
  # Imported after flag parsing: jax must not initialise before jax.distributed does.
  # pylint: disable=g-import-not-at-top
  from ddnn_jax.core import parallel
  from ddnn_jax.training import divergence, preemption, trainer
  # pylint: enable=g-import-not-at-top
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id, detect=FLAGS.distributed)
  try:
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except errors.UsageError as err:  # Config, data, workdir and checkpoint problems.
    fail(str(err))
  except divergence.Diverged as err:
    fail(str(err), divergence.EXIT_CODE)
  except preemption.Preempted as err:
    print(str(err), file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_CODE)


if __name__ == '__main__':
  defaults.reexec_with_tcmalloc()
  app.run(main, flags_parser=parse_flags)
