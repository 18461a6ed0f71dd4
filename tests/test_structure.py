"""The package's layering: command-line modules import libraries, never each other."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'ddnn_jax'


def _imports(path):
  """The ddnn_jax modules ``path`` imports (at any depth of the file)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module == 'ddnn_jax':
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('ddnn_jax.'):
      found.add(node.module.split('.')[1])
    elif isinstance(node, ast.Import):
      found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('ddnn_jax.')}
  return found


def _command_line_modules():
  return {p.stem for p in PACKAGE.glob('*.py') if "if __name__ == '__main__':" in p.read_text()}


def test_command_line_modules_are_known():
  assert _command_line_modules() >= {'main', 'evaluate', 'search', 'export', 'predict',
                                     'compare', 'profile', 'prepare', 'study', 'cascade'}


def test_no_module_imports_a_command_line_module():
  tools = _command_line_modules()
  offenders = {path.stem: _imports(path) & (tools - {path.stem})
               for path in PACKAGE.glob('*.py')}
  assert not {k: v for k, v in offenders.items() if v}, offenders


def test_the_reader_can_fail():
  # _imports sees the forms the package uses (the check above is not vacuous).
  assert {'deploy', 'cli'} <= _imports(PACKAGE / 'evaluate.py')
  assert 'cli' in _imports(PACKAGE / 'study.py')
