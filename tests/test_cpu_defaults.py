"""The CPU defaults the command-line tools apply: set only what the user did not, and off
with DDNN_JAX_CPU_DEFAULTS=0. Each case runs in a fresh process (jax reads them at start)."""

import json
import os
import subprocess
import sys

import pytest

from ddnn_jax.cpu import defaults, device_count

# Each case spawns a fresh Python process.
pytestmark = pytest.mark.slow

PROBE = """
import json, os, sys
from ddnn_jax.cpu import defaults, device_count
defaults.reexec_with_tcmalloc()
if sys.argv[1] == 'train':
  device_count.apply_for_training(int(sys.argv[2]))
else:
  defaults.apply()
import jax
maps = open('/proc/self/maps').read()
print(json.dumps({'xla_flags': os.environ.get('XLA_FLAGS', ''), 'devices': jax.device_count(),
                  'pid': os.getpid(), 'tcmalloc': 'libtcmalloc' in maps}))
"""


def probe(mode='train', batch_size=128, **env):
  base = {k: v for k, v in os.environ.items()
          if k not in ('XLA_FLAGS', 'LD_PRELOAD', 'DDNN_JAX_CPU_DEFAULTS', 'DDNN_JAX_REEXEC')}
  result = subprocess.run([sys.executable, '-c', PROBE, mode, str(batch_size)],
                          capture_output=True, text=True,
                          env={**base, 'JAX_PLATFORMS': 'cpu', **env}, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


CORES = len(os.sched_getaffinity(0))


def test_training_gets_ynn_fusion_its_devices_per_core_and_tcmalloc():
  seen = probe('train')
  assert defaults.YNN_FUSION in seen['xla_flags'].split()
  assert seen['devices'] == device_count.devices_per_core() * CORES
  installed = any(os.path.exists(p) for p in defaults.TCMALLOC_PATHS)
  assert seen['tcmalloc'] == installed


@pytest.mark.parametrize('batch_size,processes,devices', [
    (128, 1, 2 * CORES), (2 * CORES + CORES, 1, CORES), (2 * CORES + 1, 1, 1),
    (4 * CORES, 2, 2 * CORES), (2 * CORES, 2, CORES)])
def test_training_devices_divide_the_global_batch(batch_size, processes, devices):
  assert device_count.training_devices(batch_size, processes, per_core=2) == devices


@pytest.mark.parametrize('onednn_setting,per_core', [('0', 2), (None, 1)])
def test_devices_per_core_follow_who_convolves(monkeypatch, onednn_setting, per_core):
  from ddnn_jax.cpu import onednn  # pylint: disable=g-import-not-at-top
  if onednn_setting is None:
    monkeypatch.delenv('DDNN_JAX_ONEDNN', raising=False)
    if not onednn.expected():
      pytest.skip('the onednn extra or a C++ compiler is missing here')
  else:
    monkeypatch.setenv('DDNN_JAX_ONEDNN', onednn_setting)
  assert device_count.devices_per_core() == per_core
  assert device_count.training_devices(128) == per_core * CORES


def test_other_tools_keep_one_device():
  seen = probe('eval')
  assert defaults.YNN_FUSION in seen['xla_flags'].split()
  assert seen['devices'] == 1


def test_the_users_settings_are_kept():
  seen = probe('train', XLA_FLAGS='--xla_cpu_experimental_ynn_fusion_type= '
                                  '--xla_force_host_platform_device_count=3')
  assert seen['xla_flags'].split() == ['--xla_cpu_experimental_ynn_fusion_type=',
                                       '--xla_force_host_platform_device_count=3']
  assert seen['devices'] == 3


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_switched_off(mode):
  seen = probe(mode, DDNN_JAX_CPU_DEFAULTS='0')
  assert seen == {**seen, 'xla_flags': '', 'devices': 1, 'tcmalloc': False}
