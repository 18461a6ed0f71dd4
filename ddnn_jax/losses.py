"""Training objectives of DDNN, EKD and the in-place distillation baselines, as pure functions.

Outputs of all depths are stacked on a leading axis ``D = K + 1``: index 0 is the
full net, 1..K the sub-nets (ordered largest first, which IPKD-TA relies on).
Per-sub-net terms are computed by ``jax.vmap`` over that axis.

EKD (Eq. 7), with ``p_d = softmax(z_d / T)``, ``A_d^s`` the normalised attention map
of stage ``s`` and teachers under ``stop_gradient`` (``sg``)::

  L = CE(z_0) + 1/K sum_k CE(z_k)
      + w/(K+1)     [ sum_k KL(sg p_0 || p_k)        + KL(sg p_et || p_0) ]
      + alpha/(K+1) sum_s [ sum_k MSE(sg A_0^s, A_k^s) + MSE(sg A_et^s, A_0^s) ]

  p_et = mean_d p_d,  A_et^s = mean_d A_d^s      (the ensemble teacher)

KL terms are scaled by T^2 so their gradients keep their size across temperatures.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp

MODES = ('individual', 'ddnn', 'ekd', 'ipkd', 'ipkd_ta')


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


def uses_attention(mode: str, alpha: float) -> bool:
  """Whether ``mode`` needs attention maps (the train step skips them otherwise)."""
  return mode == 'ekd' and alpha != 0


def ddnn_objective(mode: str, logits: chex.Array, attention: Sequence[chex.Array],
                   labels: chex.Array, *, w: float = 1.0, alpha: float = 1.0,
                   temperature: float = 1.0) -> tuple[chex.Array, dict[str, chex.Array]]:
  """The training loss of ``mode`` and its parts.

  Args:
    mode: one of ``MODES``.
    logits: [D, B, classes], full net first, then sub-nets largest first.
    attention: per stage, [D, B, H*W] normalised attention maps (``attention_map``)
      of every depth; ignored (may be empty) unless ``uses_attention(mode, alpha)``.
    labels: [B] integer labels.
    w, alpha, temperature: KL weight, attention-MSE weight, softmax temperature.

  Returns:
    ``(loss, parts)``; ``parts['ce']`` is the [D] cross-entropy of every depth and
    ``parts['kl']``/``parts['attention']`` the [K] distillation terms of the sub-nets.
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
    return loss + w * jnp.mean(kl_sub), parts

  # EKD: the ensemble of all depths teaches the full net back.
  ensemble_probs = sg(jnp.mean(probs, axis=0))
  kl_full = kl_divergence(ensemble_probs, logits[0], temperature)
  mse_full = sum(attention_mse(sg(jnp.mean(a, axis=0)), a[0]) for a in attention)
  norm = num_subnets + 1
  loss += w / norm * (jnp.sum(kl_sub) + kl_full)
  if use_attention:
    loss += alpha / norm * (jnp.sum(mse_sub) + mse_full)
  parts.update(kl_full=kl_full, attention_full=jnp.asarray(mse_full, jnp.float32))
  return loss, parts
