"""Tests for the launch scripts.

In --dry-run mode the scripts print commands instead of running them. Here
`gcloud` and `ssh` are stubs that fail and leave a mark, so a dry run that
calls them is caught.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import signal
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')
TPU = os.path.join(LAUNCH, 'tpu_vm.sh')
GPU = os.path.join(LAUNCH, 'gpu_multinode.sh')
SLURM = os.path.join(LAUNCH, 'slurm_gpu.sbatch')

TPU_BASE = ['--name', 'ddnn-test', '--zone', 'us-central2-b', '--project', 'my-proj']


def _write_exe(path, text: str) -> None:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def env(tmp_path):
  """Environment with failing gcloud/ssh stubs first on PATH."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for tool in ('gcloud', 'ssh', 'scp'):
    _write_exe(bin_dir / tool, f'#!/bin/sh\ntouch "{tmp_path}/called-{tool}"\nexit 99\n')
  return {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'TMPDIR': str(tmp_path)}


def _run(script: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
  return subprocess.run([script, *args], env=env, capture_output=True, text=True,
                        timeout=30, check=False)


def _dry_run(script: str, args: list[str], env: dict[str, str]) -> list[list[str]]:
  """Runs with --dry-run and returns each printed command as an argv."""
  proc = _run(script, ['--dry-run', *args], env)
  assert proc.returncode == 0, proc.stderr
  assert not glob.glob(os.path.join(env['TMPDIR'], 'called-*')), 'dry run called gcloud/ssh'
  return [shlex.split(line) for line in proc.stdout.splitlines()]


def _option(argv: list[str], name: str) -> str:
  values = [a.split('=', 1)[1] for a in argv if a.startswith(name + '=')]
  assert len(values) == 1, (name, argv)
  return values[0]


def _shell_words(command: str) -> list[str]:
  """Splits a shell command line into words, with ; && >> etc. as words too."""
  lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def _remote_argv(argv: list[str]) -> list[str]:
  """The remote shell command of a gcloud ssh line, split into words."""
  return _shell_words(_option(argv, '--command'))


def _main_argv(words: list[str]) -> list[str]:
  """The `python3 -m ddnn_jax.main ...` words, up to the redirection."""
  start = words.index('python3')
  end = words.index('>>', start)
  return words[start:end]


# --- tpu_vm.sh ------------------------------------------------------------------


def test_tpu_all(env):
  create, install, train = _dry_run(TPU, [
      'all', *TPU_BASE, '--accelerator-type', 'v3-32', '--spot',
      '--workdir', 'gs://bucket/run1', '--data-dir=gs://bucket/tfds',
      '--config.train.num_epochs=3', '--config.model.name', "it's a net", '--', '--extra=1'], env)

  assert create[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'ddnn-test']
  assert _option(create, '--accelerator-type') == 'v3-32'
  assert _option(create, '--version') == 'tpu-ubuntu2204-base'
  assert _option(create, '--zone') == 'us-central2-b'
  assert _option(create, '--project') == 'my-proj'
  assert '--spot' in create

  for line in (install, train):
    assert line[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'ddnn-test']
    assert '--worker=all' in line
    assert _option(line, '--zone') == 'us-central2-b'

  remote_install = _remote_argv(install)
  assert 'https://github.com/ddnn-jax/ddnn_jax.git' in remote_install
  assert 'jax[tpu]' in remote_install and '-e' in remote_install

  remote_train = _remote_argv(train)
  assert 'nohup' in remote_train
  assert _main_argv(remote_train) == [
      'python3', '-m', 'ddnn_jax.main', '--config=configs/imagenet_r50.py',
      '--workdir=gs://bucket/run1', '--distributed', '--config.data.data_dir=gs://bucket/tfds',
      '--config.train.num_epochs=3', "--config.model.name=it's a net", '--extra=1']
  assert '~/ddnn_jax_logs/train.log' in remote_train


def test_flags_are_spelled_with_underscores_and_hyphens_alike(env):
  """--data_dir is the spelling of every ddnn_jax tool; --data-dir stays accepted; what
  follows `--` and --config.* overrides are passed on untouched."""
  args = ['all', *TPU_BASE, '--workdir', 'gs://bucket/run1', '--config.model.name=a-b',
          '--', '--extra-flag=1']
  underscored = _dry_run(TPU, [*args[:1], '--accelerator_type', 'v3-32',
                               '--data_dir=gs://bucket/tfds', *args[1:]], env)
  hyphenated = _dry_run(TPU, [*args[:1], '--accelerator-type', 'v3-32',
                              '--data-dir=gs://bucket/tfds', *args[1:]], env)
  assert underscored == hyphenated
  assert any('--extra-flag=1' in ' '.join(line) for line in underscored)
  assert any('--config.model.name=a-b' in ' '.join(line) for line in underscored)


def test_tpu_install_from_git_branch(env):
  (install,) = _dry_run(
      TPU, ['install', *TPU_BASE, '--repo', 'https://example.com/me/fork.git', '--branch', 'dev'],
      env)
  remote = _remote_argv(install)
  clone = remote.index('clone')
  assert remote[clone:clone + 6] == [
      'clone', '--depth=1', '--branch', 'dev', 'https://example.com/me/fork.git', '~/ddnn_jax']


def test_tpu_install_copy_local(env, tmp_path):
  tar, scp, ssh = _dry_run(TPU, ['install', *TPU_BASE, '--copy-local'], env)
  tarball = str(tmp_path / 'ddnn_jax_src.tar.gz')
  assert tar[:3] == ['tar', '-czf', tarball] and ROOT in tar and '--exclude=.git' in tar
  assert not os.path.exists(tarball)  # printed, not run
  assert scp[:7] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tarball,
                     'ddnn-test:ddnn_jax_src.tar.gz']
  assert '--worker=all' in scp and '--worker=all' in ssh
  assert 'git' not in _remote_argv(ssh)


