"""How many CPU devices training splits its batch over, set before jax starts its backends.

XLA keeps about 1.25 of 2 cores busy with one device, so training runs on several CPU
devices: one per core where oneDNN convolves (``onednn``), two per core where XLA does
(each was the faster there; docs/performance-notes.md). ``DDNN_JAX_CPU_DEFAULTS=0`` keeps one device,
and a device count the user gave (``XLA_FLAGS``, ``jax_num_cpu_devices``) is kept. Above
``onednn`` (which it asks who convolves) and ``defaults`` (the flags and the cores).
"""

from __future__ import annotations

import os

from ddnn_jax.cpu import defaults

# Measured on 2 cores (ResNet-20 EKD, docs/performance-notes.md): with XLA's convolutions 4 devices
# beat 1, 2 and 8; with oneDNN's, 2 beat 4 (553 vs 510 img/s).
DEVICES_PER_CORE = {'xla': 2, 'onednn': 1}


def devices_per_core() -> int:
  """Training devices per core: by who convolves, oneDNN (installed, with a compiler, and
  not switched off) or XLA."""
  from ddnn_jax.cpu import onednn  # pylint: disable=g-import-not-at-top  (imports jax)
  return DEVICES_PER_CORE['onednn' if onednn.expected() else 'xla']


def training_devices(batch_size: int | None = None, processes: int = 1,
                     per_core: int | None = None) -> int:
  """CPU devices per process for training: ``per_core`` (``devices_per_core()``) per core,
  or one per core, or one, the first that divides the global ``batch_size`` over all
  ``processes``."""
  cores = defaults.available_cores()
  per_core = devices_per_core() if per_core is None else per_core
  for devices in (per_core * cores, cores):
    if not isinstance(batch_size, int) or batch_size % (devices * processes) == 0:
      return devices
  return 1


def apply_for_training(batch_size: int | None = None, processes: int = 1) -> None:
  """``defaults.apply``'s XLA CPU flags and the CPU device count (``training_devices``)."""
  if not defaults.enabled():
    return
  given = os.environ.get('XLA_FLAGS', '')  # Read before apply adds its flag.
  defaults.apply()
  if 'host_platform_device_count' not in given:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.config.jax_num_cpu_devices < 0:
      jax.config.update('jax_num_cpu_devices', training_devices(batch_size, processes))
