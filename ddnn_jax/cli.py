"""What the command-line tools share: one-line errors with exit code 2, progress bars, flags.

Every tool is ``python -m ddnn_jax.NAME``: bad input prints one ``error: ...`` line on
stderr, exits with 2 and writes nothing; long work shows a progress bar on stderr;
results go to files as well as the terminal.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, TypeVar

from ddnn_jax.core import errors

T = TypeVar('T')


def fail(message: str, code: int = 2) -> NoReturn:
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr, flush=True)
  sys.exit(code)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Keeps the line breaks of a tool's docstring and shows every default that is a value."""

  def _get_help_string(self, action):
    text = action.help or ''
    if (action.default in (None, False, argparse.SUPPRESS) or 'default' in text
        or (not action.option_strings and action.nargs not in ('?', '*'))):
      return text
    return f'{text} (default: %(default)s)'


class ArgumentParser(argparse.ArgumentParser):
  """argparse as every tool uses it: the tool's docstring as its help (with what it writes),
  defaults shown, an example at the end; usage errors as one ``error:`` line (exit code
  2, no usage dump). Flags are spelled with underscores; the same names with hyphens, and
  the old names in ``aliases``, are accepted too."""

  def __init__(self, *, prog: str, doc: str | None = None, example: str | None = None,
               aliases: dict[str, str] | None = None, **kwargs):
    if doc is not None:
      kwargs.setdefault('description', doc.strip())
    if example is not None:
      kwargs.setdefault('epilog', f'Example:\n  {example}')
    kwargs.setdefault('formatter_class', HelpFormatter)
    super().__init__(prog=prog, **kwargs)
    self.aliases = dict(aliases or {})

  def _spelling(self, arg: str) -> str:
    if not arg.startswith('--') or arg == '--':
      return arg
    name, eq, value = arg.partition('=')
    name = self.aliases.get(name, name)
    underscored = '--' + name[2:].replace('-', '_')
    if underscored in self._option_string_actions:
      name = underscored
    return name + eq + value

  def parse_known_args(self, args=None, namespace=None):
    args = list(sys.argv[1:] if args is None else args)
    if '--' in args:  # What follows '--' is not this tool's.
      cut = args.index('--')
      args = [*map(self._spelling, args[:cut]), *args[cut:]]
    else:
      args = [self._spelling(a) for a in args]
    return super().parse_known_args(args, namespace)

  def error(self, message: str) -> NoReturn:
    fail(message)


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f'an integer >= 1, not {text!r}')
  return value


def positive_float(text: str) -> float:
  """argparse type: a finite number > 0."""
  try:
    value = float(text)
  except ValueError:
    value = float('nan')
  if not 0 < value < float('inf'):
    raise argparse.ArgumentTypeError(f'a number > 0, not {text!r}')
  return value


def progress(items: Iterable[T], description: str, total: int | None = None,
             unit: str = 'it') -> Iterable[T]:
  """A tqdm progress bar on stderr (hidden when stderr is not a terminal and quiet)."""
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(items, desc=description, total=total, unit=unit, file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0, leave=False)


def run(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> Any:
  """Runs a tool's ``main(argv)`` and returns what it returns; bad input (UsageError and
  its kinds) ends as one ``error:`` line with exit code 2."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)  # Orbax logs every file it reads, tfds its decoder.
  from ddnn_jax.cpu import defaults  # pylint: disable=g-import-not-at-top
  defaults.apply()
  try:
    return main(argv)
  except errors.UsageError as err:
    fail(str(err))


# --- the deploy commands' flags ---------------------------------------------------


def add_run_flags(parser: ArgumentParser) -> None:
  parser.add_argument('--workdir', required=True, help='the --workdir of a training run')
  parser.add_argument('--step', default='latest', type=parse_step,
                      help="checkpoint: 'latest' (default), 'best' or a step number")


def add_measure_flags(parser: ArgumentParser) -> None:
  # pylint: disable-next=g-import-not-at-top
  from ddnn_jax.deploy import bn_calibration  # Imports jax: only the deploy tools need it.
  parser.add_argument('--calib_examples', type=positive_int,
                      default=bn_calibration.DEFAULT_CALIB_EXAMPLES,
                      help='training images for BN recalibration of untrained depths')
  parser.add_argument('--batch_size', type=positive_int, default=64,
                      help='batch of the accuracy pass and of the larger latency (also at 1)')
  parser.add_argument('--latency_repeats', type=positive_int, default=20,
                      help='timed calls per latency (their median; after warm-up)')


def parse_step(text: str) -> str | int:
  if text in ('latest', 'best'):
    return text
  if text.isdigit():
    return int(text)
  raise argparse.ArgumentTypeError(f"'latest', 'best' or a step number, not {text!r}")


def parse_flops(text: str) -> float:
  """argparse type: '20M', '1.5G', '800K' or a plain number of multiply-adds."""
  scale = {'K': 1e3, 'M': 1e6, 'G': 1e9}.get(text[-1:].upper(), 1)
  try:
    value = float(text[:-1] if scale != 1 else text) * scale
  except ValueError:
    value = math.nan
  if not 0 < value < math.inf:
    raise argparse.ArgumentTypeError(
        f"a number of multiply-adds like 20M or 1.5G, not {text!r}")
  return value
