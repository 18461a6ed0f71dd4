"""XLA CPU settings that make training faster here, applied by the command-line tools.

Measured in ``bench/README.md`` (ResNet-56 EKD step, 2 cores): XLA's YNNPACK fusion of
elementwise and reduce ops (otherwise XLA recomputes each block's BatchNorm/ReLU/residual
chain from the first block of its stage inside the transposes of every weight gradient,
quadratic in depth), the batch split over CPU devices (XLA keeps about 1.25 of 2 cores
busy with one device): one per core where oneDNN convolves (ddnn_jax/onednn.py), two per
core where XLA does (each was the faster there), and tcmalloc
(glibc maps and faults in the step's temporary buffer afresh at every step). Results
change only by float32 rounding (bench/README.md has the numbers).

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
# Measured on 2 cores (ResNet-20 EKD, bench/README.md): with XLA's convolutions 4 devices
# beat 1, 2 and 8; with oneDNN's, 2 beat 4 (553 vs 510 img/s).
DEVICES_PER_CORE = {'xla': 2, 'onednn': 1}


def enabled() -> bool:
  return os.environ.get('DDNN_JAX_CPU_DEFAULTS', '1') != '0'


def available_cores() -> int:
  """The cores this process may run on (its affinity mask, else the machine's count)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def devices_per_core() -> int:
  """Training devices per core: by who convolves, oneDNN (installed, with a compiler, and
  not switched off) or XLA."""
  from ddnn_jax import onednn  # pylint: disable=g-import-not-at-top  (imports jax)
  return DEVICES_PER_CORE['onednn' if onednn.expected() else 'xla']


def training_devices(batch_size: int | None = None, processes: int = 1,
                     per_core: int | None = None) -> int:
  """CPU devices per process for training: ``per_core`` (``devices_per_core()``) per core,
  or one per core, or one, the first that divides the global ``batch_size`` over all
  ``processes``."""
  cores = available_cores()
  per_core = devices_per_core() if per_core is None else per_core
  for devices in (per_core * cores, cores):
    if not isinstance(batch_size, int) or batch_size % (devices * processes) == 0:
      return devices
  return 1


def apply(training: bool = False, batch_size: int | None = None, processes: int = 1) -> None:
  """Sets the XLA CPU flags and, for ``training``, the CPU device count
  (``training_devices``)."""
  if not enabled():
    return
  flags = os.environ.get('XLA_FLAGS', '')
  if 'ynn_fusion_type' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {YNN_FUSION}'.strip()
  if training and 'host_platform_device_count' not in flags:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.config.jax_num_cpu_devices < 0:
      jax.config.update('jax_num_cpu_devices', training_devices(batch_size, processes))


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
