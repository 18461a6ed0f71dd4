"""The layers of the nets: convolutions, dense heads and BatchNorms, full and slimmable.

A narrower width runs the first channels of every layer over the full net's parameters
(``SlimConv``, ``SlimDense``, ``SlimBatchNorm``, ``active_channels``). ``TrainBatchNorm``
is train-mode BatchNorm with its residual add and ReLU in one custom-gradient function
(``ddnn_jax.cpu.batchnorm``); ``conv_norm`` folds BatchNorm into one oneDNN inference call
where it can (``ddnn_jax.cpu.onednn``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddnn_jax.cpu import batchnorm, onednn

ModuleDef = Callable[..., nn.Module]


def active_channels(width: float, channels: int, group: int) -> int:
  """Channels a layer of ``channels`` runs at ``width``: the first ceil(width * channels),
  rounded up to a multiple of ``group`` (all of them at width 1)."""
  if width == 1.0:
    return channels
  return min(channels, group * math.ceil(width * channels / group))


def conv(features: int, kernel: int, strides: int = 1, *, name: str, dtype: Any,
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


def conv_norm(module: nn.Module, x, conv: nn.Module, norm: nn.Module, *, relu: bool,
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
