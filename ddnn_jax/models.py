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
import math
import numbers
from collections.abc import Sequence
from typing import Any, Callable, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddnn_jax.cpu import batchnorm, onednn

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


class SubNet(tuple):
  """A depth (block counts per stage) at a width multiplier: written ``2-2-2@0.5``.

  Width 1.0 is the plain depth: ``SubNet((2, 2, 2), 1.0) == (2, 2, 2)`` with the same hash,
  so every depth of a net without widths is the tuple it always was (``subnet`` returns
  one). A narrower one keeps its width through every operation that keeps its type.
  """
  width: float

  def __new__(cls, blocks: Sequence[int], width: float = 1.0):
    obj = super().__new__(cls, tuple(blocks))
    obj.width = float(width)
    return obj

  def __getnewargs__(self):
    return tuple(self), self.width

  def __eq__(self, other):
    if not isinstance(other, tuple):
      return NotImplemented
    return tuple.__eq__(self, other) and self.width == width_of(other)

  def __ne__(self, other):
    result = self.__eq__(other)
    return result if result is NotImplemented else not result

  def __hash__(self):
    return tuple.__hash__(self) if self.width == 1.0 else hash((tuple(self), self.width))

  def __repr__(self):
    return f'SubNet({tuple(self)!r}, {self.width:g})'


def subnet(blocks: Sequence[int], width: float = 1.0) -> Depth:
  """A depth at ``width``: the plain tuple at width 1, else a SubNet."""
  blocks = tuple(int(n) for n in blocks)
  return blocks if float(width) == 1.0 else SubNet(blocks, width)


def width_of(depth: Any) -> float:
  """The width multiplier of a depth (1.0 for a plain tuple)."""
  return getattr(depth, 'width', 1.0)


def blocks_of(depth: Any) -> tuple[int, ...]:
  return tuple(int(n) for n in depth)


def active_channels(width: float, channels: int, group: int) -> int:
  """Channels a layer of ``channels`` runs at ``width``: the first ceil(width * channels),
  rounded up to a multiple of ``group`` (all of them at width 1)."""
  if width == 1.0:
    return channels
  return min(channels, group * math.ceil(width * channels / group))


def format_depth(depth: Any) -> str:
  """The one way a depth is written, in tables, files, flags and messages: (3, 4, 6, 3)
  -> '3-4-6-3' (blocks per stage, no spaces or brackets: it pastes into a shell and a
  file name), at a width below 1 '3-4-6-3@0.5'. A name stays as it is. ``parse_depth``
  reads it back, and other spellings."""
  if isinstance(depth, str):
    try:
      depth = parse_depth(depth)
    except ValueError:
      return depth
    if isinstance(depth, str):
      return depth
  try:
    text = '-'.join(str(int(d)) for d in depth)
  except (TypeError, ValueError):
    return repr(depth)
  width = width_of(depth)
  return text if width == 1.0 else f'{text}@{width:g}'


_DEPTH_EXAMPLE = 'block counts per stage such as 2-2-2 (also [2,2,2] or 2,2,2) or a net name'


def parse_depth(text: str) -> DepthSpec:
  """One depth as people write it: '2-2-2', '[2,2,2]', '(2, 2, 2)', '2,2,2', '2 2 2' ->
  (2, 2, 2); a net name ('resnet32') stays a name. A width follows an '@': '2-2-2@0.5',
  'resnet32@0.5' (a name and width stay text). Only the syntax is checked here;
  ``resolve_depth`` checks a depth against a net."""
  item = str(text).strip()
  if '@' in item:
    blocks, _, width_text = item.rpartition('@')
    try:
      width = float(width_text)
    except ValueError:
      raise ValueError(f'depth {item!r}: the width after @ must be a number, e.g. 2-2-2@0.5'
                       ) from None
    parsed = parse_depth(blocks)
    if isinstance(parsed, str):
      return f'{parsed}@{width:g}' if width != 1.0 else parsed
    return subnet(parsed, width)
  inner = item.strip('[]()').strip()
  if inner and (inner[0].isalpha()):
    if item != inner or not inner.replace('_', '').isalnum():
      raise ValueError(f'depth {item!r} is not a depth: give {_DEPTH_EXAMPLE}')
    return inner
  parts = [p for p in inner.replace(',', ' ').replace('-', ' ').split()]
  if not parts or not all(p.isdigit() for p in parts):
    raise ValueError(f'depth {item!r} is not a depth: give {_DEPTH_EXAMPLE}')
  return tuple(int(p) for p in parts)


