"""DDNN backbones: one parameter tree, any depth configuration at call time.

A depth configuration is a tuple with the number of blocks to run in each stage.
A sub-net runs the first ``n_i`` blocks of stage ``i`` and skips the rest, so every
sub-net is a subset of the full net's modules. Modules are named explicitly
(``stage{s}_block{b}``) so each depth maps onto the same parameters.

Every model's ``__call__(x, depth=None, train=True)`` returns ``(logits, features)``
where ``features`` holds the output map of each stage (used by attention
distillation). ``depth`` must be static (a Python tuple), so each depth is its own
trace of the one module.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Sequence
from typing import Any, Callable, Union

import flax.linen as nn
import jax.numpy as jnp

Depth = tuple[int, ...]
DepthSpec = Union[str, Sequence[int]]
ModuleDef = Callable[..., nn.Module]


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  family: str  # 'cifar_resnet' | 'resnet_basic' | 'resnet_bottleneck' | 'vgg'
  stage_sizes: Depth


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
}

DEFAULT_WIDTH = {'cifar_resnet': 16, 'resnet_basic': 64, 'resnet_bottleneck': 64, 'vgg': 64}


def _fmt(depth: Any) -> str:
  if isinstance(depth, str):
    return repr(depth)
  try:
    return '[' + ','.join(str(d) for d in depth) + ']'
  except TypeError:
    return repr(depth)


def check_depth(depth: Any, full: Depth, arch: str = 'the full net') -> Depth:
  """Validates a depth configuration against the full net's; returns it as a tuple."""
  if isinstance(depth, (str, bytes)) or not isinstance(depth, Sequence):
    raise ValueError(f'depth {_fmt(depth)} must be a list of block counts per stage')
  if len(depth) != len(full):
    raise ValueError(
        f'depth {_fmt(depth)} has {len(depth)} stages but {arch} has {len(full)}')
  for stage, (n, n_full) in enumerate(zip(depth, full)):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
      raise ValueError(f'depth {_fmt(depth)}: stage {stage} count {n!r} is not an integer')
    if n < 1:
      raise ValueError(f'depth {_fmt(depth)}: stage {stage} needs at least 1 block, got {n}')
    if n > n_full:
      raise ValueError(
          f'depth {_fmt(depth)}: stage {stage} has {n} blocks but {arch} '
          f'{_fmt(full)} has only {n_full}')
  return tuple(int(n) for n in depth)


def resolve_depth(spec: DepthSpec, arch: str) -> Depth:
  """A named depth ('resnet44') or an explicit list, checked against ``arch``."""
  full = arch_spec(arch)
  if isinstance(spec, str):
    named = ARCHS.get(spec.lower())
    if named is None:
      raise ValueError(f'unknown depth {spec!r}; use a list of blocks per stage or one of '
                       f'{", ".join(ARCHS)}')
    if named.family != full.family:
      raise ValueError(f'depth {spec!r} is a {named.family} but {arch} is a {full.family}')
    spec = named.stage_sizes
  return check_depth(spec, full.stage_sizes, arch)


def parse_depths(text: str) -> list[DepthSpec]:
  """Command-line depth lists: 'resnet44,5-5-5' -> ['resnet44', (5, 5, 5)].

  Only the syntax is checked here; ``resolve_depth`` checks them against a net.
  """
  depths: list[DepthSpec] = []
  for item in filter(None, text.split(',')):
    if not item[0].isdigit():
      depths.append(item)
    elif all(n.isdigit() for n in item.split('-')):
      depths.append(tuple(int(n) for n in item.split('-')))
    else:
      raise ValueError(f'depth {item!r} must be a name or block counts joined by "-", e.g. 5-5-5')
  return depths


def arch_spec(arch: str) -> ArchSpec:
  try:
    return ARCHS[arch.lower()]
  except (KeyError, AttributeError):
    raise ValueError(f'unknown architecture {arch!r}; choose one of {", ".join(ARCHS)}') from None


def depth_name(depth: Depth) -> str:
  """Stable, readable key of a depth: (5, 5, 5) -> '5-5-5'."""
  return '-'.join(str(n) for n in depth)


def _conv(features: int, kernel: int, strides: int = 1, *, name: str, dtype: Any) -> nn.Conv:
  # Symmetric padding as in the reference (PyTorch) nets; 'SAME' pads asymmetrically
  # at stride 2 and would shift every downsampled map by half a pixel.
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (strides, strides), padding=((pad, pad), (pad, pad)),
                 use_bias=False, dtype=dtype, name=name,
                 kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'))


