"""The nets ddnn_jax builds: their families, stage sizes and widths, and the depths of each.

``ARCHS`` names every full net (ResNet-20..110 for CIFAR, ResNet-18..101, VGG-11..19 with
BatchNorm, MobileNet-V1); a depth written as a name ('resnet32') or as block counts is
resolved and checked against one of them here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ddnn_jax.nn import notation


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  family: str  # 'cifar_resnet' | 'resnet_basic' | 'resnet_bottleneck' | 'vgg'
  stage_sizes: notation.Depth


ARCHS: dict[str, ArchSpec] = {
    # He et al. 2016, CIFAR: 3 stages of 16/32/64 channels, 6n+2 layers.
    'resnet20': ArchSpec('cifar_resnet', (3, 3, 3)),
    'resnet32': ArchSpec('cifar_resnet', (5, 5, 5)),
    'resnet44': ArchSpec('cifar_resnet', (7, 7, 7)),
    'resnet56': ArchSpec('cifar_resnet', (9, 9, 9)),
    'resnet110': ArchSpec('cifar_resnet', (18, 18, 18)),
    # He et al. 2016, ImageNet.
    'resnet18': ArchSpec('resnet_basic', (2, 2, 2, 2)),
    'resnet34': ArchSpec('resnet_basic', (3, 4, 6, 3)),
    'resnet50': ArchSpec('resnet_bottleneck', (3, 4, 6, 3)),
    'resnet101': ArchSpec('resnet_bottleneck', (3, 4, 23, 3)),
    # Simonyan & Zisserman 2015 with BatchNorm, CIFAR variant (5 stages + linear head).
    'vgg11': ArchSpec('vgg', (1, 1, 2, 2, 2)),
    'vgg13': ArchSpec('vgg', (2, 2, 2, 2, 2)),
    'vgg16': ArchSpec('vgg', (2, 2, 3, 3, 3)),
    'vgg19': ArchSpec('vgg', (2, 2, 4, 4, 4)),
    # Howard et al. 2017: a 3x3 stem of 32 channels, then depthwise-separable blocks of
    # 64, 128, 256, 512, 1024 channels (1, 2, 2, 6, 2 blocks; stride 2 in the first block of
    # every stage but the first). 'mobilenet_v1' is the CIFAR variant (stride-1 stem, for
    # 32x32 inputs); 'mobilenet_v1_imagenet' the published one (stride-2 stem, 224x224).
    'mobilenet_v1': ArchSpec('mobilenet', (1, 2, 2, 6, 2)),
    'mobilenet_v1_imagenet': ArchSpec('mobilenet_imagenet', (1, 2, 2, 6, 2)),
}

DEFAULT_WIDTH = {'cifar_resnet': 16, 'resnet_basic': 64, 'resnet_bottleneck': 64, 'vgg': 64,
                 'mobilenet': 32, 'mobilenet_imagenet': 32}
FAMILIES_OF_A_KIND = {'mobilenet': 'mobilenet', 'mobilenet_imagenet': 'mobilenet'}


def resolve_depth(spec: notation.DepthSpec, arch: str) -> notation.Depth:
  """A named depth ('resnet44', 'resnet44@0.5') or an explicit list, checked against
  ``arch``."""
  full = arch_spec(arch)
  if isinstance(spec, str):  # '2-2-2', '[2,2,2]', '2-2-2@0.5', 'resnet32@0.5', 'resnet32'.
    parsed = notation.parse_depth(spec)
    if isinstance(parsed, str) and '@' in parsed:
      name, _, width = parsed.rpartition('@')
      return notation.subnet(resolve_depth(name, arch), float(width))
    spec = parsed
  kind_of = lambda family: FAMILIES_OF_A_KIND.get(family, family)  # noqa: E731
  if isinstance(spec, str):
    named = ARCHS.get(spec.lower())
    if named is None:
      same = [n for n, a in ARCHS.items() if kind_of(a.family) == kind_of(full.family)]
      raise ValueError(f'unknown depth {spec!r}; use block counts per stage such as '
                       f'{notation.format_depth(full.stage_sizes)} or one of {", ".join(same)}')
    kind = kind_of(named.family)
    if kind != kind_of(full.family):
      raise ValueError(f'depth {spec!r} is a {named.family} but {arch} is a {full.family}')
    spec = named.stage_sizes
  return notation.check_depth(spec, full.stage_sizes, arch)


def arch_spec(arch: str) -> ArchSpec:
  try:
    return ARCHS[arch.lower()]
  except (KeyError, AttributeError):
    raise ValueError(f'unknown architecture {arch!r}; choose one of {", ".join(ARCHS)}') from None


def module_sequence(arch: str, depth: notation.Depth) -> tuple[str, ...]:
  """The top-level modules ``depth`` runs, in order (the head excluded): a cascade stage
  that continues another depth's computation skips their common leading modules."""
  spec = arch_spec(arch)
  stem = () if spec.family == 'vgg' else ('stem_conv', 'stem_bn')
  return stem + tuple(f'stage{s}_block{b}' for s, n in enumerate(depth) for b in range(n))


