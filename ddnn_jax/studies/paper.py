"""The EKD paper's published top-1 errors (Zhao et al., arXiv:2103.00793, Tables 1 and 2).

One home for the paper's numbers: the README's preset table, ``python -m ddnn_jax.compare``
and the study report read them from here. Each group is one DDNN of the paper (its full
net and sub-nets), keyed by dataset and preset name (``configs/{cifar10,cifar100,
imagenet}.py:GROUP``); per depth it holds the error (%) of the net trained alone
('individual'), in a DDNN with hard labels only ('ddnn') and with EKD ('ekd'). The paper
gives no loss weights, temperature or schedule beyond the datasets and nets. (It prints
VGG-16's individual CIFAR-10 error as 6.19 in one group and 6.09 in the other; both are
kept as printed.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from ddnn_jax.nn import notation

SCHEMES = ('individual', 'ddnn', 'ekd')
SOURCE = 'Zhao et al., arXiv:2103.00793'


@dataclasses.dataclass(frozen=True)
class Group:
  dataset: str  # As config.data.dataset: 'cifar10', 'cifar100', 'imagenet2012'.
  name: str  # The preset: configs/<table file>.py:<name>.
  table: str  # 'Table 1' or 'Table 2'.
  arch: str  # The full net.
  # Depth -> scheme -> top-1 error (%), full net first, then the sub-nets largest first.
  errors: Mapping[notation.Depth, Mapping[str, float]]

  @property
  def depths(self) -> tuple[notation.Depth, ...]:
    return tuple(self.errors)

  @property
  def title(self) -> str:
    return f'{self.table}, {self.dataset} {self.name}'


def _errors(*rows: tuple[notation.Depth, float, float, float]
            ) -> dict[notation.Depth, dict[str, float]]:
  return {depth: dict(zip(SCHEMES, values)) for depth, *values in rows}


# Table 1: (group, full net, rows of (depth, CIFAR-10 I/D/E, CIFAR-100 I/D/E)), full net first.
_TABLE1 = (
    ('r20_r16', 'resnet20', (((3, 3, 3), (7.92, 8.31, 7.94), (32.52, 33.11, 32.33)),
                             ((2, 2, 2), (8.87, 8.91, 7.99), (33.95, 34.23, 32.45)))),
    ('r32_r20', 'resnet32', (((5, 5, 5), (7.25, 7.72, 7.28), (30.10, 31.75, 30.24)),
                             ((3, 3, 3), (7.92, 8.00, 7.34), (32.52, 32.62, 30.79)))),
    ('r44_r32', 'resnet44', (((7, 7, 7), (6.49, 6.78, 6.55), (29.23, 29.81, 29.32)),
                             ((5, 5, 5), (7.25, 7.15, 6.77), (30.10, 29.97, 29.17)))),
    ('r56_r44', 'resnet56', (((9, 9, 9), (6.09, 6.24, 6.13), (28.58, 28.76, 28.47)),
                             ((7, 7, 7), (6.49, 6.77, 6.00), (29.23, 29.16, 28.22)))),
    ('r56_r44_r32', 'resnet56', (((9, 9, 9), (6.09, 6.39, 6.04), (28.58, 29.02, 28.68)),
                                 ((7, 7, 7), (6.49, 6.62, 6.19), (29.23, 29.88, 28.97)),
                                 ((5, 5, 5), (7.25, 7.57, 6.95), (30.10, 31.40, 29.36)))),
    ('vgg16_vgg11', 'vgg16', (((2, 2, 3, 3, 3), (6.19, 6.42, 6.20), (27.72, 28.42, 27.83)),
                              ((1, 1, 2, 2, 2), (7.68, 7.75, 7.14), (32.00, 31.73, 30.78)))),
    ('vgg16_vgg13', 'vgg16', (((2, 2, 3, 3, 3), (6.09, 6.08, 6.15), (27.72, 27.64, 27.77)),
                              ((2, 2, 2, 2, 2), (6.23, 6.26, 6.27), (28.55, 28.65, 28.12)))),
)

# Table 2 (ImageNet, single-crop): (group, full net, rows of (depth, I/D/E)), full net first.
_TABLE2 = (
    ('r34_r18', 'resnet34', (((3, 4, 6, 3), 26.73, 27.44, 26.92),
                             ((2, 2, 2, 2), 31.22, 30.96, 29.78))),
    ('r50_r26', 'resnet50', (((3, 4, 6, 3), 23.94, 25.14, 24.12),
                             ((2, 2, 2, 2), 27.56, 28.22, 26.41))),
    ('r50_r32', 'resnet50', (((3, 4, 6, 3), 23.94, 24.86, 23.99),
                             ((2, 3, 3, 2), 26.13, 27.03, 25.39))),
    ('r50_r41', 'resnet50', (((3, 4, 6, 3), 23.94, 24.69, 23.83),
                             ((3, 4, 4, 2), 24.80, 25.71, 24.07))),
    ('r50_r44_r38', 'resnet50', (((3, 4, 6, 3), 23.94, 25.03, 24.10),
                                 ((3, 4, 4, 3), 24.68, 25.32, 24.38),
                                 ((3, 3, 3, 3), 25.19, 26.45, 24.55))),
)


def _build() -> tuple[Group, ...]:
  groups = []
  for column, dataset in enumerate(('cifar10', 'cifar100')):
    for name, arch, rows in _TABLE1:
      groups.append(Group(dataset, name, 'Table 1', arch,
                          _errors(*((depth, *values[column]) for depth, *values in rows))))
  for name, arch, rows in _TABLE2:
    groups.append(Group('imagenet2012', name, 'Table 2', arch, _errors(*rows)))
  return tuple(groups)


GROUPS: tuple[Group, ...] = _build()


def get(dataset: str, name: str) -> Group:
  for group in GROUPS:
    if group.dataset == dataset and group.name == name:
      return group
  known = ', '.join(sorted({f'{g.dataset}:{g.name}' for g in GROUPS}))
  raise ValueError(f'no paper group {dataset}:{name}; known: {known}')


def matching(dataset: str, arch: str, depths: Sequence[notation.Depth]) -> Group | None:
  """The paper's group of this dataset, full net and depth set (any order), if any."""
  wanted = {tuple(d) for d in depths}
  for group in GROUPS:
    if group.dataset == dataset and group.arch == arch and set(group.depths) == wanted:
      return group
  return None


