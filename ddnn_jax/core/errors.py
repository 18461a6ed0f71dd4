"""What the tools raise for bad input: printed as one ``error:`` line, exit code 2.

A module of its own so that any module can raise them without importing the config or
data machinery.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


class UsageError(Exception):
  """Bad input from the user: a flag, a config field, a file, a workdir."""


class ConfigError(UsageError):
  """A config field that is unknown, missing or not allowed (the message names it)."""


class DataError(UsageError):
  """Data that is missing or unreadable; the message says what to download or run."""


def config_load_error(spec: str, cause: str) -> str:
  """The one wording of a config file that cannot be loaded, whichever tool loads it."""
  return f'cannot load --config {spec}: {cause}'


def _without_class(text: str) -> str:
  """'ValueError: unknown group' -> 'unknown group' (a traceback's last line)."""
  return re.sub(r'^(?:[A-Za-z_][\w.]*(?:Error|Exception)): ', '', text.strip())


def _dotted(key: str, argv: Sequence[str]) -> str:
  """The full field name of ``key`` in the --config.* override that named it."""
  for arg in argv:
    if arg.startswith('--config.'):
      path = arg[len('--config.'):].split('=', 1)[0].split('.')
      if key in path:
        return '.'.join(path[:path.index(key) + 1])
  return key


def one_line(err: BaseException, argv: Sequence[str] = ()) -> str:
  """An absl flag or ml_collections config-file error as one readable line, without
  exception class names; ``argv`` (the command line) lets an unknown field be named in
  full ('train.epochs')."""
  text = str(err).strip()
  if isinstance(err, (AttributeError, KeyError)):  # --config.train.no_such_field=...
    text = text.strip('\'"').replace("\\'", "'").replace('\\n', '\n')
    key = text.splitlines()[0].strip('\'"')
    dotted = _dotted(key, argv)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    suggestion = ''
    if hint:
      suggestion = f' (did you mean {dotted.rpartition(".")[0] + "." if "." in dotted else ""}'
      suggestion += f'{hint.group(1)}?)'
    return f'unknown config field {dotted!r}{suggestion}'
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if not lines:
    return type(err).__name__
  if 'config file' in text or 'Failed loading config' in text:
    spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
    if spec is None:
      found = re.search(r'--config=(\S+?):? ', text) or re.search(r'Attempted.*?\n\s+(\S+)', text)
      spec = found.group(1) if found else '?'
    cause = _without_class(lines[-1])
    if 'No such file or directory' in cause:
      cause = 'no such file'
    return config_load_error(spec, cause)
  return _without_class(lines[0])
