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
import jax
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


def format_depth(depth: Any) -> str:
  """The one way a depth is written, in tables, files, flags and messages: (3, 4, 6, 3)
  -> '3-4-6-3' (blocks per stage, no spaces or brackets: it pastes into a shell and a
  file name). A name stays as it is. ``parse_depth`` reads it back, and other spellings."""
  if isinstance(depth, str):
    try:
      depth = parse_depth(depth)
    except ValueError:
      return depth
    if isinstance(depth, str):
      return depth
  try:
    return '-'.join(str(int(d)) for d in depth)
  except (TypeError, ValueError):
    return repr(depth)


_DEPTH_EXAMPLE = 'block counts per stage such as 2-2-2 (also [2,2,2] or 2,2,2) or a net name'


def parse_depth(text: str) -> DepthSpec:
  """One depth as people write it: '2-2-2', '[2,2,2]', '(2, 2, 2)', '2,2,2', '2 2 2' ->
  (2, 2, 2); a net name ('resnet32') stays a name. Only the syntax is checked here;
  ``resolve_depth`` checks a depth against a net."""
  item = str(text).strip()
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


def arch_spec(arch: str) -> ArchSpec:
  try:
    return ARCHS[arch.lower()]
  except (KeyError, AttributeError):
    raise ValueError(f'unknown architecture {arch!r}; choose one of {", ".join(ARCHS)}') from None


def depth_name(depth: Depth) -> str:
  """Stable, readable key of a depth (BN statistics, metrics, workdirs): '5-5-5', the
  notation of ``format_depth``."""
  return format_depth(tuple(depth))


def module_sequence(arch: str, depth: Depth) -> tuple[str, ...]:
  """The top-level modules ``depth`` runs, in order (the head excluded): a cascade stage
  that continues another depth's computation skips their common leading modules."""
  spec = arch_spec(arch)
  stem = () if spec.family == 'vgg' else ('stem_conv', 'stem_bn')
  return stem + tuple(f'stage{s}_block{b}' for s, n in enumerate(depth) for b in range(n))


def shared_prefix(arch: str, a: Depth, b: Depth) -> int:
  """How many leading modules depths ``a`` and ``b`` run alike (the same modules on the
  same input; their BN statistics may differ)."""
  count = 0
  for x, y in zip(module_sequence(arch, a), module_sequence(arch, b)):
    if x != y:
      break
    count += 1
  return count


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


class VGGBlock(nn.Module):
  """3x3 conv, BatchNorm, ReLU: one block of a VGG-BN stage."""
  filters: int
  norm: ModuleDef
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _conv(self.filters, 3, name='conv', dtype=self.dtype)(x)
    return nn.relu(self.norm(name='bn')(x))


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
  """
  arch: str
  num_classes: int
  width: int | None = None
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  remat: bool = False

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
    outputs, _, _ = self._forward(x, (depth,), train=train, batch_moments=False)
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
    outputs, _, captured = self._forward(x, (depth,), train=False, batch_moments=False,
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
    outputs, moments, _ = self._forward(x, tuple(depths), train=True, batch_moments=True)
    return outputs, moments

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
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.0 if batch_moments else self.bn_momentum, epsilon=1e-5,
                             dtype=self.dtype)
    moments: list[dict[str, Any]] = [{} for _ in depths]
    position, captured = 0, None  # Modules run so far (in the order of module_sequence).
    resumed = x  # With resume_at: an earlier stage's output of module number resume_at.

    def run(module, x, served):
      nonlocal position, captured
      position += 1
      if position <= resume_at:  # An earlier cascade stage computed it.
        return resumed if position == resume_at else x
      y = module(x)
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
    if spec.family == 'vgg':
      block_cls: Any = VGGBlock
    else:
      if spec.family == 'cifar_resnet':
        block_cls = functools.partial(BasicBlock, zero_pad_shortcut=True)
        x = run(_conv(width, 3, name='stem_conv', dtype=self.dtype), x, everyone)
      else:
        block_cls = BasicBlock if spec.family == 'resnet_basic' else Bottleneck
        x = run(_conv(width, 7, 2, name='stem_conv', dtype=self.dtype), x, everyone)
      x = run(norm(name='stem_bn'), x, everyone)
      if resume_at < 2:  # Else the resumed output already passed the stem's ReLU and pool.
        x = nn.relu(x)
        if spec.family != 'cifar_resnet':
          x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
      if capture_at == 2:  # The stem's output, after its ReLU (and pool).
        captured = x
    if self.remat:
      block_cls = nn.remat(block_cls)

    blocks: dict[tuple[int, int], nn.Module] = {}

    def block(s, b):
      if (s, b) not in blocks:
        if spec.family == 'vgg':
          blocks[s, b] = block_cls(min(width * 2**s, width * 8), norm=norm, dtype=self.dtype,
                                   name=f'stage{s}_block{b}')  # 64, 128, 256, 512, 512
        else:
          blocks[s, b] = block_cls(width * 2**s, 2 if s > 0 and b == 0 else 1, norm=norm,
                                   dtype=self.dtype, name=f'stage{s}_block{b}')
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

    head = nn.Dense(self.num_classes, dtype=self.dtype, name='head')
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
                 dtype: Any = jnp.float32, bn_momentum: float = 0.9, remat: bool = False) -> DDNN:
  arch_spec(arch)  # Fail early on unknown names.
  return DDNN(arch=arch.lower(), num_classes=num_classes, width=width, dtype=dtype,
              bn_momentum=bn_momentum, remat=remat)


def from_config(config) -> DDNN:
  """The net of a run (``config.model`` on ``config.data.dataset``): the one function
  training and every deploy tool build a run's model with."""
  from ddnn_jax import datasets  # pylint: disable=g-import-not-at-top
  return create_model(config.model.arch, datasets.get(config.data.dataset).num_classes,
                      width=config.model.width, dtype=jnp.dtype(config.model.dtype),
                      bn_momentum=config.model.bn_momentum, remat=config.model.remat)


def variable_shapes(model: DDNN, image_shape: Sequence[int], depth: Depth | None = None):
  """The variables (params, batch_stats) ``depth`` uses, as shapes: nothing is computed."""
  image = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, depth=depth, train=False),
                        image)


def select_used(tree, like):
  """The sub-tree of ``tree`` with the keys of ``like``: e.g. the full net's parameters
  restricted to those a depth uses (``like``: that depth's ``variable_shapes``)."""
  if not isinstance(like, dict):
    return tree
  return {k: select_used(tree[k], v) for k, v in like.items()}


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
