"""The paper's published errors: one group per preset, as printed in Tables 1 and 2."""

import os
import re

import pytest

from ddnn_jax.nn import architectures
from ddnn_jax.studies import paper
from ddnn_jax.training import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TABLES = os.path.join(REPO, '..', 'shared', 'PAPER-TABLES.md')


def test_every_preset_is_its_paper_group():
  assert len(paper.GROUPS) == 7 + 7 + 5
  for group in paper.GROUPS:
    config = config_lib.load_config(f'{paper.PRESET_FILES[group.dataset]}:{group.name}')
    assert config.data.dataset == group.dataset and config.model.arch == group.arch
    depths = architectures.depth_set(config.model.arch, config.model.subnets)
    assert depths == group.depths, group.title  # Full net first, then sub-nets largest first.
    assert paper.matching(group.dataset, group.arch, depths[::-1]) is group


def test_lookups():
  assert paper.get('cifar100', 'r56_r44').errors[(7, 7, 7)] == {
      'individual': 29.23, 'ddnn': 29.16, 'ekd': 28.22}
  assert paper.matching('fashion_mnist', 'resnet20', [(3, 3, 3), (2, 2, 2)]) is None
  assert paper.matching('cifar10', 'resnet20', [(3, 3, 3)]) is None  # Not the whole group.
  near = paper.nearest('resnet20', [(3, 3, 3), (2, 2, 2), (1, 1, 1)])
  assert (near.dataset, near.name) == ('cifar10', 'r20_r16')
  assert paper.nearest('resnet56', [(9, 9, 9), (5, 5, 5)]).name == 'r56_r44_r32'
  assert paper.nearest('resnet110', [(18, 18, 18)]) is None
  with pytest.raises(ValueError, match='no paper group cifar10:nope'):
    paper.get('cifar10', 'nope')


@pytest.mark.skipif(not os.path.isfile(SHARED_TABLES), reason='the project lead\'s copy of '
                    'the tables is not beside this checkout')
def test_the_numbers_are_the_printed_ones():
  text = open(SHARED_TABLES, encoding='utf-8').read()
  printed = []
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip('|').split('|')]
    if line.startswith('|') and re.fullmatch(r'\d+\.\d\d', cells[-1] if cells else ''):
      printed.append([float(c) for c in cells if re.fullmatch(r'\d+\.\d\d', c)])
    elif line.startswith('|') and len(cells) > 5 and re.fullmatch(r'\d+\.\d\d', cells[3]):
      printed.append([float(c) for c in cells if re.fullmatch(r'\d+\.\d\d', c)])
  ours = []
  for dataset in ('cifar10', 'cifar100'):
    ours.append(sorted(tuple(e[s] for s in paper.SCHEMES) for g in paper.GROUPS
                       if g.dataset == dataset for e in g.errors.values()))
  table1 = [row for row in printed if len(row) == 6]
  table2 = [row for row in printed if len(row) == 3]
  assert len(table1) == 15 and len(table2) == 11
  assert sorted(tuple(r[:3]) for r in table1) == ours[0]
  assert sorted(tuple(r[3:]) for r in table1) == ours[1]
  assert sorted(map(tuple, table2)) == sorted(
      tuple(e[s] for s in paper.SCHEMES) for g in paper.GROUPS if g.dataset == 'imagenet2012'
      for e in g.errors.values())


def test_readme_quotes_every_group():
  readme = open(os.path.join(REPO, 'README.md'), encoding='utf-8').read()
  assert paper.markdown_table() in readme