class BasicBlock(nn.Module):
  """Two 3x3 convs. Where shapes change, the shortcut is a 1x1 projection (ImageNet) or,
  with ``zero_pad_shortcut``, He et al.'s parameter-free subsample + zero-pad (CIFAR
  option A, which gives ResNet-20 its 0.27M parameters)."""
  filters: int
  strides: int
  norm: ModuleDef
  dtype: Any = jnp.float32
  zero_pad_shortcut: bool = False

  @nn.compact
  def __call__(self, x):
    y = _conv(self.filters, 3, self.strides, name='conv1', dtype=self.dtype)(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = _conv(self.filters, 3, name='conv2', dtype=self.dtype)(y)
    y = self.norm(name='bn2')(y)
    if x.shape != y.shape and self.zero_pad_shortcut:
      x = x[:, ::self.strides, ::self.strides, :]
      extra = self.filters - x.shape[-1]
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    elif x.shape != y.shape:
      x = _conv(self.filters, 1, self.strides, name='proj_conv', dtype=self.dtype)(x)
      x = self.norm(name='proj_bn')(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """ImageNet Bottleneck (stride on the 3x3 conv, 'ResNet v1.5')."""
  filters: int
  strides: int
  norm: ModuleDef
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = _conv(self.filters, 1, name='conv1', dtype=self.dtype)(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = _conv(self.filters, 3, self.strides, name='conv2', dtype=self.dtype)(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = _conv(self.filters * 4, 1, name='conv3', dtype=self.dtype)(y)
    y = self.norm(name='bn3')(y)
    if x.shape != y.shape:
      x = _conv(self.filters * 4, 1, self.strides, name='proj_conv', dtype=self.dtype)(x)
      x = self.norm(name='proj_bn')(x)
    return nn.relu(x + y)


class DDNN(nn.Module):
  """A depth-level dynamic network of any family in ``ARCHS``.

  Attributes:
    arch: name of the full net, e.g. 'resnet56', 'resnet50', 'vgg16'.
    num_classes: classifier outputs.
    width: channels of the first stage (None: the family's standard width).
    dtype: compute dtype (bfloat16 for mixed precision); parameters stay float32.
    bn_momentum: running-average decay of the BatchNorm statistics.
  """
  arch: str
  num_classes: int
  width: int | None = None
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9

  @property
  def spec(self) -> ArchSpec:
    return arch_spec(self.arch)

  @property
  def stage_sizes(self) -> Depth:
    return self.spec.stage_sizes

  @nn.compact
  def __call__(self, x, depth: Sequence[int] | None = None, train: bool = True):
    spec = self.spec
    depth = spec.stage_sizes if depth is None else check_depth(depth, spec.stage_sizes, self.arch)
    width = self.width or DEFAULT_WIDTH[spec.family]
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype)
    x = x.astype(self.dtype)
    features = []

    if spec.family == 'vgg':
      for s, n in enumerate(depth):
        filters = min(width * 2**s, width * 8)  # 64, 128, 256, 512, 512
        for b in range(n):
          x = _conv(filters, 3, name=f'stage{s}_block{b}_conv', dtype=self.dtype)(x)
          x = nn.relu(norm(name=f'stage{s}_block{b}_bn')(x))
        features.append(x)
        # 'SAME' keeps odd sizes (28x28 inputs) alive through all five pools.
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
    else:
      if spec.family == 'cifar_resnet':
        block_cls: Any = functools.partial(BasicBlock, zero_pad_shortcut=True)
        x = _conv(width, 3, name='stem_conv', dtype=self.dtype)(x)
        x = nn.relu(norm(name='stem_bn')(x))
      else:
        block_cls = BasicBlock if spec.family == 'resnet_basic' else Bottleneck
        x = _conv(width, 7, 2, name='stem_conv', dtype=self.dtype)(x)
        x = nn.relu(norm(name='stem_bn')(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
      for s, n in enumerate(depth):
        for b in range(n):
          strides = 2 if s > 0 and b == 0 else 1
          x = block_cls(width * 2**s, strides, norm=norm, dtype=self.dtype,
                        name=f'stage{s}_block{b}')(x)
        features.append(x)

    x = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return logits.astype(jnp.float32), tuple(f.astype(jnp.float32) for f in features)


def create_model(arch: str, num_classes: int, *, width: int | None = None,
                 dtype: Any = jnp.float32, bn_momentum: float = 0.9) -> DDNN:
  arch_spec(arch)  # Fail early on unknown names.
  return DDNN(arch=arch.lower(), num_classes=num_classes, width=width, dtype=dtype,
              bn_momentum=bn_momentum)


def depth_set(arch: str, subnets: Sequence[DepthSpec] = ()) -> tuple[Depth, ...]:
  """The full net's depth followed by the sub-nets', largest first, all validated.

  "Larger" means more blocks (ties: deeper late stages first); this order is the
  teacher-assistant chain of IPKD-TA.
  """
  full = arch_spec(arch).stage_sizes
  subs = [resolve_depth(s, arch) for s in subnets]
  for depth in subs:
    if depth == full:
      raise ValueError(f'sub-net {_fmt(depth)} is the full net {arch} itself')
  if len(set(subs)) != len(subs):
    raise ValueError(f'sub-nets repeat a depth: {", ".join(_fmt(s) for s in subs)}')
  subs.sort(key=lambda d: (sum(d), d[::-1]), reverse=True)
  return (full, *subs)


def depth_label(arch: str, depth: Depth) -> str | None:
  """The named net a depth equals (e.g. (5, 5, 5) of a ResNet-56 is 'resnet32'), or None."""
  family = arch_spec(arch).family
  for name, spec in ARCHS.items():
    if spec.family == family and spec.stage_sizes == tuple(depth):
      return name
  return None