def parse_depths(text: str) -> list[DepthSpec]:
  """A list of depths, e.g. a --depths flag: 'resnet44,5-5-5' -> ['resnet44', (5, 5, 5)].

  Depths are separated by commas or spaces; a depth is written as ``parse_depth`` reads
  it. Commas inside brackets belong to the depth ('[2,2,2],[1,1,1]'), and a list of bare
  numbers is one depth ('2,2,2': a single number is never a depth of these nets).
  """
  text = str(text).strip()
  items, level, current = [], 0, ''
  for char in text:  # Split at commas and spaces outside brackets.
    level += 1 if char in '[(' else -1 if char in '])' else 0
    if level < 0:
      raise ValueError(f'depths {text!r}: unbalanced brackets')
    if char in ', ' and level == 0:
      items.append(current)
      current = ''
    else:
      current += char
  if level:
    raise ValueError(f'depths {text!r}: unbalanced brackets')
  items = [i for i in [*items, current] if i.strip()]
  if items and all(i.strip().isdigit() for i in items):
    return [parse_depth(','.join(items))]
  for item in items:
    if item.strip().isdigit():
      raise ValueError(f'depths {text!r}: {item!r} alone is not a depth; write a depth as '
                       f'{_DEPTH_EXAMPLE}, and separate depths by commas')
  return [parse_depth(i) for i in items]


def subnet_specs(value: Any) -> list[DepthSpec]:
  """``model.subnets`` as people write it, in a config file or a flag, as a list of depths:
  '2-2-2', '2-2-2@0.5', '[2,2,2]', '2-2-2,1-1-1' (text, ``parse_depths``); (2, 2, 2) (one
  depth); ((2, 2, 2), '1-1-1', 'resnet32') (a tuple of depths, each a tuple or text)."""
  if isinstance(value, bytes):
    value = value.decode()
  if isinstance(value, str):
    return parse_depths(value)
  if not isinstance(value, Sequence):
    raise ValueError(f'{value!r} is not a depth or a tuple of depths: give {_DEPTH_EXAMPLE}')
  items = list(value)
  if items and all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in items):
    return [tuple(int(n) for n in items)]  # One depth: (2, 2, 2).
  specs = []
  for item in items:
    if isinstance(item, str):
      specs.append(parse_depth(item))
    elif isinstance(item, Sequence) and not isinstance(item, bytes):
      specs.append(item if isinstance(item, SubNet) else tuple(item))
    else:
      raise ValueError(f'{item!r} is not a depth: give {_DEPTH_EXAMPLE}')
  return specs


def _fmt(depth: Any) -> str:  # In error messages: names quoted.
  return repr(depth) if isinstance(depth, str) else format_depth(depth)


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
  width = width_of(depth)
  if not 0 < width <= 1:
    raise ValueError(f'depth {_fmt(depth)}: width {width:g} is not in (0, 1]')
  return subnet(depth, width)


def resolve_depth(spec: DepthSpec, arch: str) -> Depth:
  """A named depth ('resnet44', 'resnet44@0.5') or an explicit list, checked against
  ``arch``."""
  full = arch_spec(arch)
  if isinstance(spec, str):  # '2-2-2', '[2,2,2]', '2-2-2@0.5', 'resnet32@0.5', 'resnet32'.
    parsed = parse_depth(spec)
    if isinstance(parsed, str) and '@' in parsed:
      name, _, width = parsed.rpartition('@')
      return subnet(resolve_depth(name, arch), float(width))
    spec = parsed
  kind_of = lambda family: FAMILIES_OF_A_KIND.get(family, family)  # noqa: E731
  if isinstance(spec, str):
    named = ARCHS.get(spec.lower())
    if named is None:
      same = [n for n, a in ARCHS.items() if kind_of(a.family) == kind_of(full.family)]
      raise ValueError(f'unknown depth {spec!r}; use block counts per stage such as '
                       f'{format_depth(full.stage_sizes)} or one of {", ".join(same)}')
    kind = kind_of(named.family)
    if kind != kind_of(full.family):
      raise ValueError(f'depth {spec!r} is a {named.family} but {arch} is a {full.family}')
    spec = named.stage_sizes
  return check_depth(spec, full.stage_sizes, arch)


def arch_spec(arch: str) -> ArchSpec:
  try:
    return ARCHS[arch.lower()]
  except (KeyError, AttributeError):
    raise ValueError(f'unknown architecture {arch!r}; choose one of {", ".join(ARCHS)}') from None


