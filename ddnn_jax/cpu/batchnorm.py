"""Train-mode BatchNorm (+ residual) (+ ReLU) as one function with a hand-written gradient.

Autodiff of flax's BatchNorm followed by ``relu(y + residual)`` keeps the pre-activation
for the ReLU's gradient and differentiates the mean and the variance as separate chains,
so XLA CPU runs each block's BatchNorm as about a dozen passes over the activation
(docs/performance-notes.md). Here the forward pass is two (the moments; normalise, add
and ReLU) and the backward pass two (two per-channel sums; the input's gradient), the
ReLU's mask read off the output. Results equal flax's BatchNorm to float32 rounding
(tests/test_batchnorm.py).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp


def enabled() -> bool:
  """Whether the models' float32 train-mode BatchNorms use ``batch_norm_act``: on CPU,
  where it was measured (docs/performance-notes.md), unless DDNN_JAX_FUSED_BN=0; on any
  backend with DDNN_JAX_FUSED_BN=1."""
  switch = os.environ.get('DDNN_JAX_FUSED_BN')
  return switch == '1' or (switch != '0' and jax.default_backend() == 'cpu')


def _moments(x):
  """Per-channel mean and biased variance as flax's BatchNorm (E[x^2] - E[x]^2)."""
  axes = tuple(range(x.ndim - 1))
  mean, mean2 = jnp.mean(x, axes), jnp.mean(jnp.square(x), axes)
  return mean, jnp.maximum(0.0, mean2 - jnp.square(mean))


def _forward(x, scale, bias, residual, epsilon, relu):
  mean, var = _moments(x)
  # XLA CPU writes out as a full-size tensor any broadcast that several fusions share (the
  # bias of a block every branch runs, the ReLU's zero, the factor the backward pass
  # recomputes), and each fusion then reads it: a barrier gives this call its own copies.
  m, a, b, zero = jax.lax.optimization_barrier(
      (mean, jax.lax.rsqrt(var + epsilon) * scale, bias, jnp.zeros_like(mean)))
  y = (x - m) * a + b  # flax's order of ops.
  if residual is not None:
    y = residual + y
  return (jnp.maximum(y, zero) if relu else y), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def batch_norm_act(x, scale, bias, residual, epsilon: float, relu: bool):
  """``(relu(bn(x) + residual), mean, var)`` of NHWC ``x`` over all but its last axis:
  flax's train-mode BatchNorm (fast variance), the residual add and the ReLU both
  optional (``residual=None``, ``relu=False``); mean and var are the batch moments."""
  return _forward(x, scale, bias, residual, epsilon, relu)


def _fwd(x, scale, bias, residual, epsilon, relu):
  out, mean, var = _forward(x, scale, bias, residual, epsilon, relu)
  # The output, not the pre-activation, is kept: out > 0 is the ReLU's mask.
  return (out, mean, var), (x, scale, mean, var, out, residual is not None)


def _bwd(epsilon, relu, saved, cotangents):
  x, scale, mean, var, out, has_residual = saved
  d_out, d_mean, d_var = cotangents
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  inv = jax.lax.rsqrt(var + epsilon)
  g = jnp.where(out > 0, d_out, 0.0) if relu else d_out  # The gradient at bn(x) + residual.
  # Sums over x, not x - mean, so that no centered copy of x is written.
  sum_g = jnp.sum(g, axes)
  sum_gc = jnp.sum(g * x, axes) - mean * sum_g
  d_bias, d_scale = sum_g, sum_gc * inv
  a = scale * inv
  # d/dx of (x - mean) * a + bias through the batch moments, plus the moments' own
  # cotangents (d mean/dx = 1/N, d var/dx = 2 (x - mean)/N): dx = a g + c1 (x - mean) + c0.
  # Where flax's max(0, .) clipped the variance, it passes no gradient.
  c1 = jnp.where(var > 0, (2.0 * d_var - a * inv * d_scale) / count, 0.0)
  c0 = (d_mean - a * sum_g) / count
  d_x = a * g + c1 * x + (c0 - c1 * mean)
  return d_x, d_scale, d_bias, (g if has_residual else None)


batch_norm_act.defvjp(_fwd, _bwd)
