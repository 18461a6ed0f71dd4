"""Trainable noise ranking: which channel groups a narrower width keeps.

A slimmable layer at width w runs its first channels. With ``model.noise_ranking`` the
ResNet blocks' inner channels (the output of conv1, and of conv2 in a Bottleneck) carry
multiplicative Gaussian noise in training whose level is learned per channel group
(``blocks._ResidualBlock.ranked``). A penalty rewards noise (``penalty``) and the task
loss punishes it where the channels matter, so the least noisy groups are the most
important. At the end of every epoch but the last, ``sort_channels`` permutes every
inner space so its groups run from least to most noise: "the first k channels" is then
the k most important ones. The permutation changes nothing the full net computes (it
reorders a conv's outputs, its BatchNorm and the next conv's inputs alike), so every
deploy tool reads a ranked run as any other.

Only the inner spaces are ranked: a block's output channels are tied across the stage by
the residual sum (and on CIFAR by the zero-padded shortcut), which a permutation of one
block would break.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddnn_jax.nn import models, notation

# A block's inner space: its noise logits -> (producing conv, its BatchNorm, consuming conv).
SPACES = {'noise_logit1': ('conv1', 'bn1', 'conv2'), 'noise_logit2': ('conv2', 'bn2', 'conv3')}


def noise_logits(params: dict[str, Any]) -> dict[tuple[str, str], jax.Array]:
  """{(block, logit name): its per-group noise logits}, in the parameter tree's order."""
  return {(block, name): leaves[name] for block, leaves in params.items()
          if isinstance(leaves, dict) for name in SPACES if name in leaves}


def penalty(params: dict[str, Any]) -> jax.Array:
  """Mean of -log(sigma / NOISE_MAX) over every ranked group: the reward for noise that
  the task loss must outweigh where a group matters."""
  logits = list(noise_logits(params).values())
  if not logits:
    return jnp.zeros((), jnp.float32)
  return jnp.mean(jax.nn.softplus(-jnp.concatenate(logits)))


def group_orders(params: dict[str, Any]) -> dict[tuple[str, str], np.ndarray]:
  """Per ranked space, its groups from the least noise (most important) to the most."""
  return {key: np.argsort(np.asarray(logit), kind='stable')
          for key, logit in noise_logits(params).items()}


def _channels(order: np.ndarray, group: int) -> np.ndarray:
  return (order[:, None] * group + np.arange(group)).reshape(-1)


def permute_params(params: dict[str, Any], orders, group: int) -> dict[str, Any]:
  """``params`` (or any tree of its structure: the optimiser's momentum) with every ranked
  space's channels in ``orders``."""
  out = dict(params)
  for (block, name), order in orders.items():
    idx = _channels(order, group)
    producer, bn, consumer = SPACES[name]
    leaves = dict(out[block])
    leaves[name] = leaves[name][order]
    leaves[producer] = {k: v[..., idx] for k, v in leaves[producer].items()}  # kernel (bias)
    leaves[bn] = {k: v[idx] for k, v in leaves[bn].items()}  # scale, bias
    leaves[consumer] = {**leaves[consumer], 'kernel': leaves[consumer]['kernel'][:, :, idx, :]}
    out[block] = leaves
  return out


def permute_batch_stats(batch_stats: dict[str, Any], orders, group: int) -> dict[str, Any]:
  """The full-width depths' BN statistics after the permutation (the narrower ones run
  other channels now: ``sort_channels`` measures theirs anew)."""
  out = {}
  for depth, stats in batch_stats.items():
    stats = dict(stats)
    for (block, name), order in orders.items():
      bn, idx = SPACES[name][1], _channels(order, group)
      if block in stats and stats[block][bn]['mean'].shape[0] == len(idx):
        stats[block] = {**stats[block], bn: {k: v[idx] for k, v in stats[block][bn].items()}}
    out[depth] = stats
  return out


def sort_channels(state, group: int, depths: Sequence[notation.Depth], images: jax.Array):
  """``state`` (a ``steps.TrainState`` of ``depths``) with every ranked space sorted by its
  learned noise; returns ``(state, groups moved)``.

  A narrower depth then runs other inner channels, so everything after them sees other
  maps: its BN statistics are replaced by the batch moments of ``images`` (a training
  batch), which its running averages go on from."""
  params = jax.device_get(state.params)
  orders = group_orders(params)
  moved = int(sum(np.sum(order != np.arange(len(order))) for order in orders.values()))
  if not moved:
    return state, 0
  structure = jax.tree.structure(params)
  is_params_like = lambda x: (isinstance(x, dict)  # noqa: E731
                              and jax.tree.structure(x) == structure)
  permute = lambda tree: permute_params(tree, orders, group)  # noqa: E731
  opt_state = jax.tree.map(lambda x: permute(x) if is_params_like(x) else x,
                           jax.device_get(state.opt_state), is_leaf=is_params_like)
  params = permute(params)
  batch_stats = permute_batch_stats(jax.device_get(state.batch_stats), orders, group)
  narrow = tuple(d for d in depths if notation.width_of(d) < 1.0)
  if narrow:
    (_, moments), _ = state.apply_fn({'params': params}, images, narrow,
                                     method=models.DDNN.batch_moments, mutable=['batch_stats'])
    for depth, fresh in zip(narrow, moments, strict=True):
      name = notation.depth_name(depth)
      batch_stats[name] = {module: jax.device_get(fresh[module]) for module in batch_stats[name]}
  return state.replace(params=params, opt_state=opt_state, batch_stats=batch_stats), moved