def test_tpu_prepare_data(env):
  (line,) = _dry_run(TPU, ['prepare-data', *TPU_BASE, '--data-dir', 'gs://b/tfds',
                           '--manual-dir', 'gs://b/manual'], env)
  assert '--worker=0' in line
  remote = _remote_argv(line)
  build = remote.index('tfds')
  assert remote[build:build + 6] == [
      'tfds', 'build', 'imagenet2012', '--data_dir=gs://b/tfds',
      '--manual_dir=gs://b/manual', '--file_format=array_record']


@pytest.mark.parametrize('extra, worker, log', [
    ([], '0', 'train'),
    (['--worker', 'all'], 'all', 'train'),
    (['--log=prepare-data', '--worker=2'], '2', 'prepare-data'),
])
def test_tpu_tail(env, extra, worker, log):
  (line,) = _dry_run(TPU, ['tail', *TPU_BASE, *extra], env)
  assert f'--worker={worker}' in line
  assert _remote_argv(line)[-1] == f'~/ddnn_jax_logs/{log}.log'


def test_tpu_stop_and_delete(env):
  (stop,) = _dry_run(TPU, ['stop', *TPU_BASE], env)
  assert '--worker=all' in stop
  remote = _remote_argv(stop)
  # SIGTERM to the trainer first (it saves and exits), the process group only later.
  term = remote.index('-TERM')
  assert remote[term - 1:term + 2] == ['kill', '-TERM', '$p']
  assert remote.index('sleep') > term and remote.index('--') > remote.index('sleep')
  (delete,) = _dry_run(TPU, ['delete', '--name', 'x'], env)
  assert delete == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'x']
  (delete,) = _dry_run(TPU, ['delete', '--name', 'x', '--yes'], env)
  assert delete[-1] == '--quiet'


@pytest.mark.parametrize('args, message', [
    (['create', *TPU_BASE, '--accelerator-type', 'v4-8', '--bogus'], "unknown option '--bogus'"),
    (['create', '--zone', 'z', '--accelerator-type', 'v4-8'], 'missing required option --name'),
    ([*TPU_BASE], 'missing SUBCOMMAND'),
    (['launch', *TPU_BASE], "unknown subcommand 'launch'"),
    (['create', *TPU_BASE], 'needs --accelerator_type'),
    (['train', *TPU_BASE], 'needs --workdir'),
    (['all', *TPU_BASE, '--accelerator-type', 'v4-8'], 'needs --workdir'),
    (['prepare-data', *TPU_BASE, '--data-dir', 'gs://b/d'], 'needs --manual_dir'),
    (['train', *TPU_BASE, '--workdir'], 'option --workdir needs a value'),
    (['create', *TPU_BASE, '--accelerator-type=v4-8', '--spot', '--preemptible'],
     'mutually exclusive'),
    (['tail', *TPU_BASE, '--log', 'eval'], '--log must be'),
])
def test_tpu_bad_arguments(env, args, message):
  proc = _run(TPU, [*args, '--dry-run'], env)
  assert proc.returncode == 2
  assert proc.stdout == ''
  assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr, proc.stderr


# --- gpu_multinode.sh ---------------------------------------------------------------


