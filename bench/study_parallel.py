"""Runs per hour of a study on this machine: one run on every core, or one run per core.

  python bench/study_parallel.py [--config configs/fmnist20k.py] [--mode ekd] [--epochs 2]

Trains the same run (``python -m ddnn_jax.main``, fresh workdirs under a temporary
directory) twice: alone on all cores, then one copy per core at once, each pinned to its
core with ``taskset``. From each run's ``metrics.jsonl`` it takes the wall time of the
epochs after the first (steady state: no compile, no start-up) and the start-up time,
and projects a full run of the config's epochs. Prints both projections as runs per hour;
the better one is what ``python -m ddnn_jax.study --parallel`` should default to.
Nothing else may run meanwhile. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown CPU'


def start(workdir: str, args, cores: str | None) -> subprocess.Popen:
  cmd = [sys.executable, '-m', 'ddnn_jax.main', f'--config={args.config}',
         f'--workdir={workdir}', f'--config.mode={args.mode}',
         f'--config.train.num_epochs={args.epochs}', *args.overrides]
  if cores is not None:
    cmd = ['taskset', '-c', cores, *cmd]
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)


def timings(workdir: str, wall: float) -> dict[str, float]:
  """Seconds per epoch after the first, and the rest of the wall time (start-up, compile,
  the final test evaluation)."""
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    evals = [json.loads(line) for line in f if '"time/wall_s"' in line]
  walls = [e['time/wall_s'] for e in evals]
  per_epoch = (walls[-1] - walls[0]) / (len(walls) - 1)
  return {'per_epoch': per_epoch, 'overhead': wall - per_epoch * len(walls)}


def measure(args, root: str, slots: list[str | None]) -> list[dict[str, float]]:
  began = time.perf_counter()
  procs = [(start(os.path.join(root, f'run{i}'), args, cores), i) for i, cores in enumerate(slots)]
  for proc, _ in procs:
    _, err = proc.communicate()
    if proc.returncode:
      sys.exit(f'a run failed (exit {proc.returncode}):\n{err[-2000:]}')
  wall = time.perf_counter() - began
  return [timings(os.path.join(root, f'run{i}'), wall) for _, i in procs]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/fmnist20k.py')
  parser.add_argument('--mode', default='ekd')
  parser.add_argument('--epochs', type=int, default=3, help='epochs per measured run (>= 2)')
  parser.add_argument('--full_epochs', type=int, default=30, help='epochs of the projected run')
  parser.add_argument('overrides', nargs='*', help='--config.KEY=VALUE for every run')
  args = parser.parse_args()
  cores = sorted(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory() as root:
    alone = measure(args, os.path.join(root, 'alone'), [None])[0]
    per_core = measure(args, os.path.join(root, 'per_core'), [str(c) for c in cores])
  project = lambda t: t['overhead'] + args.full_epochs * t['per_epoch']  # noqa: E731
  alone_s = project(alone)
  per_core_s = max(project(t) for t in per_core)
  print(f'{cpu_model()}, {len(cores)} cores; {args.config} mode {args.mode}, '
        f'{args.epochs} epochs measured, {args.full_epochs} projected')
  print('| layout | s/epoch | start-up etc. (s) | projected run (min) | runs per hour |')
  print('|---|---|---|---|---|')
  print(f'| one run on {len(cores)} cores | {alone["per_epoch"]:.1f} | {alone["overhead"]:.0f} '
        f'| {alone_s / 60:.1f} | {3600 / alone_s:.2f} |')
  print(f'| {len(cores)} runs, one core each | '
        f'{max(t["per_epoch"] for t in per_core):.1f} | '
        f'{max(t["overhead"] for t in per_core):.0f} | {per_core_s / 60:.1f} | '
        f'{len(cores) * 3600 / per_core_s:.2f} |')


if __name__ == '__main__':
  main()
