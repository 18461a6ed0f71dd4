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

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddnn_jax.cpu import batchnorm
from ddnn_jax.nn import architectures, blocks, layers, notation


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
  def spec(self) -> architectures.ArchSpec:
    return architectures.arch_spec(self.arch)

  @property
  def stage_sizes(self) -> notation.Depth:
    return self.spec.stage_sizes

  def __call__(self, x, depth: Sequence[int] | None = None, train: bool = True):
    """``(logits, features)`` of one depth; ``features`` holds each stage's output map.

    In train mode BatchNorm normalises with batch statistics and updates its running
    averages (pass ``mutable=['batch_stats']``); in eval mode it uses them.
    """
    depth = self.stage_sizes if depth is None else notation.check_depth(depth, self.stage_sizes,
                                                                        self.arch)
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
    depth = notation.check_depth(depth, self.stage_sizes, self.arch)
    outputs, _, captured = self._forward_widths(x, (depth,), train=False, batch_moments=False,
                                                resume_at=resume_at, capture_at=capture_at)
    return outputs[0][0], captured

  def train_forward(self, x, depths: Sequence[notation.Depth], running_stats: Sequence[Any]):
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

  def batch_moments(self, x, depths: Sequence[notation.Depth]):
    """Train-mode outputs of ``depths`` (shared trunk) and each depth's BatchNorm moments.

    Returns ``(outputs, moments)``: per depth ``(logits, features)`` and
    ``{top-level module: {BatchNorm: {'mean', 'var'}}}`` of this batch, in the layout of
    its 'batch_stats'. Apply with ``mutable=['batch_stats']`` (scratch space only).
    """
    outputs, moments, _ = self._forward_widths(x, tuple(depths), train=True, batch_moments=True)
    return outputs, moments

  def _forward_widths(self, x, depths: tuple[notation.Depth, ...], train: bool, batch_moments: bool,
                      resume_at: int = 0, capture_at: int = 0):
    """``_forward`` once per width among ``depths`` (widest first): depths of one width
    share their trunk; other widths run other channels of every layer."""
    widths = sorted({notation.width_of(d) for d in depths}, reverse=True)
    if len(widths) == 1:
      return self._forward(x, depths, train, batch_moments, resume_at, capture_at)
    outputs: list[Any] = [None] * len(depths)
    moments: list[Any] = [None] * len(depths)
    for width in widths:
      members = [i for i, d in enumerate(depths) if notation.width_of(d) == width]
      out, mom, _ = self._forward(x, tuple(depths[i] for i in members), train, batch_moments)
      for j, i in enumerate(members):
        outputs[i], moments[i] = out[j], mom[j]
    return tuple(outputs), moments, None

  @nn.compact
  def _forward(self, x, depths: tuple[notation.Depth, ...], train: bool, batch_moments: bool,
               resume_at: int = 0, capture_at: int = 0):
    """Walks ``depths`` as a prefix tree: each block runs once per distinct input.

    With ``batch_moments``, BatchNorm runs with momentum 0, so right after each call
    its 'batch_stats' hold exactly that call's batch mean and variance; they are
    copied to every depth the call served. Returns per-depth outputs, moments
    ({top-level module name: its BatchNorm moments}) and the output of module number
    ``capture_at`` (one depth only; ``cascade_stage``, which also explains ``resume_at``).
    """
    spec = self.spec
    width = self.width or architectures.DEFAULT_WIDTH[spec.family]
    multiplier = notation.width_of(depths[0])
    if any(notation.width_of(d) != multiplier for d in depths):
      raise ValueError('one _forward runs depths of one width (see _forward_widths)')

    def active(channels: int) -> int | None:
      return None if multiplier == 1.0 else layers.active_channels(multiplier, channels,
                                                                   self.channel_group)

    def norm(name: str, features: int | None = None, active: int | None = None) -> nn.Module:
      kwargs = dict(use_running_average=not train, epsilon=1e-5, dtype=self.dtype, name=name,
                    momentum=0.0 if batch_moments else self.bn_momentum)
      if active is None or active == features:
        if train and jnp.dtype(self.dtype) == jnp.float32 and batchnorm.enabled():
          return layers.TrainBatchNorm(momentum=kwargs['momentum'], epsilon=1e-5, name=name)
        return nn.BatchNorm(**kwargs)
      return layers.SlimBatchNorm(**kwargs)

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
      block_cls: Any = blocks.VGGBlock
    else:
      stem = {'cifar_resnet': (3, 1), 'mobilenet': (3, 1), 'mobilenet_imagenet': (3, 2)}.get(
          spec.family, (7, 2))
      x = run(layers.conv(width, *stem, name='stem_conv', dtype=self.dtype,
                          active=active(width)), x, everyone)
      if spec.family == 'cifar_resnet':
        block_cls = functools.partial(blocks.BasicBlock, zero_pad_shortcut=True)
      elif mobilenet:
        block_cls = blocks.SeparableBlock
      else:
        block_cls = blocks.BasicBlock if spec.family == 'resnet_basic' else blocks.Bottleneck
      stem_norm = norm('stem_bn', width, active(width))
      # Training's BatchNorm applies the ReLU in its own passes (ddnn_jax.cpu.batchnorm).
      fused_relu = isinstance(stem_norm, layers.TrainBatchNorm) and not mobilenet
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

    built: dict[tuple[int, int], nn.Module] = {}

    def block(s, b):
      if (s, b) not in built:
        name = f'stage{s}_block{b}'
        if spec.family == 'vgg':
          filters = min(width * 2**s, width * 8)  # 64, 128, 256, 512, 512
          built[s, b] = block_cls(filters, norm=norm, dtype=self.dtype, name=name,
                                   active=active(filters))
        elif mobilenet:
          filters = width * 2**(s + 1)  # 64, 128, 256, 512, 1024
          in_filters = filters if b else (width * 2**s if s else width)
          built[s, b] = block_cls(in_filters, filters, 2 if s > 0 and b == 0 else 1,
                                   norm=norm, dtype=self.dtype, name=name,
                                   active=active(filters))
        else:
          filters = width * 2**s
          ranking = dict(noise_ranking=True, channel_group=self.channel_group) if (
              self.noise_ranking) else {}
          built[s, b] = block_cls(filters, 2 if s > 0 and b == 0 else 1, norm=norm,
                                   dtype=self.dtype, name=name, active=active(filters),
                                   **ranking)
      return built[s, b]

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

    head = (nn.Dense if multiplier == 1.0 else layers.SlimDense)(self.num_classes, dtype=self.dtype,
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
  architectures.arch_spec(arch)  # Fail early on unknown names.
  return DDNN(arch=arch.lower(), num_classes=num_classes, width=width, dtype=dtype,
              bn_momentum=bn_momentum, remat=remat, channel_group=channel_group,
              noise_ranking=noise_ranking)


def variable_shapes(model: DDNN, image_shape: Sequence[int], depth: notation.Depth | None = None):
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