def test_gpu_dry_run(env):
  nodes = ['me@gpu01', 'gpu02', 'gpu03']
  lines = _dry_run(GPU, [
      '--nodes', ','.join(nodes), '--port', '2222', '--workdir', '/shared/w',
      '--data-dir', '/shared/tfds', '--remote-dir', '/shared/code dir', '--env', 'NCCL_DEBUG=WARN',
      '--config.train.num_epochs=3', '--', '--extra=1'], env)
  assert len(lines) == 3
  for i, (argv, node) in enumerate(zip(lines, nodes)):
    assert argv[0] == 'ssh' and argv[-2] == node
    remote = _shell_words(argv[-1])
    assert remote[:3] == ['cd', '/shared/code dir', '&&']
    # The process records its pid (exec keeps the shell's) so a stop can reach it.
    assert remote[3:5] == ['echo', '$$'] and remote[5] == '>'
    assert remote[6].startswith('/tmp/ddnn_jax-') and remote[6].endswith(f'-{i}.pid')
    assert remote[7:10] == ['&&', 'exec', 'env']
    main = remote[remote.index('python3'):]
    assert main[:5] == ['python3', '-m', 'ddnn_jax.main', '--config=configs/imagenet_r50.py',
                        '--workdir=/shared/w']
    assert '--config.data.data_dir=/shared/tfds' in main
    assert '--config.train.num_epochs=3' in main and '--extra=1' in main
    assert 'NCCL_DEBUG=WARN' in remote
    # user@ is for ssh; the coordinator is the bare first host.
    assert main[-3:] == ['--coordinator_address=gpu01:2222', '--num_processes=3',
                         f'--process_id={i}']


def test_gpu_coordinator_and_python(env):
  (argv,) = _dry_run(GPU, ['--nodes=n1', '--workdir=/w', '--coordinator=n1-ib',
                           '--python=/venv/bin/python'], env)
  remote = _shell_words(argv[-1])
  assert '/venv/bin/python' in remote
  assert remote[-3:] == ['--coordinator_address=n1-ib:12355', '--num_processes=1',
                         '--process_id=0']


def _local_ssh(bin_dir):
  """An ssh stub that runs the remote command here."""
  _write_exe(bin_dir / 'ssh', '#!/usr/bin/env bash\n'
             'while [[ $1 == -* ]]; do [[ $1 == -o ]] && shift; shift; done\n'
             'exec bash -c "$2"\n')


def test_gpu_runs_every_node_and_reports_failure(env, tmp_path):
  # ssh runs the remote command here; python3 fails on process 1.
  bin_dir = tmp_path / 'bin'
  _local_ssh(bin_dir)
  _write_exe(bin_dir / 'python3', '#!/usr/bin/env bash\n'
             'echo "ran $*"\n[[ $* == *process_id=1 ]] && exit 7\nexit 0\n')
  proc = _run(GPU, ['--nodes', 'a,b', '--workdir', str(tmp_path), '--remote-dir',
                    str(tmp_path)], env)
  assert proc.returncode == 1
  out = proc.stdout.splitlines()
  assert any(line.startswith('[0:a] ran -m ddnn_jax.main') and line.endswith('--process_id=0')
             for line in out), out
  assert any(line.startswith('[1:b] ran') for line in out), out
  assert 'node 1 (b) exited with status 7' in proc.stderr


# A trainer stub: reports its start, then on SIGTERM saves and exits 75, like ddnn_jax.main.
TRAINER = ('#!/usr/bin/env bash\n'
           'trap \'echo "saved after SIGTERM ($*)"; exit 75\' TERM\n'
           'echo started\n'
           'for _ in $(seq 300); do sleep 0.1; done\n'
           'exit 1\n')


def _wait_for(proc, text, lines):
  for line in proc.stdout:
    lines.append(line)
    if text in line:
      return
  raise AssertionError(f'{text!r} never printed: {lines}')


