"""The learning-rate schedule and the optimiser of a run."""

from __future__ import annotations

import jax
import ml_collections
import optax


def create_learning_rate_fn(config: ml_collections.ConfigDict,
                            steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up, then cosine or step decay; peak LR scaled by the global batch."""
  peak = config.optim.learning_rate * config.train.batch_size / config.optim.reference_batch_size
  warmup = int(config.optim.warmup_epochs * steps_per_epoch)
  total = config.train.num_epochs * steps_per_epoch
  if config.optim.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, max(total - warmup, 1))
  else:
    decay = optax.piecewise_constant_schedule(
        peak, {e * steps_per_epoch - warmup: config.optim.decay_factor
               for e in config.optim.decay_epochs})
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def create_optimizer(config: ml_collections.ConfigDict,
                     learning_rate: optax.Schedule) -> optax.GradientTransformation:
  # Decay kernels only, not BN scales/biases (as the flax ImageNet example).
  kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
  return optax.chain(
      optax.add_decayed_weights(config.optim.weight_decay, mask=kernels),
      optax.sgd(learning_rate, momentum=config.optim.momentum, nesterov=config.optim.nesterov))
