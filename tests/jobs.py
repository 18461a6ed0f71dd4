"""Running the main job as a user does, and reading back what it wrote (shared by tests)."""

import os
import pathlib
import subprocess
import sys

import jax
import orbax.checkpoint as ocp

REPO = pathlib.Path(__file__).resolve().parents[1]
# Images per split of conftest's small_fashion_mnist_dir (the first ones of the real data).
SMALL_FASHION_MNIST = {'train': 4096, 'test': 1000}
TINY = ['--config.model.width=4', '--config.data.train_subset=512',
        '--config.data.eval_subset=256', '--config.train.batch_size=32',
        '--config.train.eval_batch_size=128', '--config.train.log_every_steps=4']


def child_env(devices=None, optimized=False, extra_env=None):
  """The test session's environment for a child process; ``devices`` virtual CPU devices
  instead of 8; ``optimized``: XLA's usual optimisation (tests compile tiny nets at -O0);
  ``extra_env``: more variables."""
  if not devices and not optimized:
    return {**os.environ, **extra_env} if extra_env else None
  flags = os.environ.get('XLA_FLAGS', '').split()
  if devices:
    flags = [f for f in flags if not f.startswith('--xla_force_host_platform_device_count')]
    flags.append(f'--xla_force_host_platform_device_count={devices}')
  if optimized:
    flags = [f for f in flags if not f.startswith('--xla_backend_optimization_level')]
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ' '.join(flags), **(extra_env or {})}


def run_module(module, *args, timeout=600, **env_options):
  """``python -m ddnn_jax.MODULE ARGS`` from the repository root, output captured."""
  return subprocess.run([sys.executable, '-m', f'ddnn_jax.{module}', *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env=child_env(**env_options))


def run_main(workdir, *args, wait=True, timeout=600, devices=None, file_size_kb=None,
             optimized=False):
  """``python -m ddnn_jax.main`` (default config unless --config= is given); with
  ``devices``, on that many virtual CPU devices instead of the test session's 8; with
  ``file_size_kb``, unable to write larger files (as on a full disk)."""
  config = [] if any(a.startswith('--config=') for a in args) else ['--config=configs/default.py']
  cmd = [sys.executable, '-m', 'ddnn_jax.main', *config, f'--workdir={workdir}', *args]
  if file_size_kb:
    cmd = ['bash', '-c', f'ulimit -f {int(file_size_kb)} && exec "$@"', 'bash', *cmd]
  env = child_env(devices, optimized)
  if not wait:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(result, *fragments, code=2):
  """Exit ``code`` and exactly one ``error:`` line holding every fragment, no traceback."""
  assert result.returncode == code, (result.returncode, result.stderr[-3000:])
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def checkpoint_steps(workdir):
  root = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in root.glob('*') if p.name.isdigit()) if root.exists() else []


def restore_state(workdir, step):
  """The saved train state on this process's first device, whatever devices saved it."""
  path = pathlib.Path(workdir) / 'checkpoints' / str(step) / 'state'
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.metadata(path).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          saved)
    return checkpointer.restore(path, target)