@pytest.mark.slow
def test_gpu_forwards_sigterm_to_every_node(env, tmp_path):
  bin_dir = tmp_path / 'bin'
  _local_ssh(bin_dir)
  _write_exe(bin_dir / 'python3', TRAINER)
  proc = subprocess.Popen([GPU, '--nodes', 'a,b', '--workdir', str(tmp_path), '--remote-dir',
                           str(tmp_path)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  lines = []
  _wait_for(proc, '[0:a] started', lines)
  if not any('[1:b] started' in line for line in lines):
    _wait_for(proc, '[1:b] started', lines)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=30)
  lines += out.splitlines()
  assert proc.returncode == 75, (proc.returncode, err)
  for node in ('[0:a]', '[1:b]'):
    assert any(line.startswith(f'{node} saved after SIGTERM') for line in lines), lines
  assert 'asking every node to save and stop' in err
  assert 'node 0 (a) saved a checkpoint and stopped' in err
  assert 'node 1 (b) saved a checkpoint and stopped' in err


@pytest.mark.parametrize('args, message', [
    (['--workdir', '/w'], 'missing required option --nodes'),
    (['--nodes', 'a,b'], 'missing required option --workdir'),
    (['--nodes', 'a,b', '--workdir', '/w', '--frob', '1'], "unknown option '--frob'"),
    (['--nodes', 'a,,b', '--workdir', '/w'], 'bad node name'),
    (['--nodes', 'a', '--workdir', '/w', '--port', '70000'], '--port must be'),
    (['--nodes', 'a', '--workdir', '/w', '--env', 'novalue'], '--env wants KEY=VALUE'),
    (['--nodes', 'a', '--workdir', '/w', 'stray'], "unexpected argument 'stray'"),
])
def test_gpu_bad_arguments(env, args, message):
  proc = _run(GPU, [*args, '--dry-run'], env)
  assert proc.returncode == 2
  assert proc.stdout == ''
  assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr, proc.stderr


# --- common --------------------------------------------------------------------------


@pytest.mark.parametrize('script', [TPU, GPU])
def test_help(env, script):
  proc = _run(script, ['--help'], env)
  assert proc.returncode == 0 and proc.stdout.startswith('Usage:')
  assert '--dry_run' in proc.stdout


@pytest.mark.slow
def test_slurm_sbatch_sets_process_ids(env, tmp_path):
  # srun stub: runs the task command once per task with its SLURM_PROCID.
  bin_dir = tmp_path / 'bin'
  _write_exe(bin_dir / 'scontrol', '#!/bin/sh\nprintf "gpu07\\ngpu08\\ngpu09\\n"\n')
  _write_exe(bin_dir / 'srun', '#!/usr/bin/env bash\n'
             'while [[ $1 == --* ]]; do shift; done\n'
             'for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@"; done\n')
  _write_exe(bin_dir / 'python3', '#!/bin/sh\necho "$*"\n')
  # 3 nodes x 2 GPUs: one process per GPU.
  slurm_env = {**env, 'SLURM_JOB_NODELIST': 'gpu[07-09]', 'SLURM_NNODES': '3',
               'SLURM_NTASKS': '6', 'WORKDIR': '/shared/w', 'DATA_DIR': '/shared/tfds'}
  proc = subprocess.run(['bash', SLURM, '--config.train.num_epochs=3'], env=slurm_env,
                        capture_output=True, text=True, timeout=30, check=False)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 6
  for i, line in enumerate(lines):
    assert line.split() == [
        '-m', 'ddnn_jax.main', '--config=configs/imagenet_r50.py', '--workdir=/shared/w',
        '--config.data.data_dir=/shared/tfds', '--config.train.num_epochs=3',
        '--coordinator_address=gpu07:12355', '--num_processes=6', f'--process_id={i}']


@pytest.mark.slow
def test_slurm_sbatch_forwards_sigterm_to_srun(env, tmp_path):
  bin_dir = tmp_path / 'bin'
  _write_exe(bin_dir / 'scontrol', '#!/bin/sh\necho gpu01\n')
  _write_exe(bin_dir / 'srun', TRAINER)  # srun passes the signal on to its tasks.
  slurm_env = {**env, 'SLURM_JOB_NODELIST': 'gpu01', 'SLURM_NNODES': '1', 'SLURM_NTASKS': '1',
               'WORKDIR': '/shared/w'}
  proc = subprocess.Popen(['bash', SLURM], env=slurm_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  _wait_for(proc, 'started', [])
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=30)
  assert proc.returncode == 75, (proc.returncode, err)
  assert 'saved after SIGTERM' in out
  # SLURM itself signals the tasks before the time limit.
  assert '#SBATCH --signal=TERM@300' in open(SLURM).read().splitlines()


def test_scripts_are_executable():
  for script in (TPU, GPU):
    assert os.access(script, os.X_OK), script


@pytest.mark.slow
@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck not installed')
def test_shellcheck_clean():
  scripts = sorted(glob.glob(os.path.join(LAUNCH, '*.sh')) +
                   glob.glob(os.path.join(LAUNCH, '*.sbatch')))
  assert len(scripts) >= 3
  proc = subprocess.run(['shellcheck', *scripts], capture_output=True, text=True,
                        timeout=60, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
