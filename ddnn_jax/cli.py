"""What the command-line tools share: one-line errors with exit code 2, progress bars.

Every tool is ``python -m ddnn_jax.NAME``: bad input prints one ``error: ...`` line on
stderr, exits with 2 and writes nothing; long work shows a progress bar on stderr;
results go to files as well as the terminal.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, TypeVar

from ddnn_jax import errors

T = TypeVar('T')
ArgumentTypeError = argparse.ArgumentTypeError
UsageError = errors.UsageError


def fail(message: str, code: int = 2) -> NoReturn:
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr, flush=True)
  sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are one ``error:`` line (exit code 2), no usage dump."""

  def error(self, message: str) -> NoReturn:
    fail(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Keeps the line breaks of a tool's description and epilog (its docstring)."""


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
  from ddnn_jax import cpu_defaults  # pylint: disable=g-import-not-at-top
  cpu_defaults.apply()
  try:
    return main(argv)
  except errors.UsageError as err:
    fail(str(err))
