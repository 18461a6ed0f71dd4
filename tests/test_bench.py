"""The benchmarks that CI runs at smoke size: they run and print measured figures."""

import os
import re
import subprocess
import sys

import pytest

from jobs import REPO, child_env


@pytest.mark.slow
def test_accelerator_check_runs_at_tiny_sizes():
  env = child_env(devices=4)
  env['PYTHON'] = sys.executable
  result = subprocess.run([str(REPO / 'bench' / 'accelerator_check.sh'), '--tiny'], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  figures = dict(line.split(': ', 1) for line in result.stdout.splitlines() if ': ' in line)
  assert figures['devices'].startswith('4 x cpu')
  for net in ('resnet50_ekd_table2', 'resnet20_ekd_default_group'):
    for name in ('compile_s', 'img_per_s', 'step_ms', 'peak_mib_per_device'):
      assert float(figures[f'{net} {name}']) > 0, (net, name)
    # img/s and step time are the same measurement: batch / step.
    batch = 8 if net.startswith('resnet50') else 16
    assert float(figures[f'{net} img_per_s']) == pytest.approx(
        batch / float(figures[f'{net} step_ms']) * 1e3, rel=0.01)
  assert re.match(r'[0-9.e+-]+ \(equal within 1e-4\)',
                  figures['sharded_vs_one_device_max_rel_diff'])
  assert result.stdout.splitlines()[-1].startswith('summary: 4 cpu devices; ResNet-50 EKD ')
  assert os.access(REPO / 'bench' / 'accelerator_check.sh', os.X_OK)
