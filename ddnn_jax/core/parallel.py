"""Multi-device and multi-process data parallelism: mesh, batch sharding, host transfers.

Every process runs the same program (JAX's multi-controller model). The train step
(``steps.jit_steps(..., mesh=mesh)``) sees *global* arrays: the state replicated on
every device of the mesh, the batch sharded over its 'data' axis. Each process
only loads and feeds its own slice of the global batch (``shard_batch``); XLA
inserts the cross-device (and cross-process) reductions for the loss, the gradient
and the BatchNorm statistics, so training is the same as on one device with the
global batch.

Typical use::

  parallel.initialize_distributed()            # first, before any other JAX call
  mesh = parallel.create_mesh()
  state = parallel.replicate(state, mesh)
  train, _ = steps.jit_steps(depths, mode, mesh=mesh)
  state, metrics = train(state, parallel.shard_batch(local_batch, mesh))
  if parallel.is_main_process():
    print(parallel.fetch(metrics))
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def _env_int(name: str, default: int = 0) -> int:
  try:
    return int(os.environ.get(name, default))
  except ValueError:
    return default


def _detected_cluster() -> str | None:
  """The multi-process launcher this process runs under, if any (env vars only).

  One process per machine (plain ``python train.py``) gives None even inside a
  SLURM allocation or Kubernetes pod, so that case never waits for peers.
  """
  slurm = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
           'SLURM_LOCALID')
  if all(v in os.environ for v in slurm) and _env_int('SLURM_NTASKS') > 1:
    return 'slurm'
  if 'OMPI_MCA_orte_hnp_uri' in os.environ and _env_int('OMPI_COMM_WORLD_SIZE') > 1:
    return 'ompi'
  return None


def _enable_cpu_collectives() -> None:
  # Cross-process computations on CPU need a collectives backend; jax 0.10 defaults
  # to gloo, older versions to none. A user's choice (e.g. 'mpi') is kept.
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, detect: bool = False) -> None:
  """Joins a multi-process run when there is one; otherwise does nothing.

  Must be called before any other JAX call (it fixes the device set). Runs
  ``jax.distributed.initialize`` when
    * any argument (or ``$JAX_COORDINATOR_ADDRESS``) is given -- GPU clusters,
      several processes on one machine; the rest is auto-detected or must be given;
    * SLURM (``srun``, more than one task) or Open MPI (``mpirun -n >1``) launched
      us -- jax then reads everything from the environment; on GPUs it gives each
      task one GPU (its local rank), so launch one task per GPU;
    * ``detect`` is set (``--distributed``, as launch/tpu_vm.sh passes on TPU VMs) --
      jax reads the topology of a TPU pod slice from the TPU VM; a single-host TPU VM
      has none and runs as one process.
  A single process on a plain machine returns at once: nothing to wait for.
  Idempotent: a second call, once initialised, does nothing.
  """
  if jax.distributed.is_initialized():
    return
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  explicit = any(a is not None for a in (coordinator_address, num_processes, process_id))
  cluster = None if explicit else _detected_cluster()
  if not (explicit or cluster or detect):
    return
  _enable_cpu_collectives()
  # ddnn_jax.training.preemption handles SIGTERM itself (jax's service would take the signal
  # over and answer about a second late).
  jax.config.update('jax_enable_preemption_service', False)
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except ValueError:
    # Asked to detect a cluster and none is there (a lone TPU VM: jax finds no
    # coordinator): nothing to join, so carry on as one process.
    if explicit or cluster:
      raise
    logging.info('no multi-process cluster detected: running as a single process.')


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all global devices), axis 'data'.

  The axis is Auto (not jax's Explicit default): XLA then propagates the batch
  sharding and inserts the reductions itself, and the model code needs no
  sharding annotations.
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices)


def traced_in_mesh(fn, mesh: Mesh | None):
  """``fn`` traced with ``mesh`` as the abstract mesh (no mesh: ``fn`` itself). Code that
  must place work per device while tracing reads it: ddnn_jax/cpu/onednn.py's convolutions."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return wrapped


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def _replicate_leaf(x: Any, sharding: NamedSharding) -> jax.Array:
  if jax.process_count() == 1:
    x = jax.device_put(x, sharding)
  else:
    # Every process holds the same full value and places it on its own devices
    # (a global shape equal to the local one means "replicated").
    x = np.asarray(x)
    x = jax.make_array_from_process_local_data(sharding, x, x.shape)
  # device_put may alias the source buffer (jax 0.10 ignores may_alias=False for
  # multi-device shardings); the train step donates the state, which would then
  # free the caller's arrays. A copy on the devices keeps them apart.
  return jnp.copy(x)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """New arrays with every leaf (same value on all processes) on all mesh devices."""
  sharding = replicated_sharding(mesh)
  return jax.tree.map(lambda x: _replicate_leaf(x, sharding), tree)


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays sharded over 'data', built from this process's slice of the batch.

  Every process passes the same number of examples; the global batch is
  ``len(local) * jax.process_count()`` and must divide evenly over the mesh.
  """
  sharding = batch_sharding(mesh)
  num_local = len(mesh.local_devices)
  for key, value in local_batch.items():
    if np.shape(value)[0] % num_local:
      raise ValueError(f'batch[{key!r}] has {np.shape(value)[0]} local examples, not a '
                       f'multiple of the {num_local} local devices of the mesh')
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def is_main_process() -> bool:
  """Process 0 writes logs, metrics and reports (checkpoints are written by all)."""
  return jax.process_index() == 0


def _fetch_leaf(x: Any) -> Any:
  if not isinstance(x, jax.Array):
    return x
  if x.is_fully_addressable:
    return np.asarray(x)
  if x.sharding.is_fully_replicated:
    return np.asarray(x.addressable_data(0))  # Every process already holds it all.
  # Sharded across processes: a collective, so every process must call fetch.
  return multihost_utils.process_allgather(x, tiled=True)


def fetch(tree: Any) -> Any:
  """Host numpy copies of a tree of (global) arrays, e.g. metrics or the state.

  Replicated arrays are read locally. An array sharded across processes is
  all-gathered, which every process must then take part in.
  """
  return jax.tree.map(_fetch_leaf, tree)
