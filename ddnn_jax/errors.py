"""What the tools raise for bad input: printed as one ``error:`` line, exit code 2.

A module of its own so that any module can raise them without importing the config or
data machinery.
"""


class UsageError(Exception):
  """Bad input from the user: a flag, a config field, a file, a workdir."""


class ConfigError(UsageError):
  """A config field that is unknown, missing or not allowed (the message names it)."""


class DataError(UsageError):
  """Data that is missing or unreadable; the message says what to download or run."""


def one_line(err: BaseException) -> str:
  """An absl flag or ml_collections config-file error as one readable line."""
  text = str(err).strip()
  if isinstance(err, (AttributeError, KeyError)):  # --config.no_such_field=...
    text = text.strip('\'"').replace("\\'", "'").replace('\\n', ' ')
    return f'unknown config field {text}'
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if not lines:
    return type(err).__name__
  if 'config file' in text:  # The cause (missing file, syntax error) is on the last line.
    return f'cannot load --config: {lines[-1]}'
  return lines[0]
