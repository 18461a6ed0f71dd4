"""Every tool's --help: exit 0, defaults shown, what it writes, an example; one flag spelling."""

import importlib
import re
import subprocess
import sys

import pytest

from jobs import REPO
from test_structure import _command_line_modules

TOOLS = sorted(_command_line_modules() - {'main'})
FLAG = re.compile(r'(?<![\w-])--[a-z][a-z0-9_-]*')


def _help(tool, capsys):
  module = importlib.import_module(f'ddnn_jax.{tool}')
  with pytest.raises(SystemExit) as done:
    module.main(['--help'])
  assert done.value.code == 0, tool
  return capsys.readouterr().out


def test_every_tool_is_covered():
  assert {'evaluate', 'search', 'export', 'predict', 'cascade', 'compare', 'study',
          'profile', 'prepare'} <= set(TOOLS)


@pytest.mark.parametrize('tool', TOOLS)
def test_help_exits_0_with_defaults_what_it_writes_and_an_example(tool, capsys):
  text = _help(tool, capsys)
  assert 'Writes' in text, tool
  assert re.search(r'\(default:\s[^)]+\)', text), tool
  example = text.rstrip().splitlines()
  assert example[-2] == 'Example:' and example[-1].strip().startswith(
      f'python -m ddnn_jax.{tool} '), tool


def test_main_help_exits_0_with_what_it_writes_and_an_example():
  for flag in ('--help', '-h'):
    result = subprocess.run([sys.executable, '-m', 'ddnn_jax.main', flag], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'Writes the workdir' in result.stdout and '--workdir' in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].strip().startswith('python -m ddnn_jax.main')


@pytest.mark.parametrize('tool', TOOLS)
def test_flags_are_spelled_with_underscores(tool, capsys):
  text = _help(tool, capsys)
  options = text.split('options:', 1)[1] if 'options:' in text else text
  flags = {f for f in FLAG.findall(options) if not f.startswith('--config.')}
  assert flags, tool
  assert not [f for f in flags if '-' in f[2:]], (tool, sorted(flags))


def test_hyphenated_and_old_spellings_still_parse(capsys):
  from ddnn_jax import profile  # pylint: disable=g-import-not-at-top
  profile.main(['resnet20', '--subnets', '2-2-2'])  # The old name of --depths.
  assert '| 2-2-2 | 6 |' in capsys.readouterr().out
  profile.main(['resnet20', '--depths=1-1-1', '--channel-group', '8'])
  assert '| 1-1-1 | 3 |' in capsys.readouterr().out