def depth_name(depth: Depth) -> str:
  """Stable, readable key of a depth (BN statistics, metrics, workdirs): '5-5-5' or
  '5-5-5@0.5', the notation of ``format_depth``."""
  return format_depth(depth)


def module_sequence(arch: str, depth: Depth) -> tuple[str, ...]:
  """The top-level modules ``depth`` runs, in order (the head excluded): a cascade stage
  that continues another depth's computation skips their common leading modules."""
  spec = arch_spec(arch)
  stem = () if spec.family == 'vgg' else ('stem_conv', 'stem_bn')
  return stem + tuple(f'stage{s}_block{b}' for s, n in enumerate(depth) for b in range(n))


def same_width(a: Depth, b: Depth) -> bool:
  return width_of(a) == width_of(b)


def shared_prefix(arch: str, a: Depth, b: Depth) -> int:
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


def _conv(features: int, kernel: int, strides: int = 1, *, name: str, dtype: Any,
          active: int | None = None, depthwise: bool = False) -> nn.Conv:
  """A conv of ``features`` outputs; with ``active`` < ``features``, the slimmable one that
  runs only the first ``active`` of them (and the channels its input has)."""
  # Symmetric padding as in the reference (PyTorch) nets; 'SAME' pads asymmetrically
  # at stride 2 and would shift every downsampled map by half a pixel.
  pad = kernel // 2
  kwargs = dict(kernel_size=(kernel, kernel), strides=(strides, strides),
                padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype, name=name,
                kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
                conv_general_dilated=onednn.conv_general_dilated)
  if depthwise:
    kwargs['feature_group_count'] = features
  if active is None or active == features:
    return nn.Conv(features, **kwargs)
  return SlimConv(features, active=active, **kwargs)


def _full_or_new(module: nn.Module, name: str, init, shape) -> jax.Array:
  """The full net's parameter ``name`` (a slimmable layer slices it); created with the
  narrow ``shape`` only when the net is initialised at a narrow width (which only reads the
  shapes of its BN statistics and counts its own parameters)."""
  if module.has_variable('params', name):
    return module.get_variable('params', name)
  return module.param(name, init, shape, jnp.float32)


class SlimConv(nn.Conv):
  """A conv over the full net's kernel that runs its first ``active`` output channels on
  the channels its input has (slimmable networks: one parameter tree for every width)."""
  active: int = 0

  @nn.compact
  def __call__(self, x):
    depthwise = self.feature_group_count > 1
    c_in = x.shape[-1]
    kernel = _full_or_new(self, 'kernel', self.kernel_init,
                          (*self.kernel_size, 1 if depthwise else c_in, self.active))
    kernel = kernel[..., :self.active] if depthwise else kernel[:, :, :c_in, :self.active]
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return onednn.conv_general_dilated(
        x, kernel, self.strides, self.padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=c_in if depthwise else 1)


