"""The package's layout and layering.

The top level holds the commands (``python -m ddnn_jax.NAME``) and ``cli``, what they
share; the library is in subpackages by concern. Commands import the library (and
``cli``), never each other; the library never imports the top level. Subpackages import
downwards only: core < cpu < nn, data < training < deploy < studies (``nn`` and ``data``
know nothing of each other), and no import chain inside a subpackage leads back to its
start. Imports inside functions count.
"""

import ast
import pathlib
import textwrap

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'ddnn_jax'
COMMANDS = {'main', 'evaluate', 'search', 'export', 'predict', 'cascade', 'compare', 'study',
            'profile', 'prepare'}
SHARED = {'cli'}  # Top-level modules the commands share.
# Subpackages by rank: a module imports only subpackages of a lower rank, and its own.
RANKS = {'core': 0, 'cpu': 1, 'nn': 2, 'data': 2, 'training': 3, 'deploy': 4, 'studies': 5}


def _command_line_modules() -> set[str]:
  """The top-level modules that run as ``python -m ddnn_jax.NAME`` (tests/test_cli.py)."""
  return {p.stem for p in PACKAGE.glob('*.py') if "if __name__ == '__main__':" in p.read_text()}


def _module_id(path: pathlib.Path, package: pathlib.Path) -> str:
  """'nn.models' for package/nn/models.py, 'cli' for package/cli.py, '' for __init__."""
  parts = path.relative_to(package).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules(package: pathlib.Path) -> dict[str, pathlib.Path]:
  return {_module_id(p, package): p for p in package.rglob('*.py')}


def _imports(path: pathlib.Path, package: pathlib.Path = PACKAGE) -> set[str]:
  """The ddnn_jax modules (or subpackages) ``path`` imports, at any depth of the file:
  ``from ddnn_jax.nn import models`` and ``from ddnn_jax.nn.models import DDNN`` give
  'nn.models', ``from ddnn_jax import cli`` 'cli'; relative imports are resolved."""
  known = _modules(package)
  here = _module_id(path, package).split('.') if path.name != '__init__.py' else (
      _module_id(path, package).split('.') + ['__init__'])
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name.removeprefix('ddnn_jax.') for a in node.names
                if a.name.startswith('ddnn_jax.')}
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # from . import x / from ..nn import models
        base = here[:len(here) - node.level]
        module = '.'.join(['ddnn_jax', *base, *([node.module] if node.module else [])])
      else:
        module = node.module or ''
      if module != 'ddnn_jax' and not module.startswith('ddnn_jax.'):
        continue
      prefix = module.removeprefix('ddnn_jax').removeprefix('.')
      for alias in node.names:
        name = f'{prefix}.{alias.name}' if prefix else alias.name
        found.add(name if name in known else prefix)
  return {m for m in found if m}


def _layer(module: str) -> str:
  """The subpackage of a module id ('nn.models' -> 'nn'), or 'top'."""
  first = module.split('.')[0]
  return first if first in RANKS else 'top'


def _violations(package: pathlib.Path, commands=COMMANDS) -> list[str]:
  """Every import that breaks the layering, as 'importer -> imported: why'."""
  modules = _modules(package)
  graph = {m: _imports(p, package) for m, p in modules.items()}
  found = []
  for module, imported in sorted(graph.items()):
    layer = _layer(module)
    for other in sorted(imported):
      other_layer = _layer(other)
      if other in commands and other != module:
        found.append(f'{module} -> {other}: imports a command')
      elif layer in RANKS and other_layer == 'top':
        found.append(f'{module} -> {other}: the library imports the top level')
      elif layer in RANKS and other_layer != layer and RANKS[other_layer] >= RANKS[layer]:
        found.append(f'{module} -> {other}: {layer} may not import {other_layer}')
  # No cycles inside a subpackage (across subpackages the ranks already exclude them).
  for start in sorted(graph):
    stack, seen = [start], set()
    while stack:
      current = stack.pop()
      for other in graph.get(current, ()):
        if other == start and _layer(start) != 'top':
          found.append(f'{start} -> ... -> {start}: an import cycle through {current}')
        elif other not in seen and _layer(other) == _layer(start) and other in graph:
          seen.add(other)
          stack.append(other)
  return sorted(set(found))


