"""Training objectives of DDNN, EKD and the in-place distillation baselines, as pure functions.

Outputs of all depths are stacked on a leading axis ``D = K + 1``: index 0 is the
full net, 1..K the sub-nets (ordered largest first, which IPKD-TA relies on).
Per-sub-net terms are computed by ``jax.vmap`` over that axis.

EKD (Eq. 7), with ``p_d = softmax(z_d / T)``, ``A_d^s`` the normalised attention map
of stage ``s`` (the stages in ``attention_stages``, all by default) and teachers under
``stop_gradient`` (``sg``)::

  L = CE(z_0) + 1/K sum_k CE(z_k)
      + 1/(K+1) [ sum_k w_k KL(sg p_0 || p_k)               + w KL(sg p_et || p_0) ]
      + 1/(K+1) sum_s [ sum_k alpha_k MSE(sg A_0^s, A_k^s) + alpha MSE(sg A_et^s, A_0^s) ]

  p_et = mean_d p_d,  A_et^s = mean_d A_d^s      (the ensemble teacher)

``w_k``/``alpha_k`` are one weight per sub-net (a scalar applies to each); the terms
teaching the full net use their mean ``w``/``alpha``. ``ekd_no_ensemble`` (the
ablation of Fig. 3) drops those two terms. KL terms are scaled by T^2 so their
gradients keep their size across temperatures.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

MODES = ('individual', 'ddnn', 'ekd', 'ekd_no_ensemble', 'ipkd', 'ipkd_ta')


def check_mode(mode: str, num_subnets: int) -> str:
  if mode not in MODES:
    raise ValueError(f'unknown mode {mode!r}; choose one of {", ".join(MODES)}')
  if mode == 'individual' and num_subnets:
    raise ValueError("mode 'individual' trains one net: give no sub-nets")
  if mode != 'individual' and not num_subnets:
    raise ValueError(f'mode {mode!r} needs at least one sub-net')
  return mode


def cross_entropy(logits: chex.Array, labels: chex.Array) -> chex.Array:
  """Mean softmax cross-entropy against integer labels."""
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def kl_divergence(teacher_probs: chex.Array, student_logits: chex.Array,
                  temperature: float = 1.0) -> chex.Array:
  """Batch mean of KL(teacher || student); teacher given as probabilities at ``temperature``."""
  student_log_probs = jax.nn.log_softmax(student_logits / temperature)
  kl = jnp.sum(jax.scipy.special.xlogy(teacher_probs, teacher_probs)
               - teacher_probs * student_log_probs, axis=-1)
  return jnp.mean(kl) * temperature**2


def attention_map(features: chex.Array, eps: float = 1e-6) -> chex.Array:
  """Channel sum of a [B, H, W, C] map, flattened and L2-normalised over space: [B, H*W]."""
  a = jnp.sum(features.astype(jnp.float32), axis=-1).reshape(features.shape[0], -1)
  return a / (jnp.linalg.norm(a, axis=-1, keepdims=True) + eps)


def stacked_attention(features_per_depth: Sequence[Sequence[chex.Array]],
                      stages: Sequence[int] | None = None) -> tuple[chex.Array, ...]:
  """Attention maps of the distilled ``stages`` (None: all), stacked over depths.

  ``features_per_depth[d][s]`` is depth d's output map of stage s; returns one
  [D, B, H*W] array per chosen stage, the ``attention`` argument of ``ddnn_objective``.
  """
  num_stages = len(features_per_depth[0])
  stages = range(num_stages) if stages is None else stages
  # Only the small [B, H*W] maps are kept, not the feature maps themselves.
  return tuple(jnp.stack([attention_map(features[s]) for features in features_per_depth])
               for s in stages)


def attention_mse(teacher: chex.Array, student: chex.Array) -> chex.Array:
  return jnp.mean(jnp.square(teacher - student))


def _subnet_terms(logits, attention, teacher_probs, teacher_attention, labels, temperature):
  """CE, KL(teacher || sub-net) and attention MSE summed over stages, for one sub-net."""
  ce = cross_entropy(logits, labels)
  kl = kl_divergence(teacher_probs, logits, temperature)
  mse = jnp.zeros((), jnp.float32)
  for t, s in zip(teacher_attention, attention):
    mse += attention_mse(t, s)
  return ce, kl, mse


def uses_attention(mode: str, alpha: float | Sequence[float]) -> bool:
  """Whether ``mode`` needs attention maps (the train step skips them otherwise)."""
  return mode in ('ekd', 'ekd_no_ensemble') and bool(np.any(np.asarray(alpha) != 0))


def _per_subnet(weight: float | Sequence[float], num_subnets: int) -> jax.Array:
  weight = jnp.asarray(weight, jnp.float32)
  if weight.ndim == 0:
    return jnp.full((num_subnets,), weight)
  chex.assert_shape(weight, (num_subnets,))
  return weight


def ddnn_objective(mode: str, logits: chex.Array, attention: Sequence[chex.Array],
                   labels: chex.Array, *, w: float | Sequence[float] = 1.0,
                   alpha: float | Sequence[float] = 1.0,
                   temperature: float = 1.0) -> tuple[chex.Array, dict[str, chex.Array]]:
  """The training loss of ``mode`` and its parts.

  Args:
    mode: one of ``MODES``.
    logits: [D, B, classes], full net first, then sub-nets largest first.
    attention: per distilled stage, [D, B, H*W] normalised attention maps
      (``attention_map``) of every depth; ignored (may be empty) unless
      ``uses_attention(mode, alpha)``.
    labels: [B] integer labels.
    w, alpha: KL and attention-MSE weights: one value or one per sub-net (K).
    temperature: softmax temperature of the distillation terms.

  Returns:
    ``(loss, parts)``; ``parts['ce']`` is the [D] cross-entropy of every depth and
    ``parts['kl']``/``parts['attention']`` the [K] distillation terms of the sub-nets
    (unweighted; attention summed over the stages).
  """
  num_subnets = logits.shape[0] - 1
  check_mode(mode, num_subnets)
  chex.assert_rank(logits, 3)
  chex.assert_shape(labels, (logits.shape[1],))
  if mode == 'individual':
    ce = cross_entropy(logits[0], labels)
    return ce, {'ce': ce[None]}

  sg = jax.lax.stop_gradient
  probs = jax.nn.softmax(logits / temperature)
  use_attention = uses_attention(mode, alpha)
  attention = tuple(attention) if use_attention else ()
  w_k, alpha_k = _per_subnet(w, num_subnets), _per_subnet(alpha, num_subnets)

  if mode == 'ipkd_ta':
    # Sub-net k is taught by the next larger depth k-1 (a teacher assistant).
    teacher_probs, teacher_attention, teacher_axis = sg(probs[:-1]), (), 0
  else:
    teacher_probs = sg(probs[0])
    teacher_attention = tuple(sg(a[0]) for a in attention)
    teacher_axis = None
  ce_sub, kl_sub, mse_sub = jax.vmap(
      _subnet_terms, in_axes=(0, 0, teacher_axis, None, None, None))(
          logits[1:], tuple(a[1:] for a in attention), teacher_probs, teacher_attention,
          labels, temperature)

  ce_full = cross_entropy(logits[0], labels)
  loss = ce_full + jnp.mean(ce_sub)
  parts = {'ce': jnp.concatenate([ce_full[None], ce_sub]), 'kl': kl_sub, 'attention': mse_sub}
  if mode == 'ddnn':
    return loss, parts
  if mode in ('ipkd', 'ipkd_ta'):
    return loss + jnp.mean(w_k * kl_sub), parts

  # EKD: every sub-net learns from the full net ...
  norm = num_subnets + 1
  loss += jnp.sum(w_k * kl_sub) / norm
  if use_attention:
    loss += jnp.sum(alpha_k * mse_sub) / norm
  if mode == 'ekd_no_ensemble':
    return loss, parts
  # ... and the ensemble of all depths teaches the full net back.
  ensemble_probs = sg(jnp.mean(probs, axis=0))
  kl_full = kl_divergence(ensemble_probs, logits[0], temperature)
  mse_full = sum(attention_mse(sg(jnp.mean(a, axis=0)), a[0]) for a in attention)
  loss += jnp.mean(w_k) * kl_full / norm
  if use_attention:
    loss += jnp.mean(alpha_k) * mse_full / norm
  parts.update(kl_full=kl_full, attention_full=jnp.asarray(mse_full, jnp.float32))
  return loss, parts


def weighted_terms(mode: str, parts: dict[str, chex.Array], *, w: float | Sequence[float] = 1.0,
                   alpha: float | Sequence[float] = 1.0) -> dict[str, chex.Array]:
  """The loss of ``mode`` as its separate terms, each with the weight it has in the loss.

  ``parts`` is ``ddnn_objective``'s; the keys are ``'KIND/d'`` with KIND ``ce``, ``kl`` or
  ``attention`` and ``d`` the depth the term trains (0: the full net, taught by the
  ensemble in EKD). Their sum is the loss (the diagnosis of which term drives training:
  ``steps.term_gradient_norms``).
  """
  ce = parts['ce']
  num_subnets = ce.shape[0] - 1
  terms = {'ce/0': ce[0]}
  if mode == 'individual':
    return terms
  terms.update({f'ce/{k}': ce[k] / num_subnets for k in range(1, num_subnets + 1)})
  if mode == 'ddnn':
    return terms
  w_k, alpha_k = _per_subnet(w, num_subnets), _per_subnet(alpha, num_subnets)
  # IPKD's KL terms are averaged over the sub-nets; EKD's are divided by K + 1.
  norm = num_subnets if mode in ('ipkd', 'ipkd_ta') else num_subnets + 1
  terms.update({f'kl/{k}': w_k[k - 1] * parts['kl'][k - 1] / norm
                for k in range(1, num_subnets + 1)})
  if mode in ('ipkd', 'ipkd_ta'):
    return terms
  use_attention = uses_attention(mode, alpha)
  if use_attention:
    terms.update({f'attention/{k}': alpha_k[k - 1] * parts['attention'][k - 1] / norm
                  for k in range(1, num_subnets + 1)})
  if mode == 'ekd':
    terms['kl/0'] = jnp.mean(w_k) * parts['kl_full'] / norm
    if use_attention:
      terms['attention/0'] = jnp.mean(alpha_k) * parts['attention_full'] / norm
  return terms

