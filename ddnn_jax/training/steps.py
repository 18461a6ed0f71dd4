"""Train state, the jitted DDNN train step and the per-depth eval step.

One parameter tree is shared by every depth. BatchNorm statistics are private to
each depth (``TrainState.batch_stats[depth_name]``): a sub-net skips blocks, so the
maps reaching its later layers have other statistics than in the full net, and
evaluating it with the full net's running averages would mis-normalise them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax.sharding import Mesh

from ddnn_jax.core import parallel
from ddnn_jax.nn import models, notation, ranking
from ddnn_jax.training import losses


class TrainState(train_state.TrainState):
  batch_stats: dict[str, Any]  # depth_name(depth) -> that depth's BatchNorm statistics


@chex.dataclass(frozen=True)
class LossWeights:
  w: float | tuple[float, ...] = 1.0  # KL distillation weight, or one per sub-net.
  alpha: float | tuple[float, ...] = 1.0  # Attention-MSE weight, or one per sub-net.
  temperature: float = 1.0
  attention_stages: tuple[int, ...] | None = None  # Distilled stages; None: all.
  noise_penalty: float = 0.0  # Weight of ``ranking.penalty`` (model.noise_ranking runs).

  @classmethod
  def from_config(cls, config) -> LossWeights:
    """The ``config.loss`` fields (validated by ``config_lib``)."""
    as_weight = lambda v: tuple(v) if isinstance(v, (list, tuple)) else float(v)  # noqa: E731
    stages = config.loss.attention_stages
    ranked = config.model.get('noise_ranking', False)
    return cls(w=as_weight(config.loss.w), alpha=as_weight(config.loss.alpha),
               temperature=float(config.loss.temperature),
               attention_stages=None if stages is None else tuple(stages),
               noise_penalty=float(config.loss.noise_penalty) if ranked else 0.0)


def create_train_state(rng: jax.Array, model: models.DDNN, depths: Sequence[notation.Depth],
                       tx: optax.GradientTransformation,
                       image_shape: Sequence[int]) -> TrainState:
  """Initialises the full net's parameters and one set of BN statistics per depth."""
  image = jnp.zeros((1, *image_shape), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(rng, image)
  batch_stats = {}
  for depth in depths:
    used = models.variable_shapes(model, image_shape, depth)
    # A copy: each depth owns its statistics (and donated buffers must not alias).
    batch_stats[notation.depth_name(depth)] = jax.tree.map(
        jnp.copy, models.select_used(variables['batch_stats'], used['batch_stats']))
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=batch_stats)


def _train_forward(state: TrainState, params, images, depths, need_attention: bool,
                   shared_trunk: bool, attention_stages: Sequence[int] | None = None):
  """Every depth in train mode: stacked logits [D,B,C], attention maps, new BN statistics.

  ``shared_trunk`` runs the depths as one prefix tree (``DDNN.train_forward``); without
  it each depth is its own forward pass (the reference the shared trunk must equal).
  """
  names = [notation.depth_name(d) for d in depths]
  # Only a net with model.noise_ranking draws from it; a resumed run draws the same.
  rngs = {'noise': jax.random.fold_in(jax.random.key(0), state.step)}
  if shared_trunk:
    (outputs, new_stats), _ = state.apply_fn(
        {'params': params}, images, depths, [state.batch_stats[n] for n in names],
        method=models.DDNN.train_forward, mutable=['batch_stats'], rngs=rngs)
  else:
    outputs, new_stats = [], []
    for depth, name in zip(depths, names):
      out, mutated = state.apply_fn({'params': params, 'batch_stats': state.batch_stats[name]},
                                    images, depth=depth, train=True, mutable=['batch_stats'],
                                    rngs=rngs)
      outputs.append(out)
      new_stats.append(mutated['batch_stats'])
  logits = jnp.stack([z for z, _ in outputs])
  attention = losses.stacked_attention([features for _, features in outputs],
                                       attention_stages) if need_attention else ()
  return logits, attention, dict(zip(names, new_stats))


def _accuracy(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels, axis=-1)


