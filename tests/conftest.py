"""Test-session setup: 8 virtual CPU devices so sharding is exercised without accelerators.

XLA reads the flag once, when jax first initialises its backends, so it is set here,
before any test module imports jax.
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0').strip()
