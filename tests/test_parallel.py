"""Data parallelism: 8 devices, 1 device, 2 processes and no mesh train identically.

With 4 examples per device, BatchNorm statistics computed per device would be
far off the global batch's; agreement to 1e-5 shows that they, the loss and the
gradient are reduced over the global batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import portpicker
import pytest
from jax.sharding import PartitionSpec as P

import multiprocess_worker as worker
from ddnn_jax.core import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'multiprocess_worker.py')
RTOL, ATOL = 1e-5, 1e-6  # ATOL only matters for entries that are ~0.

# Launcher variables that would make a child join (or wait for) a cluster.
_CLUSTER_ENV = ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'SLURM_NTASKS', 'SLURM_PROCID',
                'OMPI_MCA_orte_hnp_uri', 'OMPI_COMM_WORLD_SIZE')


def _child_env(num_devices: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_ENV}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}')
  return env


def _host_state(state) -> dict:
  return parallel.fetch({'params': state.params, 'batch_stats': state.batch_stats})


def _diff(a, b) -> str:
  """Largest relative difference (entries with |b| > 1e-3) and largest absolute one."""
  x = np.concatenate([np.ravel(v) for v in jax.tree.leaves(a)]).astype(np.float64)
  y = np.concatenate([np.ravel(v) for v in jax.tree.leaves(b)]).astype(np.float64)
  big = np.abs(y) > 1e-3
  rel = np.max(np.abs(x - y)[big] / np.abs(y[big]))
  return f'rel {rel:.1e}, abs {np.max(np.abs(x - y)):.1e}'


@pytest.fixture(scope='module')
def reference():
  """The single-process 8-device run (each run compiles the step: ~10 s)."""
  assert jax.device_count() == 8, 'tests/conftest.py should force 8 CPU devices'
  mesh = parallel.create_mesh()
  losses, state, batch = worker.train(mesh)
  return mesh, losses, state, batch


def test_create_mesh():
  mesh = parallel.create_mesh()
  assert mesh.axis_names == ('data',) and mesh.shape['data'] == 8
  assert list(mesh.devices.flat) == jax.devices()
  assert parallel.create_mesh(jax.devices()[:1]).devices.size == 1


def test_data_parallel_matches_one_device_and_no_mesh(reference):
  mesh, losses8, state8, batch8 = reference
  losses1, state1, _ = worker.train(parallel.create_mesh(jax.devices()[:1]))
  losses0, state0, _ = worker.train(None)
  # (Each train() ran its jit_steps(max_traces=1) 3 times: one trace under sharding.)
  host8, host1, host0 = map(_host_state, (state8, state1, state0))
  print(f'\n8 vs 1 device: losses {_diff(losses8, losses1)}, state {_diff(host8, host1)}; '
        f'8 devices vs no mesh: losses {_diff(losses8, losses0)}, state {_diff(host8, host0)}')
  assert np.all(np.isfinite(losses8)) and losses8[-1] < losses8[0], losses8
  chex.assert_trees_all_close(losses8, losses1, losses0, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(host8, host1, host0, rtol=RTOL, atol=ATOL)

  # The step's output state stays replicated; the batch was split 4 per device.
  replicated = parallel.replicated_sharding(mesh)
  for leaf in jax.tree.leaves(state8):
    assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim), leaf.sharding
  image = batch8['image']
  assert image.sharding.spec == P('data') and image.shape == (worker.GLOBAL_BATCH, 8, 8, 3)
  assert {s.data.shape[0] for s in image.addressable_shards} == {worker.GLOBAL_BATCH // 8}


def test_replicate_and_fetch_round_trip():
  mesh = parallel.create_mesh()
  tree = {'w': np.arange(6.0).reshape(2, 3), 'step': np.int32(7)}
  placed = parallel.replicate(tree, mesh)
  assert all(x.sharding.is_fully_replicated and len(x.sharding.device_set) == 8
             for x in jax.tree.leaves(placed))
  chex.assert_trees_all_equal(parallel.fetch(placed), tree)
  # A copy: donating the replicated arrays leaves the source arrays alive.
  source = jax.device_put(np.ones(3))
  jax.jit(lambda x: x + 1, donate_argnums=0)(parallel.replicate(source, mesh))
  np.testing.assert_array_equal(source, np.ones(3))


def test_shard_batch_rejects_an_uneven_split():
  mesh = parallel.create_mesh()
  with pytest.raises(ValueError, match='not a multiple of the 8 local devices'):
    parallel.shard_batch({'image': np.zeros((12, 2), np.float32)}, mesh)


@pytest.mark.slow
def test_two_processes_match_one(reference, tmp_path):
  _, losses8, state8, _ = reference
  port = portpicker.pick_unused_port()
  out = tmp_path / 'result.npz'
  # Logs go to files, not pipes: a full pipe would stall one process mid-collective.
  logs = [tmp_path / f'process{i}.log' for i in range(2)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, 'w') as f:
      procs.append(subprocess.Popen(
          [sys.executable, WORKER, '--coordinator', f'localhost:{port}',
           '--num-processes', '2', '--process-id', str(i), '--out', str(out)],
          env=_child_env(4), stdout=f, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + 240
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:  # Timed out: don't leave a peer waiting forever.
        p.kill()
        p.wait()
  codes = [p.returncode for p in procs]
  assert codes == [0, 0], f'exit codes {codes}\n' + '\n\n'.join(
      f'process {i} output:\n{log.read_text()}' for i, log in enumerate(logs))

  result = np.load(out)
  assert int(result['device_count']) == 8 and int(result['local_device_count']) == 4
  host8 = _host_state(state8)
  expected = {'losses': losses8, 'params': worker.flat(host8['params']),
              'batch_stats': worker.flat(host8['batch_stats'])}
  got = {k: result[k] for k in expected}
  print('\n2 processes vs 1: ' + ', '.join(f'{k} {_diff(got[k], expected[k])}' for k in got))
  chex.assert_trees_all_close(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_initialize_distributed_is_a_no_op_on_one_machine():
  code = ('import jax; from ddnn_jax.core import parallel; '
          'parallel.initialize_distributed(); parallel.initialize_distributed(); '
          'assert not jax.distributed.is_initialized(); '
          'print(jax.process_count(), jax.device_count())')
  proc = subprocess.run([sys.executable, '-c', code], env=_child_env(2), capture_output=True,
                        text=True, timeout=60, check=False)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ['1', '2']