def same_width(a: notation.Depth, b: notation.Depth) -> bool:
  return notation.width_of(a) == notation.width_of(b)


def shared_prefix(arch: str, a: notation.Depth, b: notation.Depth) -> int:
  """How many leading modules depths ``a`` and ``b`` run alike (the same modules on the
  same input; their BN statistics may differ)."""
  if not same_width(a, b):
    return 0  # Other widths run other channels of every module.
  count = 0
  for x, y in zip(module_sequence(arch, a), module_sequence(arch, b)):
    if x != y:
      break
    count += 1
  return count


def layer_channels(arch: str, width: int | None = None) -> tuple[int, ...]:
  """The output channels of the net's layers by stage (stem first): what a channel group
  must divide for narrower widths to keep whole groups."""
  spec = arch_spec(arch)
  base = width or DEFAULT_WIDTH[spec.family]
  stages = len(spec.stage_sizes)
  if spec.family == 'vgg':
    return tuple(min(base * 2**s, base * 8) for s in range(stages))
  if spec.family in ('mobilenet', 'mobilenet_imagenet'):
    return (base, *(base * 2**(s + 1) for s in range(stages)))
  scale = 4 if spec.family == 'resnet_bottleneck' else 1
  return (base, *(base * 2**s for s in range(stages)),
          *(scale * base * 2**s for s in range(stages)))


def depth_set(arch: str, subnets: Sequence[notation.DepthSpec] = ()) -> tuple[notation.Depth, ...]:
  """The full net's depth followed by the sub-nets', largest first, all validated.

  "Larger" means more blocks (ties: deeper late stages first); this order is the
  teacher-assistant chain of IPKD-TA.
  """
  full = arch_spec(arch).stage_sizes
  subs = [resolve_depth(s, arch) for s in notation.subnet_specs(subnets)]
  for depth in subs:
    if depth == full:
      raise ValueError(f'sub-net {notation.quoted(depth)} is the full net {arch} itself')
  if len(set(subs)) != len(subs):
    raise ValueError(f'sub-nets repeat a depth: {", ".join(notation.quoted(s) for s in subs)}')
  subs.sort(key=lambda d: (sum(d), d[::-1]), reverse=True)
  return (full, *subs)


def depth_label(arch: str, depth: notation.Depth) -> str | None:
  """The named net a depth equals (e.g. (5, 5, 5) of a ResNet-56 is 'resnet32'), or None."""
  family = arch_spec(arch).family
  width = notation.width_of(depth)
  for name, spec in ARCHS.items():
    if spec.family == family and spec.stage_sizes == notation.blocks_of(depth):
      return name if width == 1.0 else f'{name}@{width:g}'
  return None