def test_the_commands_are_the_top_level():
  top = {p.stem for p in PACKAGE.glob('*.py')} - {'__init__'}
  assert top == COMMANDS | SHARED
  assert _command_line_modules() == COMMANDS
  assert set(RANKS) == {p.name for p in PACKAGE.iterdir() if (p / '__init__.py').exists()}


def test_every_module_is_in_a_layer_and_the_layering_holds():
  assert not _violations(PACKAGE)


def test_subpackages_hold_a_docstring_and_no_reexports():
  for name in RANKS:
    tree = ast.parse((PACKAGE / name / '__init__.py').read_text())
    assert len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr), name
    assert len(ast.get_docstring(tree).split()) > 10, name


def test_no_function_shadows_a_module_it_uses():
  """No local (or argument) is named like a ddnn_jax module the file imports at its top,
  in a function that uses that name as a module would (``models.DDNN`` would read the
  local): module names are chosen apart from the locals the code base uses."""
  offenders = []
  for path in [*PACKAGE.rglob('*.py'), *PACKAGE.parent.glob('tests/*.py'),
               *PACKAGE.parent.glob('bench/*.py')]:
    tree = ast.parse(path.read_text())
    modules = {a.asname or a.name for node in tree.body if isinstance(node, ast.ImportFrom)
               and (node.module or '').startswith('ddnn_jax') for a in node.names}
    for fn in ast.walk(tree):
      if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        continue
      args = fn.args
      bound = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg,
                               args.kwarg] if a is not None}
      bound |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)
                and isinstance(n.ctx, ast.Store)}
      used = {n.value.id for n in ast.walk(fn) if isinstance(n, ast.Attribute)
              and isinstance(n.value, ast.Name)}
      offenders += [f'{path.relative_to(PACKAGE.parent)}:{fn.lineno} {name}'
                    for name in sorted(modules & bound & used)]
  assert not offenders, offenders


def test_the_reader_sees_every_form_the_package_uses():
  # From a subpackage, from the top level, a module's name, nested in a function.
  assert {'cli', 'deploy.evaluation', 'deploy.trained_run'} <= _imports(PACKAGE / 'evaluate.py')
  main = _imports(PACKAGE / 'main.py')
  assert {'cli', 'cpu.defaults', 'cpu.device_count', 'training.trainer',
          'core.parallel'} <= main  # 'from ddnn_jax.cli import fail'; imports in main().
  assert 'cpu.onednn' in _imports(PACKAGE / 'cpu' / 'device_count.py')  # In a function.


def test_the_layering_check_can_fail(tmp_path):
  package = tmp_path / 'ddnn_jax'
  files = {
      '__init__.py': '',
      'cli.py': 'from ddnn_jax.core import errors\n',
      'main.py': 'from ddnn_jax import cli, evaluate\n',
      'evaluate.py': 'import ddnn_jax.nn.models\n',
      'core/__init__.py': '"""Core."""\n',
      'core/errors.py': 'def f():\n  from ddnn_jax.nn import models\n',
      'nn/__init__.py': '"""Nets."""\n',
      'nn/models.py': 'from ddnn_jax.data.pipeline import batches\nfrom . import layers\n',
      'nn/layers.py': 'from ddnn_jax.nn.models import DDNN\n',
      'data/__init__.py': '"""Data."""\n',
      'data/pipeline.py': 'from ddnn_jax import cli\n',
  }
  for name, text in files.items():
    (package / name).parent.mkdir(parents=True, exist_ok=True)
    (package / name).write_text(textwrap.dedent(text))
  assert _violations(package, commands={'main', 'evaluate'}) == [
      'core.errors -> nn.models: core may not import nn',
      'data.pipeline -> cli: the library imports the top level',
      'main -> evaluate: imports a command',
      'nn.layers -> ... -> nn.layers: an import cycle through nn.models',
      'nn.models -> ... -> nn.models: an import cycle through nn.layers',
      'nn.models -> data.pipeline: nn may not import data',
  ]


@pytest.mark.parametrize('name', sorted(COMMANDS))
def test_commands_stay_thin(name):
  """A command parses its flags, calls the library and prints: no classes of its own."""
  tree = ast.parse((PACKAGE / f'{name}.py').read_text())
  assert not [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
