"""XLA CPU settings that make training faster here, applied by the command-line tools.

Measured in ``docs/performance-notes.md`` (ResNet-56 EKD step, 2 cores): XLA's YNNPACK fusion of
elementwise and reduce ops (otherwise XLA recomputes each block's BatchNorm/ReLU/residual
chain from the first block of its stage inside the transposes of every weight gradient,
quadratic in depth), the batch split over CPU devices (XLA keeps about 1.25 of 2 cores
busy with one device; ``device_count``): one per core where oneDNN convolves
(ddnn_jax/cpu/onednn.py), two per core where XLA does (each was the faster there), and
tcmalloc (glibc maps and faults in the step's temporary buffer afresh at every step). Results
change only by float32 rounding (docs/performance-notes.md has the numbers).

``DDNN_JAX_CPU_DEFAULTS=0`` turns all of it off. Settings a user gave (``XLA_FLAGS``,
``LD_PRELOAD``, ``jax_num_cpu_devices``) are kept. Everything here must run before jax
starts its backends; it has no effect on GPU or TPU computations.
"""

from __future__ import annotations

import os
import sys

YNN_FUSION = '--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce'
TCMALLOC_PATHS = ('/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4',
                  '/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4',
                  '/usr/lib64/libtcmalloc_minimal.so.4')


def enabled() -> bool:
  return os.environ.get('DDNN_JAX_CPU_DEFAULTS', '1') != '0'


def available_cores() -> int:
  """The cores this process may run on (its affinity mask, else the machine's count)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def apply() -> None:
  """Sets the XLA CPU flags (training also sets its device count:
  ``device_count.apply_for_training``)."""
  if not enabled():
    return
  flags = os.environ.get('XLA_FLAGS', '')
  if 'ynn_fusion_type' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {YNN_FUSION}'.strip()


def reexec_with_tcmalloc() -> None:
  """Restarts this process (same pid, argv and environment) with tcmalloc preloaded, if
  the library is installed (Debian: libtcmalloc-minimal4) and nothing is preloaded yet."""
  if not enabled() or os.environ.get('LD_PRELOAD') or os.environ.get('DDNN_JAX_REEXEC'):
    return
  library = next((path for path in TCMALLOC_PATHS if os.path.exists(path)), None)
  if library is None:
    return
  env = {**os.environ, 'LD_PRELOAD': library, 'DDNN_JAX_REEXEC': '1'}
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
