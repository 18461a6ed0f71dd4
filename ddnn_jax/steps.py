"""Train state, the jitted DDNN train step and the per-depth eval step.

One parameter tree is shared by every depth. BatchNorm statistics are private to
each depth (``TrainState.batch_stats[depth_name]``): a sub-net skips blocks, so the
maps reaching its later layers have other statistics than in the full net, and
evaluating it with the full net's running averages would mis-normalise them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddnn_jax import losses, models


class TrainState(train_state.TrainState):
  batch_stats: dict[str, Any]  # depth_name(depth) -> that depth's BatchNorm statistics


@chex.dataclass(frozen=True)
class LossWeights:
  w: float = 1.0  # KL distillation weight.
  alpha: float = 1.0  # Attention-MSE weight.
  temperature: float = 1.0


def _select(tree, like):
  """The sub-tree of ``tree`` with the keys of ``like`` (a sub-net's slice of the full net's)."""
  if not isinstance(like, dict):
    return tree
  return {k: _select(tree[k], v) for k, v in like.items()}


def create_train_state(rng: jax.Array, model: models.DDNN, depths: Sequence[models.Depth],
                       tx: optax.GradientTransformation,
                       image_shape: Sequence[int]) -> TrainState:
  """Initialises the full net's parameters and one set of BN statistics per depth."""
  image = jnp.zeros((1, *image_shape), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(rng, image)
  batch_stats = {}
  for depth in depths:
    used = jax.eval_shape(lambda x, d=depth: model.init(rng, x, depth=d, train=False), image)
    # A copy: each depth owns its statistics (and donated buffers must not alias).
    batch_stats[models.depth_name(depth)] = jax.tree.map(
        jnp.copy, _select(variables['batch_stats'], used['batch_stats']))
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=batch_stats)


def _forward(state: TrainState, params, images, depths, train: bool, need_attention: bool):
  """Runs every depth; returns stacked logits [D,B,C], attention maps per stage, new stats."""
  logits, attention, new_stats = [], [], {}
  for depth in depths:
    key = models.depth_name(depth)
    variables = {'params': params, 'batch_stats': state.batch_stats[key]}
    if train:
      (z, features), mutated = state.apply_fn(variables, images, depth=depth, train=True,
                                              mutable=['batch_stats'])
      new_stats[key] = mutated['batch_stats']
    else:
      z, features = state.apply_fn(variables, images, depth=depth, train=False)
    logits.append(z)
    # Only the small [B, H*W] maps are kept, not the feature maps themselves.
    if need_attention:
      attention.append([losses.attention_map(f) for f in features])
  attention = tuple(jnp.stack(a) for a in zip(*attention))
  return jnp.stack(logits), attention, new_stats


def _accuracy(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels, axis=-1)


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               depths: tuple[models.Depth, ...], mode: str,
               weights: LossWeights = LossWeights()) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on every depth in ``depths`` (full net first).

  Returns the new state and metrics: scalar ``loss``, and per depth (arrays of
  length D, in the order of ``depths``) ``ce`` and ``accuracy``.
  """
  images, labels = batch['image'], batch['label']
  need_attention = losses.uses_attention(mode, weights.alpha)

  def loss_fn(params):
    logits, attention, new_stats = _forward(state, params, images, depths, True, need_attention)
    loss, parts = losses.ddnn_objective(mode, logits, attention, labels, w=weights.w,
                                        alpha=weights.alpha, temperature=weights.temperature)
    return loss, (logits, parts, new_stats)

  (loss, (logits, parts, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads, batch_stats=new_stats)
  metrics = {'loss': loss, 'accuracy': _accuracy(logits, labels), **parts}
  return state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *,
              depths: tuple[models.Depth, ...]) -> dict[str, jax.Array]:
  """Sums (not means) of correct predictions, CE and examples per depth, so batches add up.

  ``batch['mask']`` (optional, 1 = real example) excludes the padding of a last batch.
  """
  images, labels = batch['image'], batch['label']
  mask = batch.get('mask', jnp.ones(labels.shape, jnp.float32))
  logits, _, _ = _forward(state, state.params, images, depths, False, False)
  log_probs = jax.nn.log_softmax(logits)
  ce = -jnp.take_along_axis(log_probs, labels[None, :, None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {'correct': jnp.sum(correct * mask, -1), 'ce_sum': jnp.sum(ce * mask, -1),
          'count': jnp.sum(mask)}


def jit_steps(depths: tuple[models.Depth, ...], mode: str, weights: LossWeights = LossWeights(),
              mesh: Mesh | None = None, max_traces: int | None = None):
  """Jitted (train_step, eval_step) for one depth set.

  With a ``mesh`` the batch is sharded over its 'data' axis and the state is
  replicated: XLA then computes BatchNorm statistics, the loss and the gradient
  over the global batch, inserting the cross-device reductions itself. The
  state's buffers are donated. ``max_traces`` turns a silent retrace of the train
  step (a recompile) into an AssertionError.
  """
  losses.check_mode(mode, len(depths) - 1)

  traces = 0

  def train(state, batch):
    # Runs only while jax traces: counts compilations of this depth set's step.
    nonlocal traces
    traces += 1
    if max_traces is not None and traces > max_traces:
      raise AssertionError(f'train step for depths {depths} traced {traces} times '
                           f'(max {max_traces}): inputs changed shape, dtype or sharding')
    return train_step(state, batch, depths=depths, mode=mode, weights=weights)

  def evaluate(state, batch):
    return eval_step(state, batch, depths=depths)

  kwargs = {}
  if mesh is not None:
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    kwargs = dict(in_shardings=(replicated, sharded), out_shardings=replicated)
  return (jax.jit(train, donate_argnums=0, **kwargs), jax.jit(evaluate, **kwargs))
