"""Runs that go wrong: divergence, preemption, a busy or stale workdir, a failing disk."""

import json
import os
import pathlib
import signal
import time

import chex
import jax
import numpy as np
import pytest

from ddnn_jax.training import checkpoints
from jobs import TINY, assert_one_line_error, checkpoint_steps, restore_state, run_main

pytestmark = pytest.mark.slow  # Every test here trains in subprocesses.


def data_args(fashion_mnist_dir, epochs):
  return [f'--config.data.data_dir={fashion_mnist_dir}', f'--config.train.num_epochs={epochs}',
          *TINY]  # 16 steps per epoch, a train log line every 4.


def wait_for_train_step(workdir, step, procs, timeout=300):
  """Blocks until metrics.jsonl logs a train step >= ``step`` (the run is mid-flight)."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
    if path.exists():
      logged = [json.loads(line) for line in path.read_text().splitlines() if line]
      if any('train/loss' in line and line['step'] >= step for line in logged):
        return
    time.sleep(0.02)
  raise TimeoutError(f'no train step {step} in {path}')


def test_nan_run_exits_3_and_keeps_only_finite_checkpoints(tmp_path, fashion_mnist_dir):
  workdir = tmp_path / 'run'
  result = run_main(workdir, *data_args(fashion_mnist_dir, 2), '--config.optim.learning_rate=1e6',
                    '--config.train.checkpoint_every_steps=2')
  assert result.returncode == 3, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: diverged by step '), last
  assert 'non-finite loss' in last and 'ce/3-3-3' in last and 'depths' in last, last
  saved = checkpoint_steps(workdir)
  assert saved and saved[-1] < 32, saved  # It stopped long before the end ...
  assert f'the last good checkpoint is step {saved[-1]} in {workdir}' in last, last
  # ... and every checkpoint it left, the latest included, holds a finite state.
  for step in saved:
    state = restore_state(workdir, step)
    assert jax.tree.leaves(state), step
    chex.assert_tree_all_finite(state)
  # The log shows the divergence: a NaN loss at the step that stopped the run.
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert not np.isfinite(lines[-1]['train/loss'])


def test_resume_after_divergence_with_a_lower_learning_rate(tmp_path, fashion_mnist_dir):
  workdir = tmp_path / 'run'
  first = run_main(workdir, *data_args(fashion_mnist_dir, 1))
  assert first.returncode == 0, first.stderr[-3000:]
  assert checkpoint_steps(workdir) == [16]
  # More epochs at an absurd learning rate: diverges, saves nothing new.
  diverged = run_main(workdir, *data_args(fashion_mnist_dir, 2), '--config.optim.learning_rate=1e6')
  assert diverged.returncode == 3, diverged.stderr[-3000:]
  assert 'the last good checkpoint is step 16' in diverged.stderr.strip().splitlines()[-1]
  assert checkpoint_steps(workdir) == [16]
  # The learning rate and the epochs may change on resume: it continues from step 16.
  resumed = run_main(workdir, *data_args(fashion_mnist_dir, 2), '--config.optim.learning_rate=0.05')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from checkpoint at step 16' in resumed.stdout
  assert checkpoint_steps(workdir)[-1] == 32
  chex.assert_tree_all_finite(restore_state(workdir, 32))


def _sigterm_then_resume(tmp_path, args, procs_args, devices, signal_to=(0,)):
  """Reference run vs a run stopped by SIGTERM mid-epoch and restarted: final states."""
  def start(workdir):
    return [run_main(workdir, *args, *extra, wait=False, devices=devices) for extra in procs_args]

  reference = start(tmp_path / 'reference')
  outputs = [p.communicate(timeout=600) for p in reference]
  for p, (_, err) in zip(reference, outputs, strict=True):
    assert p.returncode == 0, err[-3000:]

  workdir = tmp_path / 'stopped'
  procs = start(workdir)
  wait_for_train_step(workdir, 20, procs)  # Mid-epoch 2 (16 steps per epoch).
  for i in signal_to:
    procs[i].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs, strict=True):
    assert p.returncode == 75, (p.returncode, err[-3000:])
  stopped = outputs[0][1].strip().splitlines()[-1]
  assert stopped.startswith('stopped by SIGTERM after step '), stopped
  step = int(stopped.split('after step ')[1].split(';')[0])
  assert 20 <= step < 64 and step % 16, step  # Mid-epoch: no epoch checkpoint there.
  assert checkpoint_steps(workdir)[-1] == step  # Saved at the step it reached.
  if len(procs) > 1:  # Every process stopped at the same step.
    for _, err in outputs[1:]:
      assert f'after step {step};' in err.strip().splitlines()[-1], err[-1000:]

  procs = start(workdir)  # The same command again continues.
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs, strict=True):
    assert p.returncode == 0, err[-3000:]
  assert f'resumed from checkpoint at step {step}' in outputs[0][0]
  # Bitwise: params, optimizer state, every depth's BN statistics, the step; results.
  chex.assert_trees_all_equal(restore_state(workdir, 64), restore_state(tmp_path / 'reference', 64))
  assert (workdir / 'results.csv').read_text() == (
      tmp_path / 'reference' / 'results.csv').read_text()


def test_sigterm_saves_the_step_reached_and_resumes_bitwise(tmp_path, fashion_mnist_dir):
  _sigterm_then_resume(tmp_path, [*data_args(fashion_mnist_dir, 4),
                                  '--config.train.checkpoint_every_steps=1000'],
                       procs_args=[[]], devices=None)


def test_sigterm_on_two_processes_stops_both_at_one_step(tmp_path, fashion_mnist_dir):
  import portpicker  # pylint: disable=g-import-not-at-top
  port = portpicker.pick_unused_port()
  procs_args = [[f'--coordinator_address=localhost:{port}', '--num_processes=2',
                 f'--process_id={i}'] for i in range(2)]
  # Only process 0 gets the signal; process 1 learns of it through the per-step check.
  _sigterm_then_resume(tmp_path, [*data_args(fashion_mnist_dir, 4),
                                  '--config.train.checkpoint_every_steps=1000'],
                       procs_args=procs_args, devices=2)


def test_a_second_run_on_a_live_workdir_is_refused_and_a_stale_lock_taken_over(
    tmp_path, fashion_mnist_dir):
  workdir = tmp_path / 'run'
  args = data_args(fashion_mnist_dir, 50)
  first = run_main(workdir, *args, wait=False)
  wait_for_train_step(workdir, 4, [first])
  second = run_main(workdir, *args)
  assert_one_line_error(second, f'workdir {workdir} is in use by a live run',
                        f'pid {first.pid} on ')
  assert first.poll() is None  # The refused run touched nothing of the live one.
  # A run that dies without cleaning up (kill -9) leaves its lock file behind ...
  first.send_signal(signal.SIGKILL)
  first.communicate()
  assert f'pid {first.pid} on ' in (workdir / '.lock').read_text()
  # ... which the next run takes over, saying so, and then trains.
  third = run_main(workdir, *data_args(fashion_mnist_dir, 1))
  assert third.returncode == 0, third.stderr[-3000:]
  assert f'warning: taking over the lock of workdir {workdir} left by a run that is no longer ' \
         f'running (pid {first.pid} on ' in third.stderr
  assert (workdir / '.lock').read_text() == ''  # A clean exit leaves no owner behind.


def test_a_failing_checkpoint_write_ends_the_run_and_keeps_earlier_ones(
    tmp_path, fashion_mnist_dir):
  workdir = tmp_path / 'run'
  assert run_main(workdir, *data_args(fashion_mnist_dir, 1)).returncode == 0
  assert checkpoint_steps(workdir) == [16]
  # Files may not grow past 40 kB: logs still fit, the next checkpoint does not
  # (as on a full disk, the write fails with an OS error).
  limit_kb = 40
  largest = max(f.stat().st_size for f in (workdir / 'checkpoints' / '16').rglob('*')
                if f.is_file())
  assert largest > limit_kb * 1024, largest
  result = run_main(workdir, *data_args(fashion_mnist_dir, 2), file_size_kb=limit_kb)
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert errors == [f'error: cannot write checkpoint 32 to {workdir}/checkpoints (File too '
                    "large [os_error_code='27']); earlier checkpoints are intact (latest: 16)"]
  assert checkpoint_steps(workdir) == [16]
  _, params, batch_stats = checkpoints.restore_variables(workdir, 'latest')
  chex.assert_tree_all_finite((params, batch_stats))
  assert os.listdir(workdir / 'checkpoints' / '16')
  # With room again, the same command finishes the run from step 16.
  again = run_main(workdir, *data_args(fashion_mnist_dir, 2))
  assert again.returncode == 0, again.stderr[-3000:]
  assert checkpoint_steps(workdir) == [16, 32]