def nearest(arch: str, depths: Sequence[notation.Depth], dataset: str = 'cifar10') -> Group | None:
  """For orientation on data the paper did not use: the ``dataset`` group with this full
  net that shares most depths with ``depths`` (None if no group has this full net)."""
  wanted = {tuple(d) for d in depths}
  candidates = [g for g in GROUPS if g.dataset == dataset and g.arch == arch]
  if not candidates:
    return None
  return max(candidates, key=lambda g: (len(wanted & set(g.depths)), -len(g.depths)))


PRESET_FILES = {'cifar10': 'configs/cifar10.py', 'cifar100': 'configs/cifar100.py',
                'imagenet2012': 'configs/imagenet.py'}


def markdown_table() -> str:
  """Every group's published top-1 errors, one row per group, the depths' errors joined by
  ' / ' in the order of its depths (the README's preset table)."""
  lines = ['| preset (`--config=`) | depths | Individual | DDNN | EKD |', '|---|---|---|---|---|']
  for group in GROUPS:
    depths = list(group.errors)
    cells = [' / '.join(f'{group.errors[d][s]:.2f}' for d in depths) for s in SCHEMES]
    lines.append(f'| `{PRESET_FILES[group.dataset]}:{group.name}` | '
                 + ' / '.join(notation.format_depth(d) for d in depths) + ' | '
                 + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'