class SlimDense(nn.Dense):
  """The classifier over the first channels its input has."""

  @nn.compact
  def __call__(self, x):
    c_in = x.shape[-1]
    kernel = _full_or_new(self, 'kernel', self.kernel_init, (c_in, self.features))[:c_in]
    bias = _full_or_new(self, 'bias', self.bias_init, (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return x @ kernel + bias


class SlimBatchNorm(nn.Module):
  """BatchNorm over the first channels of the full net's scale and bias, with statistics
  of its own size (each depth and width keeps private statistics)."""
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = _full_or_new(self, 'scale', nn.initializers.ones, (c,))[:c]
    bias = _full_or_new(self, 'bias', nn.initializers.zeros, (c,))[:c]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:  # As flax's BatchNorm: the biased variance E[x^2] - E[x]^2.
      mean = jnp.mean(xf, axis=(0, 1, 2))
      var = jnp.maximum(jnp.mean(jnp.square(xf), axis=(0, 1, 2)) - jnp.square(mean), 0.0)
      if not self.is_initializing():
        if self.momentum == 0.0:  # Batch moments (the shared trunk's scratch space).
          ra_mean.value, ra_var.value = mean, var
        else:
          ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
          ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    y = (xf - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
    return y.astype(self.dtype or x.dtype)


class TrainBatchNorm(nn.Module):
  """flax's BatchNorm in train mode (its variables, statistics and running averages), with
  the residual add and ReLU that follow it taken in: one custom-gradient function
  (``batchnorm.batch_norm_act``) whose forward and backward passes each read the
  activation twice instead of XLA's dozen passes over autodiff's chain."""
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, residual=None, relu: bool = False):
    c = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    y, mean, var = batchnorm.batch_norm_act(x, scale, bias, residual, self.epsilon, relu)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


def _folded(module: nn.Module, x, conv: nn.Module, norm: nn.Module, residual=None):
  """``norm(conv(x))``'s kernel and bias with BatchNorm folded in, where one oneDNN inference
  call can run it: BN on its running averages, full-width layers, oneDNN here. Else None."""
  if (type(conv) is not nn.Conv or type(norm) is not nn.BatchNorm
      or not norm.use_running_average or module.is_initializing()):
    return None
  params, stats = module.variables.get('params', {}), module.variables.get('batch_stats', {})
  if conv.name not in params or norm.name not in params or norm.name not in stats:
    return None
  kernel = params[conv.name]['kernel']
  if not onednn.fusable(x, kernel, conv.strides, conv.padding, residual):
    return None
  inv = params[norm.name]['scale'] * jax.lax.rsqrt(stats[norm.name]['var'] + norm.epsilon)
  return kernel * inv, params[norm.name]['bias'] - stats[norm.name]['mean'] * inv


def _conv_norm(module: nn.Module, x, conv: nn.Module, norm: nn.Module, *, relu: bool,
               residual=None, between=None, fold: bool = True):
  """``relu(between(norm(conv(x))) + residual)`` (ReLU, ``between`` and ``residual``
  optional). In inference with oneDNN (``fold`` and ``between`` the identity there) it is
  one call: BN folded into the kernel and a bias, the residual add and ReLU applied as the
  convolution writes its output, so no elementwise pass over the output follows."""
  folded = _folded(module, x, conv, norm, residual) if fold else None
  if folded is not None:
    return onednn.conv_bias_act(x, *folded, conv.strides, conv.padding, relu=relu,
                                residual=residual)
  if isinstance(norm, TrainBatchNorm) and between is None:
    return norm(conv(x), residual=residual, relu=relu)
  y = norm(conv(x))
  if between is not None:
    y = between(y)
  if residual is not None:
    y = residual + y
  return nn.relu(y) if relu else y


# Largest standard deviation of the ranking noise (sigma = NOISE_MAX * sigmoid(logit)).
NOISE_MAX = 1.0


class _ResidualBlock(nn.Module):
  """What both ResNet blocks take. ``active``: the channels a block runs of its
  ``filters`` (a narrower width). ``noise_ranking``: the block's inner channels carry a
  learned noise level per group of ``channel_group`` (``ranking``)."""
  filters: int
  strides: int
  norm: ModuleDef
  dtype: Any = jnp.float32
  active: int | None = None
  noise_ranking: bool = False
  channel_group: int = 8

  def noisy(self, features: int, active: int) -> bool:
    """Whether ``ranked`` changes its input (else BN may fold into the conv before it)."""
    return self.noise_ranking and active == features and self.has_rng('noise')

  def conv_norm(self, x, conv, norm, *, relu: bool, residual=None, rank=None):
    """``_conv_norm``, with the ranking noise of inner space ``rank`` = (number, features,
    active) between the BatchNorm and the ReLU."""
    if rank is None or not self.noise_ranking:  # No noise: BN and ReLU stay one function.
      return _conv_norm(self, x, conv, norm, relu=relu, residual=residual)
    return _conv_norm(self, x, conv, norm, relu=relu, residual=residual,
                      between=lambda y: self.ranked(y, *rank), fold=not self.noisy(*rank[1:]))

  def ranked(self, y, number: int, features: int, active: int):
    """``y`` (the block's inner space ``number``) times 1 + sigma * N(0, 1) per channel,
    sigma learned per channel group: at full width, in training (a 'noise' rng given).
    Groups the loss needs least learn the most noise; ``ranking`` sorts them last."""
    if not self.noise_ranking:
      return y
    logit = self.param(f'noise_logit{number}', nn.initializers.zeros,
                       (features // self.channel_group,), jnp.float32)
    if not self.noisy(features, active):
      return y
    sigma = NOISE_MAX * jnp.repeat(jax.nn.sigmoid(logit), self.channel_group)
    eps = jax.random.normal(self.make_rng('noise'), y.shape, jnp.float32)
    return (y * (1 + sigma * eps)).astype(y.dtype)


class BasicBlock(_ResidualBlock):
  """Two 3x3 convs. Where shapes change, the shortcut is a 1x1 projection (ImageNet) or,
  with ``zero_pad_shortcut``, He et al.'s parameter-free subsample + zero-pad (CIFAR
  option A, which gives ResNet-20 its 0.27M parameters)."""
  zero_pad_shortcut: bool = False

  @nn.compact
  def __call__(self, x):
    f, a = self.filters, self.active or self.filters
    y = self.conv_norm(x, _conv(f, 3, self.strides, name='conv1', dtype=self.dtype, active=a),
                       self.norm(name='bn1', features=f, active=a), relu=True, rank=(1, f, a))
    if self.strides == 1 and x.shape[-1] == y.shape[-1]:
      shortcut = x
    elif self.zero_pad_shortcut:
      x = x[:, ::self.strides, ::self.strides, :]
      extra = a - x.shape[-1]
      shortcut = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    else:
      shortcut = self.conv_norm(
          x, _conv(f, 1, self.strides, name='proj_conv', dtype=self.dtype, active=a),
          self.norm(name='proj_bn', features=f, active=a), relu=False)
    return self.conv_norm(y, _conv(f, 3, name='conv2', dtype=self.dtype, active=a),
                          self.norm(name='bn2', features=f, active=a), relu=True,
                          residual=shortcut)


class Bottleneck(_ResidualBlock):
  """ImageNet Bottleneck (stride on the 3x3 conv, 'ResNet v1.5')."""

  @nn.compact
  def __call__(self, x):
    f, a = self.filters, self.active or self.filters
    y = self.conv_norm(x, _conv(f, 1, name='conv1', dtype=self.dtype, active=a),
                       self.norm(name='bn1', features=f, active=a), relu=True, rank=(1, f, a))
    y = self.conv_norm(y, _conv(f, 3, self.strides, name='conv2', dtype=self.dtype, active=a),
                       self.norm(name='bn2', features=f, active=a), relu=True, rank=(2, f, a))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != 4 * a:
      shortcut = self.conv_norm(
          x, _conv(f * 4, 1, self.strides, name='proj_conv', dtype=self.dtype, active=4 * a),
          self.norm(name='proj_bn', features=4 * f, active=4 * a), relu=False)
    return self.conv_norm(y, _conv(f * 4, 1, name='conv3', dtype=self.dtype, active=4 * a),
                          self.norm(name='bn3', features=4 * f, active=4 * a), relu=True,
                          residual=shortcut)


class VGGBlock(nn.Module):
  """3x3 conv, BatchNorm, ReLU: one block of a VGG-BN stage."""
  filters: int
  norm: ModuleDef
  dtype: Any = jnp.float32
  active: int | None = None

  @nn.compact
  def __call__(self, x):
    f, a = self.filters, self.active or self.filters
    return _conv_norm(self, x, _conv(f, 3, name='conv', dtype=self.dtype, active=a),
                      self.norm(name='bn', features=f, active=a), relu=True)


class SeparableBlock(nn.Module):
  """MobileNet-V1's depthwise-separable block: a 3x3 depthwise conv over its input's
  channels and a 1x1 conv to ``filters``, each with BatchNorm and ReLU6."""
  in_filters: int
  filters: int
  strides: int
  norm: ModuleDef
  dtype: Any = jnp.float32
  active: int | None = None

  @nn.compact
  def __call__(self, x):
    c_in, a = x.shape[-1], self.active or self.filters
    x = _conv(self.in_filters, 3, self.strides, name='dw_conv', dtype=self.dtype,
              active=c_in, depthwise=True)(x)
    x = nn.relu6(self.norm(name='dw_bn', features=self.in_filters, active=c_in)(x))
    x = _conv(self.filters, 1, name='pw_conv', dtype=self.dtype, active=a)(x)
    return nn.relu6(self.norm(name='pw_bn', features=self.filters, active=a)(x))


class DDNN(nn.Module):
  """A depth-level dynamic network of any family in ``ARCHS``.

  ``__call__`` runs one depth. ``train_forward`` runs several depths on one batch in
  train mode over a shared trunk: a sub-net computes exactly what the full net
  computes up to the first block it skips, so every shared prefix of blocks is run
  once and branched (and differentiated once).

  Attributes:
    arch: name of the full net, e.g. 'resnet56', 'resnet50', 'vgg16'.
    num_classes: classifier outputs.
    width: channels of the first stage (None: the family's standard width).
    dtype: compute dtype (bfloat16 for mixed precision); parameters stay float32.
    bn_momentum: running-average decay of the BatchNorm statistics.
    remat: recompute each block's activations in the backward pass (less memory).
    channel_group: a narrower width runs a multiple of this many channels per layer.
    noise_ranking: ResNet blocks learn which inner channel groups matter (``ranking``),
      from noise applied only when the apply gets a 'noise' rng (the train step's).

  A depth may carry a width multiplier (``SubNet``, '2-2-2@0.5'): then every layer runs
  its first channels only (``active_channels``) over the same parameters, slimmable-style,
  and the depth has BN statistics of its own like every depth.
  """
  arch: str
  num_classes: int
  width: int | None = None
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  remat: bool = False
  channel_group: int = 8
  noise_ranking: bool = False

  @property
  def spec(self) -> ArchSpec:
    return arch_spec(self.arch)

  @property
  def stage_sizes(self) -> Depth:
    return self.spec.stage_sizes

  def __call__(self, x, depth: Sequence[int] | None = None, train: bool = True):
    """``(logits, features)`` of one depth; ``features`` holds each stage's output map.

    In train mode BatchNorm normalises with batch statistics and updates its running
    averages (pass ``mutable=['batch_stats']``); in eval mode it uses them.
    """
    depth = self.stage_sizes if depth is None else check_depth(depth, self.stage_sizes, self.arch)
    outputs, _, _ = self._forward_widths(x, (depth,), train=train, batch_moments=False)
    return outputs[0]

  def cascade_stage(self, x, depth: Sequence[int], resume_at: int = 0, capture_at: int = 0):
    """Inference of one depth as a stage of a cascade (eval mode, its own BN statistics).

    ``resume_at``: how many leading modules of ``module_sequence(depth)`` an earlier stage
    computed; ``x`` is then that stage's output of the last of them (captured with its
    ``capture_at``) and this depth runs from the next module on. ``capture_at``: also
    return this depth's output of its module number ``capture_at`` (1-based; 0: none).
    Returns ``(logits, captured)``.
    """
    depth = check_depth(depth, self.stage_sizes, self.arch)
    outputs, _, captured = self._forward_widths(x, (depth,), train=False, batch_moments=False,
                                                resume_at=resume_at, capture_at=capture_at)
    return outputs[0][0], captured

  def train_forward(self, x, depths: Sequence[Depth], running_stats: Sequence[Any]):
    """Every depth of ``depths`` in train mode on one batch, the shared trunk computed once.

    Args:
      x: the batch.
      depths: validated depth configurations.
      running_stats: each depth's BatchNorm running averages (its 'batch_stats').

    Returns:
      ``(outputs, new_stats)``: per depth ``(logits, features)`` as ``__call__`` gives
      them, and its running averages updated with the batch moments of the modules it
      ran, as flax's BatchNorm updates them. Apply with ``mutable=['batch_stats']`` and
      no 'batch_stats' in the variables: that collection is only scratch space here.
    """
    if len(running_stats) != len(depths):
      raise ValueError(f'{len(running_stats)} sets of running statistics for {len(depths)} depths')
    outputs, moments = self.batch_moments(x, depths)
    m = self.bn_momentum
    new_stats = tuple(
        jax.tree.map(lambda old, new: m * old + (1 - m) * new, old_stats, {
            name: moments[d][name] for name in old_stats})
        for d, old_stats in enumerate(running_stats))
    return outputs, new_stats

  def batch_moments(self, x, depths: Sequence[Depth]):
    """Train-mode outputs of ``depths`` (shared trunk) and each depth's BatchNorm moments.

    Returns ``(outputs, moments)``: per depth ``(logits, features)`` and
    ``{top-level module: {BatchNorm: {'mean', 'var'}}}`` of this batch, in the layout of
    its 'batch_stats'. Apply with ``mutable=['batch_stats']`` (scratch space only).
    """
    outputs, moments, _ = self._forward_widths(x, tuple(depths), train=True, batch_moments=True)
    return outputs, moments

  def _forward_widths(self, x, depths: tuple[Depth, ...], train: bool, batch_moments: bool,
                      resume_at: int = 0, capture_at: int = 0):
    """``_forward`` once per width among ``depths`` (widest first): depths of one width
    share their trunk; other widths run other channels of every layer."""
    widths = sorted({width_of(d) for d in depths}, reverse=True)
    if len(widths) == 1:
      return self._forward(x, depths, train, batch_moments, resume_at, capture_at)
    outputs: list[Any] = [None] * len(depths)
    moments: list[Any] = [None] * len(depths)
    for width in widths:
      members = [i for i, d in enumerate(depths) if width_of(d) == width]
      out, mom, _ = self._forward(x, tuple(depths[i] for i in members), train, batch_moments)
      for j, i in enumerate(members):
        outputs[i], moments[i] = out[j], mom[j]
    return tuple(outputs), moments, None

  @nn.compact
  def _forward(self, x, depths: tuple[Depth, ...], train: bool, batch_moments: bool,
               resume_at: int = 0, capture_at: int = 0):
    """Walks ``depths`` as a prefix tree: each block runs once per distinct input.

    With ``batch_moments``, BatchNorm runs with momentum 0, so right after each call
    its 'batch_stats' hold exactly that call's batch mean and variance; they are
    copied to every depth the call served. Returns per-depth outputs, moments
    ({top-level module name: its BatchNorm moments}) and the output of module number
    ``capture_at`` (one depth only; ``cascade_stage``, which also explains ``resume_at``).
    """
    spec = self.spec
    width = self.width or DEFAULT_WIDTH[spec.family]
    multiplier = width_of(depths[0])
    if any(width_of(d) != multiplier for d in depths):
      raise ValueError('one _forward runs depths of one width (see _forward_widths)')

    def active(channels: int) -> int | None:
      return None if multiplier == 1.0 else active_channels(multiplier, channels,
                                                            self.channel_group)

    def norm(name: str, features: int | None = None, active: int | None = None) -> nn.Module:
      kwargs = dict(use_running_average=not train, epsilon=1e-5, dtype=self.dtype, name=name,
                    momentum=0.0 if batch_moments else self.bn_momentum)
      if active is None or active == features:
        if train and jnp.dtype(self.dtype) == jnp.float32 and batchnorm.enabled():
          return TrainBatchNorm(momentum=kwargs['momentum'], epsilon=1e-5, name=name)
        return nn.BatchNorm(**kwargs)
      return SlimBatchNorm(**kwargs)

    moments: list[dict[str, Any]] = [{} for _ in depths]
    position, captured = 0, None  # Modules run so far (in the order of module_sequence).
    resumed = x  # With resume_at: an earlier stage's output of module number resume_at.

    def run(module, x, served, **kwargs):
      nonlocal position, captured
      position += 1
      if position <= resume_at:  # An earlier cascade stage computed it.
        return resumed if position == resume_at else x
      y = module(x, **kwargs)
      if position == capture_at:
        captured = y
      if batch_moments and 'batch_stats' in module.variables:
        # A snapshot: the module's variables are overwritten by its next call.
        snapshot = jax.tree.map(lambda a: a, module.variables['batch_stats'])
        for d in served:
          moments[d][module.name] = snapshot
      return y

    everyone = range(len(depths))
    x = x.astype(self.dtype)
    mobilenet = spec.family in ('mobilenet', 'mobilenet_imagenet')
    if spec.family == 'vgg':
      block_cls: Any = VGGBlock
    else:
      stem = {'cifar_resnet': (3, 1), 'mobilenet': (3, 1), 'mobilenet_imagenet': (3, 2)}.get(
          spec.family, (7, 2))
      x = run(_conv(width, *stem, name='stem_conv', dtype=self.dtype, active=active(width)), x,
              everyone)
      if spec.family == 'cifar_resnet':
        block_cls = functools.partial(BasicBlock, zero_pad_shortcut=True)
      elif mobilenet:
        block_cls = SeparableBlock
      else:
        block_cls = BasicBlock if spec.family == 'resnet_basic' else Bottleneck
      stem_norm = norm('stem_bn', width, active(width))
      # Training's BatchNorm applies the ReLU in its own passes (ddnn_jax.cpu.batchnorm).
      fused_relu = isinstance(stem_norm, TrainBatchNorm) and not mobilenet
      x = run(stem_norm, x, everyone, **({'relu': True} if fused_relu else {}))
      if resume_at < 2:  # Else the resumed output already passed the stem's ReLU and pool.
        if not fused_relu:
          x = nn.relu6(x) if mobilenet else nn.relu(x)
        if spec.family in ('resnet_basic', 'resnet_bottleneck'):
          x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
      if capture_at == 2:  # The stem's output, after its ReLU (and pool).
        captured = x
    if self.remat:
      block_cls = nn.remat(block_cls)

    blocks: dict[tuple[int, int], nn.Module] = {}

    def block(s, b):
      if (s, b) not in blocks:
        name = f'stage{s}_block{b}'
        if spec.family == 'vgg':
          filters = min(width * 2**s, width * 8)  # 64, 128, 256, 512, 512
          blocks[s, b] = block_cls(filters, norm=norm, dtype=self.dtype, name=name,
                                   active=active(filters))
        elif mobilenet:
          filters = width * 2**(s + 1)  # 64, 128, 256, 512, 1024
          in_filters = filters if b else (width * 2**s if s else width)
          blocks[s, b] = block_cls(in_filters, filters, 2 if s > 0 and b == 0 else 1,
                                   norm=norm, dtype=self.dtype, name=name,
                                   active=active(filters))
        else:
          filters = width * 2**s
          ranking = dict(noise_ranking=True, channel_group=self.channel_group) if (
              self.noise_ranking) else {}
          blocks[s, b] = block_cls(filters, 2 if s > 0 and b == 0 else 1, norm=norm,
                                   dtype=self.dtype, name=name, active=active(filters),
                                   **ranking)
      return blocks[s, b]

    features: list[list[Any]] = [[] for _ in depths]
    groups = [(x, tuple(everyone))]  # (input, the depths that share it)
    for s in range(len(spec.stage_sizes)):
      next_groups = []
      for x, members in groups:
        done = 0
        for count in sorted({depths[d][s] for d in members}):
          for b in range(done, count):
            x = run(block(s, b), x, [d for d in members if depths[d][s] > b])
          done = count
          leaving = tuple(d for d in members if depths[d][s] == count)
          for d in leaving:
            features[d].append(x)
          if spec.family == 'vgg':
            # 'SAME' keeps odd sizes (28x28 inputs) alive through all five pools.
            next_groups.append((nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME'), leaving))
          else:
            next_groups.append((x, leaving))
      groups = next_groups

    head = (nn.Dense if multiplier == 1.0 else SlimDense)(self.num_classes, dtype=self.dtype,
                                                           name='head')
    # Outputs in float32 at least: the loss of a bfloat16 net is computed in float32.
    out_dtype = jnp.promote_types(self.dtype, jnp.float32)
    logits: list[Any] = [None] * len(depths)
    for x, members in groups:
      z = head(jnp.mean(x, axis=(1, 2))).astype(out_dtype)
      for d in members:
        logits[d] = z
    outputs = tuple((logits[d], tuple(f.astype(out_dtype) for f in features[d]))
                    for d in everyone)
    return outputs, moments, captured


def create_model(arch: str, num_classes: int, *, width: int | None = None,
                 dtype: Any = jnp.float32, bn_momentum: float = 0.9, remat: bool = False,
                 channel_group: int = 8, noise_ranking: bool = False) -> DDNN:
  arch_spec(arch)  # Fail early on unknown names.
  return DDNN(arch=arch.lower(), num_classes=num_classes, width=width, dtype=dtype,
              bn_momentum=bn_momentum, remat=remat, channel_group=channel_group,
              noise_ranking=noise_ranking)


def from_config(config) -> DDNN:
  """The net of a run (``config.model`` on ``config.data.dataset``): the one function
  training and every deploy tool build a run's model with."""
  from ddnn_jax import datasets  # pylint: disable=g-import-not-at-top
  return create_model(config.model.arch, datasets.get(config.data.dataset).num_classes,
                      width=config.model.width, dtype=jnp.dtype(config.model.dtype),
                      bn_momentum=config.model.bn_momentum, remat=config.model.remat,
                      channel_group=config.model.get('channel_group', 8),
                      noise_ranking=config.model.get('noise_ranking', False))


def variable_shapes(model: DDNN, image_shape: Sequence[int], depth: Depth | None = None):
  """The variables (params, batch_stats) ``depth`` uses, as shapes: nothing is computed."""
  image = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, depth=depth, train=False),
                        image)


def select_used(tree, like):
  """The sub-tree of ``tree`` with the keys of ``like``, each leaf cut to the shape of
  ``like``'s: e.g. the full net's parameters restricted to those a depth uses, and at a
  narrower width to the leading channels it runs (``like``: its ``variable_shapes``)."""
  if not isinstance(like, dict):
    if tuple(tree.shape) == tuple(like.shape):
      return tree
    return tree[tuple(slice(0, n) for n in like.shape)]
  return {k: select_used(tree[k], v) for k, v in like.items()}


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
  return (base, *(base * 2**s for s in range(stages)), *(scale * base * 2**s for s in range(stages)))


def depth_set(arch: str, subnets: Sequence[DepthSpec] = ()) -> tuple[Depth, ...]:
  """The full net's depth followed by the sub-nets', largest first, all validated.

  "Larger" means more blocks (ties: deeper late stages first); this order is the
  teacher-assistant chain of IPKD-TA.
  """
  full = arch_spec(arch).stage_sizes
  subs = [resolve_depth(s, arch) for s in subnet_specs(subnets)]
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
  width = width_of(depth)
  for name, spec in ARCHS.items():
    if spec.family == family and spec.stage_sizes == blocks_of(depth):
      return name if width == 1.0 else f'{name}@{width:g}'
  return None
