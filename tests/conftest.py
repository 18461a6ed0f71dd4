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
  from ddnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.ensure_prepared('fashion_mnist', str(tmp_path_factory.mktemp('tfds')),
                                  FASHION_MNIST)


@pytest.fixture(scope='session')
def small_fashion_mnist_dir(tmp_path_factory):
  """The first images of each split of the real Fashion-MNIST (jobs.SMALL_FASHION_MNIST),
  prepared into a data_dir of their own: for runs whose tools read a whole split (a
  cascade's test split), so they need not read 10,000 images."""
  if not os.path.isdir(FASHION_MNIST):
    pytest.skip('apt-get install dataset-fashion-mnist (.ci/run does)')
  import gzip  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  from ddnn_jax.data import pipeline, preparation  # pylint: disable=g-import-not-at-top
  from fakes import write_idx  # pylint: disable=g-import-not-at-top
  from jobs import SMALL_FASHION_MNIST  # pylint: disable=g-import-not-at-top
  source = tmp_path_factory.mktemp('fashion_mnist_small')
  for split, stems in preparation.FASHION_MNIST_FILES.items():
    for stem in stems:
      with gzip.open(pathlib.Path(FASHION_MNIST) / f'{stem}.gz', 'rb') as f:
        full = preparation.parse_idx(f.read(), stem)
      write_idx(source / f'{stem}.gz', full[:SMALL_FASHION_MNIST[split]])
  return pipeline.ensure_prepared('fashion_mnist', str(tmp_path_factory.mktemp('tfds_small')),
                                  str(source))