def loss_and_grads(state: TrainState, batch: dict[str, jax.Array], *,
                   depths: tuple[notation.Depth, ...], mode: str,
                   weights: LossWeights = LossWeights(), shared_trunk: bool = True):
  """The objective of ``mode`` on ``batch`` and its gradient with respect to the parameters.

  Returns ``((loss, aux), grads)``; ``aux`` holds the stacked ``logits`` [D, B, C], the
  loss ``parts`` (``losses.ddnn_objective``) and every depth's new ``batch_stats``.
  """
  images, labels = batch['image'], batch['label']
  need_attention = losses.uses_attention(mode, weights.alpha)

  def loss_fn(params):
    logits, attention, new_stats = _train_forward(state, params, images, depths, need_attention,
                                                  shared_trunk, weights.attention_stages)
    loss, parts = losses.ddnn_objective(mode, logits, attention, labels, w=weights.w,
                                        alpha=weights.alpha, temperature=weights.temperature)
    if weights.noise_penalty:
      loss = loss + weights.noise_penalty * ranking.penalty(params)
    return loss, {'logits': logits, 'parts': parts, 'batch_stats': new_stats}

  return jax.value_and_grad(loss_fn, has_aux=True)(state.params)


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               depths: tuple[notation.Depth, ...], mode: str, weights: LossWeights = LossWeights(),
               shared_trunk: bool = True) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on every depth in ``depths`` (full net first).

  Returns the new state and metrics: scalar ``loss``, and per depth (arrays of
  length D, in the order of ``depths``) ``ce`` and ``accuracy``.
  """
  (loss, aux), grads = loss_and_grads(state, batch, depths=depths, mode=mode, weights=weights,
                                      shared_trunk=shared_trunk)
  # Depths that did not run this step (a sandwich-rule subset) keep their statistics.
  state = state.apply_gradients(grads=grads, batch_stats={**state.batch_stats,
                                                          **aux['batch_stats']})
  metrics = {'loss': loss, 'accuracy': _accuracy(aux['logits'], batch['label']), **aux['parts']}
  return state, metrics


def term_gradient_norms(state: TrainState, batch: dict[str, jax.Array], *,
                        depths: tuple[notation.Depth, ...], mode: str,
                        weights: LossWeights = LossWeights(), shared: Any = None,
                        shared_trunk: bool = True) -> dict[str, jax.Array]:
  """Each weighted loss term (``losses.weighted_terms``) and the L2 norm of its gradient.

  A diagnosis of which term drives training: one forward pass, then one backward pass
  per term (the train step is not changed; this runs beside it at log steps). Returns
  ``{'term/KIND/d': value, 'grad_norm/KIND/d': norm over every parameter}`` and, with
  ``shared`` (a ``models.variable_shapes`` params tree: the parameters every depth uses),
  ``'grad_norm_shared/KIND/d'``: the norm on those, where all terms pull. ``'.../total'``
  is the whole loss's.
  """
  images, labels = batch['image'], batch['label']
  need_attention = losses.uses_attention(mode, weights.alpha)
  names = []

  def terms_fn(params):
    logits, attention, _ = _train_forward(state, params, images, depths, need_attention,
                                          shared_trunk, weights.attention_stages)
    _, parts = losses.ddnn_objective(mode, logits, attention, labels, w=weights.w,
                                     alpha=weights.alpha, temperature=weights.temperature)
    terms = losses.weighted_terms(mode, parts, w=weights.w, alpha=weights.alpha)
    names[:] = terms
    return jnp.stack(list(terms.values()))

  values, backward = jax.vjp(terms_fn, state.params)
  out = {}
  cotangents = [*jnp.eye(len(names), dtype=values.dtype), jnp.ones_like(values)]
  for name, cotangent in zip([*names, 'total'], cotangents):
    (grads,) = backward(cotangent)
    out[f'grad_norm/{name}'] = optax.global_norm(grads)
    if shared is not None:
      out[f'grad_norm_shared/{name}'] = optax.global_norm(models.select_used(grads, shared))
  out.update({f'term/{name}': v for name, v in zip(names, values)})
  return out


def jit_term_gradient_norms(depths: tuple[notation.Depth, ...], mode: str,
                            weights: LossWeights = LossWeights(), mesh: Mesh | None = None,
                            shared: Any = None):
  """``term_gradient_norms`` jitted like the train step (batch sharded over ``mesh``)."""
  def norms(state, batch):
    return term_gradient_norms(state, batch, depths=depths, mode=mode, weights=weights,
                               shared=shared)

  return jax.jit(parallel.traced_in_mesh(norms, mesh), **_state_batch_shardings(mesh))


def _state_batch_shardings(mesh: Mesh | None) -> dict[str, Any]:
  """jit's shardings for ``f(state, batch)``: the state replicated, the batch split over
  the mesh's 'data' axis; none without a mesh."""
  if mesh is None:
    return {}
  replicated = parallel.replicated_sharding(mesh)
  return dict(in_shardings=(replicated, parallel.batch_sharding(mesh)),
              out_shardings=replicated)


