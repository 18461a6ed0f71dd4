"""A few EKD steps of a tiny DDNN, data-parallel; one process of a multi-process run.

``tests/test_parallel.py`` launches it twice on localhost (4 CPU devices each) and
also imports it, to train the same net in its own process for reference. Process 0
saves the losses and the final parameters and BN statistics to ``--out`` (.npz).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
import optax

# Run as a script from anywhere: the package lives one directory up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Importing is fine before jax.distributed.initialize; only computations are not.
from ddnn_jax.training import steps  # noqa: E402
from ddnn_jax.nn import architectures, models  # noqa: E402
from ddnn_jax.core import parallel  # noqa: E402

ARCH, SUBNETS, IMAGE, NUM_CLASSES = 'resnet20', [(1, 1, 1), (2, 2, 2)], (8, 8, 3), 4
GLOBAL_BATCH, NUM_STEPS = 32, 3
WEIGHTS = dict(w=1.0, alpha=10.0)


def global_batches() -> list[dict[str, np.ndarray]]:
  """The same NUM_STEPS global batches in every process (each uses its own slice)."""
  patterns = np.random.default_rng(123).normal(size=(NUM_CLASSES, *IMAGE))
  batches = []
  for seed in range(NUM_STEPS):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, GLOBAL_BATCH)
    images = patterns[labels] + 0.5 * rng.normal(size=(GLOBAL_BATCH, *IMAGE))
    batches.append({'image': images.astype(np.float32), 'label': labels.astype(np.int32)})
  return batches


def local_slice(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's contiguous share of a global batch."""
  n = GLOBAL_BATCH // jax.process_count()
  start = jax.process_index() * n
  return {k: v[start:start + n] for k, v in batch.items()}


def new_state():
  model = models.create_model(ARCH, NUM_CLASSES, width=4)
  depths = architectures.depth_set(ARCH, SUBNETS)
  state = steps.create_train_state(jax.random.key(0), model, depths,
                                   optax.sgd(0.05, momentum=0.9), IMAGE)
  return state, depths


def train(mesh=None):
  """NUM_STEPS EKD steps; returns (losses, final state, last batch as fed).

  With a mesh the state is replicated and every process feeds its slice of each
  global batch; without one, a plain single-device jit on the whole batch.
  """
  state, depths = new_state()
  if mesh is not None:
    state = parallel.replicate(state, mesh)
  step, _ = steps.jit_steps(depths, 'ekd', steps.LossWeights(**WEIGHTS), mesh=mesh,
                            max_traces=1)
  losses = []
  for batch in global_batches():
    if mesh is not None:
      batch = parallel.shard_batch(local_slice(batch), mesh)
    state, metrics = step(state, batch)
    losses.append(parallel.fetch(metrics['loss']))
  return np.asarray(losses), state, batch


def flat(tree) -> np.ndarray:
  """All leaves of a host tree, flattened in the tree's (sorted-key) order."""
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--coordinator', required=True)
  parser.add_argument('--num-processes', type=int, required=True)
  parser.add_argument('--process-id', type=int, required=True)
  parser.add_argument('--out', required=True)
  args = parser.parse_args()
  parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  assert jax.process_count() == args.num_processes, jax.process_count()
  # A second call is a no-op (main and library code may both call it): jax itself would
  # raise 'distributed.initialize should only be called once'.
  parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  assert jax.distributed.is_initialized() and jax.process_count() == args.num_processes
  losses, state, _ = train(parallel.create_mesh())
  host = parallel.fetch({'params': state.params, 'batch_stats': state.batch_stats})
  if parallel.is_main_process():
    np.savez(args.out, losses=losses, params=flat(host['params']),
             batch_stats=flat(host['batch_stats']), device_count=jax.device_count(),
             local_device_count=jax.local_device_count())


if __name__ == '__main__':
  main()
