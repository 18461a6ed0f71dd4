"""The blocks a net's stages are made of: ResNet's basic and bottleneck blocks, VGG's
conv-BN-ReLU and MobileNet-V1's depthwise-separable block, built from ``layers``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddnn_jax.nn import layers

# Largest standard deviation of the ranking noise (sigma = NOISE_MAX * sigmoid(logit)).
NOISE_MAX = 1.0


class _ResidualBlock(nn.Module):
  """What both ResNet blocks take. ``active``: the channels a block runs of its
  ``filters`` (a narrower width). ``noise_ranking``: the block's inner channels carry a
  learned noise level per group of ``channel_group`` (``ranking``)."""
  filters: int
  strides: int
  norm: layers.ModuleDef
  dtype: Any = jnp.float32
  active: int | None = None
  noise_ranking: bool = False
  channel_group: int = 8

  def noisy(self, features: int, active: int) -> bool:
    """Whether ``ranked`` changes its input (else BN may fold into the conv before it)."""
    return self.noise_ranking and active == features and self.has_rng('noise')

  def conv_norm(self, x, conv, norm, *, relu: bool, residual=None, rank=None):
    """``layers.conv_norm``, with the ranking noise of inner space ``rank`` = (number, features,
    active) between the BatchNorm and the ReLU."""
    if rank is None or not self.noise_ranking:  # No noise: BN and ReLU stay one function.
      return layers.conv_norm(self, x, conv, norm, relu=relu, residual=residual)
    return layers.conv_norm(self, x, conv, norm, relu=relu, residual=residual,
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
    y = self.conv_norm(x, layers.conv(f, 3, self.strides, name='conv1', dtype=self.dtype, active=a),
                       self.norm(name='bn1', features=f, active=a), relu=True, rank=(1, f, a))
    if self.strides == 1 and x.shape[-1] == y.shape[-1]:
      shortcut = x
    elif self.zero_pad_shortcut:
      x = x[:, ::self.strides, ::self.strides, :]
      extra = a - x.shape[-1]
      shortcut = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    else:
      shortcut = self.conv_norm(
          x, layers.conv(f, 1, self.strides, name='proj_conv', dtype=self.dtype, active=a),
          self.norm(name='proj_bn', features=f, active=a), relu=False)
    return self.conv_norm(y, layers.conv(f, 3, name='conv2', dtype=self.dtype, active=a),
                          self.norm(name='bn2', features=f, active=a), relu=True,
                          residual=shortcut)


class Bottleneck(_ResidualBlock):
  """ImageNet Bottleneck (stride on the 3x3 conv, 'ResNet v1.5')."""

  @nn.compact
  def __call__(self, x):
    f, a = self.filters, self.active or self.filters
    y = self.conv_norm(x, layers.conv(f, 1, name='conv1', dtype=self.dtype, active=a),
                       self.norm(name='bn1', features=f, active=a), relu=True, rank=(1, f, a))
    y = self.conv_norm(y, layers.conv(f, 3, self.strides, name='conv2', dtype=self.dtype, active=a),
                       self.norm(name='bn2', features=f, active=a), relu=True, rank=(2, f, a))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != 4 * a:
      shortcut = self.conv_norm(
          x, layers.conv(f * 4, 1, self.strides, name='proj_conv', dtype=self.dtype, active=4 * a),
          self.norm(name='proj_bn', features=4 * f, active=4 * a), relu=False)
    return self.conv_norm(y, layers.conv(f * 4, 1, name='conv3', dtype=self.dtype, active=4 * a),
                          self.norm(name='bn3', features=4 * f, active=4 * a), relu=True,
                          residual=shortcut)


class VGGBlock(nn.Module):
  """3x3 conv, BatchNorm, ReLU: one block of a VGG-BN stage."""
  filters: int
  norm: layers.ModuleDef
  dtype: Any = jnp.float32
  active: int | None = None

  @nn.compact
  def __call__(self, x):
    f, a = self.filters, self.active or self.filters
    return layers.conv_norm(self, x, layers.conv(f, 3, name='conv', dtype=self.dtype, active=a),
                      self.norm(name='bn', features=f, active=a), relu=True)


class SeparableBlock(nn.Module):
  """MobileNet-V1's depthwise-separable block: a 3x3 depthwise conv over its input's
  channels and a 1x1 conv to ``filters``, each with BatchNorm and ReLU6."""
  in_filters: int
  filters: int
  strides: int
  norm: layers.ModuleDef
  dtype: Any = jnp.float32
  active: int | None = None

  @nn.compact
  def __call__(self, x):
    c_in, a = x.shape[-1], self.active or self.filters
    x = layers.conv(self.in_filters, 3, self.strides, name='dw_conv', dtype=self.dtype,
              active=c_in, depthwise=True)(x)
    x = nn.relu6(self.norm(name='dw_bn', features=self.in_filters, active=c_in)(x))
    x = layers.conv(self.filters, 1, name='pw_conv', dtype=self.dtype, active=a)(x)
    return nn.relu6(self.norm(name='pw_bn', features=self.filters, active=a)(x))