def depth_logits(apply_fn, params, batch_stats, images, depth: notation.Depth) -> jax.Array:
  """Inference of one depth with its own BatchNorm statistics: the apply every evaluation
  and deployment path (eval step, ``ddnn_jax.evaluate``, export, ``DynamicModel``) uses."""
  return apply_fn({'params': params, 'batch_stats': batch_stats}, images, depth=depth,
                  train=False)[0]


def eval_step(state: TrainState, batch: dict[str, jax.Array], *,
              depths: tuple[notation.Depth, ...]) -> dict[str, jax.Array]:
  """Sums (not means) of correct predictions, CE and examples per depth, so batches add up.

  ``batch['mask']`` (optional, 1 = real example) excludes the padding of a last batch.
  """
  images, labels = batch['image'], batch['label']
  mask = batch.get('mask', jnp.ones(labels.shape, jnp.float32))
  logits = jnp.stack([
      depth_logits(state.apply_fn, state.params, state.batch_stats[notation.depth_name(depth)],
                   images, depth) for depth in depths])
  log_probs = jax.nn.log_softmax(logits)
  ce = -jnp.take_along_axis(log_probs, labels[None, :, None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {'correct': jnp.sum(correct * mask, -1), 'ce_sum': jnp.sum(ce * mask, -1),
          'count': jnp.sum(mask)}


def trace_guard(fn: Callable[..., Any], max_traces: int, what: str) -> Callable[..., Any]:
  """``fn``, raising AssertionError once jax traces it more than ``max_traces`` times.

  Wrap before ``jax.jit``: the body runs only while jax traces, so each run is one
  (re)compilation; ``.traces`` counts them. The count belongs to this wrapper.
  (``chex.assert_max_traces`` keys its count by the call site, so every closure made at
  one place would share it.)
  """
  @functools.wraps(fn)
  def guarded(*args, **kwargs):
    guarded.traces += 1
    if guarded.traces > max_traces:
      raise AssertionError(f'{what} traced {guarded.traces} times (max {max_traces}): inputs '
                           'changed shape, dtype or sharding')
    return fn(*args, **kwargs)

  guarded.traces = 0  # How many times jax traced it so far.
  return guarded


def jit_steps(depths: tuple[notation.Depth, ...], mode: str, weights: LossWeights = LossWeights(),
              mesh: Mesh | None = None, max_traces: int | None = None, shared_trunk: bool = True):
  """Jitted (train_step, eval_step) for one depth set.

  With a ``mesh`` the batch is sharded over its 'data' axis and the state is
  replicated: XLA then computes BatchNorm statistics, the loss and the gradient
  over the global batch, inserting the cross-device reductions itself. The
  state's buffers are donated. ``max_traces`` turns a silent retrace of the train
  step (a recompile) into an AssertionError.
  """
  losses.check_mode(mode, len(depths) - 1)

  def train(state, batch):
    return train_step(state, batch, depths=depths, mode=mode, weights=weights,
                      shared_trunk=shared_trunk)

  def evaluate(state, batch):
    return eval_step(state, batch, depths=depths)

  # The mesh, seen while tracing, lets each device run oneDNN's convolutions
  # (ddnn_jax/cpu/onednn.py) on its own slice of the batch.
  train, evaluate = parallel.traced_in_mesh(train, mesh), parallel.traced_in_mesh(evaluate, mesh)

  if max_traces is not None:
    train = trace_guard(train, max_traces, f'train step for depths {depths}')
  kwargs = _state_batch_shardings(mesh)
  return (jax.jit(train, donate_argnums=0, **kwargs), jax.jit(evaluate, **kwargs))
