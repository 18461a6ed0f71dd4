"""Test-session setup: 8 virtual CPU devices so sharding is exercised without accelerators.

XLA reads the flag once, when jax first initialises its backends, so it is set here,
before any test module imports jax.
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0').strip()


import pytest  # noqa: E402

FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


@pytest.fixture(scope='session')
def fashion_mnist_dir(tmp_path_factory):
  """Debian's real Fashion-MNIST, prepared once per session into a tfds data_dir."""
  if not os.path.isdir(FASHION_MNIST):
    pytest.skip('apt-get install dataset-fashion-mnist (.ci/run does)')
  from ddnn_jax import data  # pylint: disable=g-import-not-at-top
  return data.ensure_prepared('fashion_mnist', str(tmp_path_factory.mktemp('tfds')),
                              FASHION_MNIST)
