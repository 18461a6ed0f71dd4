"""python -m ddnn_jax.study: the plan of runs, refusals, and a study stopped and continued."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from jobs import REPO, TINY, assert_one_line_error, checkpoint_steps, child_env, run_module


def _plan(*args):
  result = run_module('study', '--config', 'configs/cifar10.py:r56_r44_r32', '--root', '/runs',
                      '--dry-run', *args)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def _flag(argv, name):
  values = [a.split('=', 1)[1] for a in argv if a.startswith(name + '=')]
  assert len(values) == 1, (name, argv)
  return values[0]


def test_plan_runs_seed_by_seed_each_scheme_and_depth():
  runs = _plan('--seeds', '2', '--schemes', 'individual,ddnn,ekd:3', '--config.model.width=8',
               '--', '--extra=1')
  workdirs = [_flag(argv, '--workdir') for argv in runs]
  assert len(runs) == 2 * (3 + 1 + 1) + 1  # Per seed: 3 depths alone, DDNN, EKD; EKD seed 2.
  assert workdirs[:5] == ['/runs/individual-9-9-9-seed0', '/runs/individual-7-7-7-seed0',
                          '/runs/individual-5-5-5-seed0', '/runs/ddnn-seed0', '/runs/ekd-seed0']
  assert workdirs[5:10] == [w.replace('seed0', 'seed1') for w in workdirs[:5]]
  assert workdirs[10:] == ['/runs/ekd-seed2']
  for argv, workdir in zip(runs, workdirs, strict=True):
    assert argv[1:4] == ['-m', 'ddnn_jax.main', '--config=configs/cifar10.py:r56_r44_r32']
    assert argv[-2:] == ['--config.model.width=8', '--extra=1']
    assert _flag(argv, '--config.seed') == workdir[-1]
  assert _flag(runs[0], '--config.model.subnets') == '()'
  assert _flag(runs[1], '--config.model.subnets') == '((7, 7, 7),)'
  assert _flag(runs[3], '--config.mode') == 'ddnn' and _flag(runs[4], '--config.mode') == 'ekd'


@pytest.mark.parametrize('args, message', [
    (['--schemes', 'ekd,nope'], "--schemes: unknown scheme 'nope'"),
    (['--schemes', 'ekd:0'], "--schemes: 'ekd:0' needs a seed count >= 1"),
    (['--schemes', 'ekd,ekd:2'], "--schemes: 'ekd' is given twice"),
    (['--seeds', '0'], "argument --seeds: an integer >= 1, not '0'"),
    (['--nice', '30'], '--nice 30: must be in 0..19'),
    (['--config.no_such=1'], 'unknown config field'),
    (['--config.loss.w=-1'], 'loss.w=-1: must be a finite number >= 0'),
    (['--status', '--dry-run'], 'not allowed with argument'),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
  root = tmp_path / 'root'
  result = run_module('study', '--config', 'configs/default.py', '--root', root, *args)
  assert_one_line_error(result, message)
  assert not root.exists()


def test_schemes_without_subnets_are_refused(tmp_path):
  result = run_module('study', '--config', 'configs/default.py', '--root', tmp_path / 'r',
                      '--schemes', 'ekd', "--config.model.subnets=()")
  assert_one_line_error(result, "'ekd' needs sub-nets")


STUDY = ['--config', 'configs/default.py', '--schemes', 'individual,ekd', '--seeds', '1',
         '--parallel', '1', *TINY, '--config.data.validation_examples=256',
         '--config.train.num_epochs=2']


def _study(root, *args, wait=True):
  cmd = [sys.executable, '-m', 'ddnn_jax.study', '--root', str(root), *STUDY, *args]
  env = child_env(devices=2)
  if not wait:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_a_study_stops_on_sigterm_and_the_same_command_continues_it(fashion_mnist_dir, tmp_path):
  root = tmp_path / 'study'
  data = f'--config.data.data_dir={fashion_mnist_dir}'
  proc = _study(root, data, wait=False)
  # Stop it while its second run (individual 2-2-2) trains.
  deadline = time.time() + 600
  log = root / 'logs' / 'individual-2-2-2-seed0.log'
  while time.time() < deadline and not (log.exists() and 'step/s' in log.read_text()):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 75, (out, err)
  assert 'study stopped (SIGTERM)' in out
  manifest = json.loads((root / 'study.json').read_text())
  assert manifest['runs']['individual-3-3-3-seed0']['status'] == 'finished'
  assert manifest['runs']['individual-2-2-2-seed0']['status'] == 'stopped'
  assert 'individual-1-1-1-seed0' not in manifest['runs']
  assert not (root / 'comparison').exists()

  status = _study(root, data, '--status')
  assert status.returncode == 0, status.stderr
  lines = {line.split(' | ')[0][2:]: line.split(' | ')[1] for line in status.stdout.splitlines()
           if line.startswith('| ') and 'seed' in line}
  assert lines == {'individual-3-3-3-seed0': 'finished', 'individual-2-2-2-seed0': 'stopped',
                   'individual-1-1-1-seed0': 'pending', 'ekd-seed0': 'pending'}

  again = _study(root, data)
  assert again.returncode == 0, again.stderr[-2000:]
  assert '[1/4] individual-3-3-3-seed0: finished, kept' in again.stdout
  assert 'resumed from checkpoint' in (root / 'logs' / 'individual-2-2-2-seed0.log').read_text()
  manifest = json.loads((root / 'study.json').read_text())
  assert {r['status'] for r in manifest['runs'].values()} == {'finished'}
  assert len(manifest['runs']) == 4
  table = (root / 'comparison' / 'comparison.md').read_text()
  assert '| individual (n=1) | ekd (n=1) |' in table
  assert len([line for line in table.splitlines() if line.startswith(('| 3-3-3', '| 2-2-2',
                                                                      '| 1-1-1'))]) >= 3
  # Nothing left to do: a third call only compares.
  third = _study(root, data)
  assert third.returncode == 0 and third.stdout.count('finished, kept') == 4
  assert os.path.getsize(root / 'comparison' / 'differences.csv') > 0


# --- records and the time available ---------------------------------------------------------

ONE_RUN = ['--config', 'configs/default.py', '--schemes', 'ekd', '--parallel', '1', *TINY,
           '--config.data.validation_examples=256']


def _one_run_study(root, record, data, *args, timeout=900):
  cmd = [sys.executable, '-m', 'ddnn_jax.study', '--root', str(root), '--record', str(record),
         *ONE_RUN, data, *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=child_env(devices=2))


def _fake_record(record, source, name, epochs, wall_seconds):
  """A copy of the record ``source`` as run ``name`` trained for ``epochs`` in
  ``wall_seconds``: what the estimator reads for runs of that budget."""
  target = record / 'runs' / name
  shutil.copytree(record / 'runs' / source, target)
  config = json.loads((target / 'config.json').read_text())
  config['train']['num_epochs'] = epochs
  config['seed'] = 9
  (target / 'config.json').write_text(json.dumps(config))
  meta = json.loads((target / 'record.json').read_text())
  meta.update(wall_seconds=wall_seconds, key=['elsewhere'])
  (target / 'record.json').write_text(json.dumps(meta))


@pytest.mark.slow
def test_records_finish_runs_and_fit_the_time_left(fashion_mnist_dir, tmp_path):
  data = f'--config.data.data_dir={fashion_mnist_dir}'
  root, record = tmp_path / 'study', tmp_path / 'record'
  first = _one_run_study(root, record, data, '--seeds', '1', '--config.train.num_epochs=1')
  assert first.returncode == 0, first.stderr[-3000:]
  run = record / 'runs' / 'ekd-seed0'
  assert sorted(p.name for p in run.iterdir()) == [
      'config.json', 'dataset.json', 'metrics.jsonl', 'record.json', 'results.csv', 'results.md']
  meta = json.loads((run / 'record.json').read_text())
  assert meta['command'][1:3] == ['-m', 'ddnn_jax.main'] and meta['wall_seconds'] > 0
  assert meta['machine']['packages']['jax'] and meta['machine']['cpu']
  assert sum(p.stat().st_size for p in run.iterdir()) < 200_000
  # The record reads as the workdir it came from.
  by_workdir = run_module('compare', root / 'ekd-seed0', '--out', tmp_path / 'w')
  by_record = run_module('compare', run, '--out', tmp_path / 'r')
  assert by_workdir.returncode == 0 and by_record.returncode == 0, by_record.stderr
  for name in ('comparison.md', 'comparison.csv', 'differences.csv'):
    assert (tmp_path / 'w' / name).read_text() == (tmp_path / 'r' / name).read_text()

  # With its workdir gone, the recorded run is finished; the root holds nothing of it.
  shutil.rmtree(root)
  again = _one_run_study(root, record, data, '--seeds', '1', '--config.train.num_epochs=1')
  assert again.returncode == 0, again.stderr[-3000:]
  assert '[1/1] ekd-seed0: finished, kept' in again.stdout
  assert not (root / 'ekd-seed0').exists()

  # A run whose budget took 3 hours before does not start in the one hour given.
  _fake_record(record, 'ekd-seed0', 'ekd-slow', 40, 3 * 3600)
  late = _one_run_study(root, record, data, '--seeds', '2', '--config.train.num_epochs=40',
                        '--hours', '1')
  assert late.returncode == 75, late.stderr[-3000:]
  assert 'ekd-seed0: needs ~180 min, 60 min left: not started' in late.stdout
  assert not (root / 'ekd-seed0' / 'checkpoints').exists()
  shutil.rmtree(record / 'runs' / 'ekd-slow')

  # One that took a second before starts, and the deadline stops it cleanly: exit 75, its
  # checkpoint kept for the next study, no record.
  _fake_record(record, 'ekd-seed0', 'ekd-quick', 400, 1)
  stopped = _one_run_study(root, record, data, '--seeds', '1', '--config.train.num_epochs=400',
                           '--hours', '0.02')
  assert stopped.returncode == 75, stopped.stderr[-3000:]
  assert 'study stopped (the deadline)' in stopped.stdout
  manifest = json.loads((root / 'study.json').read_text())
  assert manifest['runs']['ekd-seed0']['exit_code'] == 75
  assert checkpoint_steps(root / 'ekd-seed0')
  assert json.loads((run / 'record.json').read_text())['key'] == meta['key']  # Not replaced.
