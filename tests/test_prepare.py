"""Tests for ddnn_jax.prepare on tiny generated archives (and real Debian data)."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddnn_jax import prepare
from ddnn_jax.data import preparation
from fakes import write_fake_cifar, write_fake_fashion_mnist, write_idx

DEBIAN_FASHION_MNIST = Path('/usr/share/datasets/fashion-mnist')


def read_split(name: str, split: str, data_dir: Path) -> list[dict]:
  source = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
  return [source[i] for i in range(len(source))]


def by_id(examples: list[dict]) -> list[dict]:
  """tfds shuffles records on disk; the cifar 'id' restores source order."""
  return sorted(examples, key=lambda ex: ex['id'])


# ---------------------------------------------------------------------- tests


def test_parse_idx_validates_header_and_size():
  image = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
  data = bytes([0, 0, 8, 3]) + np.asarray([1, 3, 4], '>u4').tobytes() + image.tobytes()
  np.testing.assert_array_equal(preparation.parse_idx(data, 'x'), image)
  with pytest.raises(preparation.PrepareError, match='not an idx file'):
    preparation.parse_idx(b'\x01' + data[1:], 'x')
  with pytest.raises(preparation.PrepareError, match='does not match'):
    preparation.parse_idx(data[:-1], 'x')


@pytest.mark.parametrize('suffix', ['.gz', ''])
def test_fashion_mnist_reads_back_like_stock(tmp_path, suffix):
  arrays = write_fake_fashion_mnist(tmp_path / 'src', suffix=suffix)
  data_dir = tmp_path / 'data'
  assert not preparation.is_prepared('fashion_mnist', str(data_dir))

  path = preparation.prepare('fashion_mnist', str(tmp_path / 'src'), str(data_dir))

  assert path == str(data_dir / 'fashion_mnist' / '3.0.1')
  assert preparation.is_prepared('fashion_mnist', str(data_dir))
  ours = tfds.builder('fashion_mnist', data_dir=str(data_dir)).info
  stock = tfds.builder('fashion_mnist').info
  assert ours.version == stock.version
  assert repr(ours.features) == repr(stock.features)
  assert ours.features['label'].names == stock.features['label'].names
  for split in ('train', 'test'):
    examples = read_split('fashion_mnist', split, data_dir)
    assert len(examples) == len(arrays[split])
    # Order on disk is tfds' shuffle: compare as a multiset via sorted bytes.
    got = sorted((ex['image'][..., 0].tobytes(), int(ex['label'])) for ex in examples)
    want = sorted((img.tobytes(), int(lbl))
                  for img, lbl in zip(arrays[split], arrays[f'{split}_labels']))
    assert got == want


@pytest.mark.parametrize('binary, archive', [(False, True), (True, True), (True, False)])
def test_cifar10_python_and_binary_layouts(tmp_path, binary, archive):
  arrays = write_fake_cifar(tmp_path / 'src', binary=binary, archive=archive)
  data_dir = tmp_path / 'data'

  preparation.prepare('cifar10', str(tmp_path / 'src'), str(data_dir))

  info = tfds.builder('cifar10', data_dir=str(data_dir)).info
  assert str(info.version) == '3.0.2'
  assert repr(info.features) == repr(tfds.builder('cifar10').info.features)
  assert info.features['label'].names == [f'c{i}' for i in range(10)]
  for split in ('train', 'test'):
    examples = by_id(read_split('cifar10', split, data_dir))
    assert [ex['id'] for ex in examples] == [
        f'{split}_{i:05d}'.encode() for i in range(len(arrays[split]))]
    np.testing.assert_array_equal(np.stack([ex['image'] for ex in examples]),
                                  arrays[split])
    np.testing.assert_array_equal([ex['label'] for ex in examples],
                                  arrays[f'{split}_labels'])


def test_cifar100_fine_and_coarse_labels(tmp_path):
  arrays = write_fake_cifar(tmp_path / 'src', 'cifar100', num_train=30, num_test=5)

  preparation.prepare('cifar100', str(tmp_path / 'src'), str(tmp_path / 'data'))

  info = tfds.builder('cifar100', data_dir=str(tmp_path / 'data')).info
  assert repr(info.features) == repr(tfds.builder('cifar100').info.features)
  assert info.features['coarse_label'].names[3] == 'k3'
  examples = by_id(read_split('cifar100', 'train', tmp_path / 'data'))
  np.testing.assert_array_equal([ex['label'] for ex in examples], arrays['train_labels'])
  np.testing.assert_array_equal([ex['coarse_label'] for ex in examples],
                                arrays['train_coarse'])


def test_prepare_twice_is_a_no_op(tmp_path):
  write_fake_fashion_mnist(tmp_path / 'src')
  first = preparation.prepare('fashion_mnist', str(tmp_path / 'src'), str(tmp_path / 'data'))
  stamp = os.stat(Path(first) / 'dataset_info.json').st_mtime_ns
  assert preparation.prepare('fashion_mnist', str(tmp_path / 'src'),
                         str(tmp_path / 'data')) == first
  assert os.stat(Path(first) / 'dataset_info.json').st_mtime_ns == stamp


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
  write_fake_fashion_mnist(tmp_path / 'src')
  data_dir = tmp_path / 'data'

  def broken_png(image):
    raise RuntimeError('disk full')
  monkeypatch.setattr(preparation, '_png', broken_png)
  with pytest.raises(RuntimeError, match='disk full'):
    preparation.prepare('fashion_mnist', str(tmp_path / 'src'), str(data_dir))

  assert list(data_dir.iterdir()) == []
  assert not preparation.is_prepared('fashion_mnist', str(data_dir))


def _small_fashion_images(folder: Path) -> None:
  write_fake_fashion_mnist(folder)
  write_idx(folder / 'train-images-idx3-ubyte.gz', np.zeros((20, 5, 5)))


@pytest.mark.parametrize('name, make, error', [
    ('fashion_mnist', lambda d: None, 'neither train-images-idx3-ubyte.gz'),
    ('fashion_mnist', _small_fashion_images, 'expected 28x28'),
    ('cifar10', lambda d: None, 'cifar-10-python.tar.gz'),
    ('cifar10', lambda d: (d / 'cifar-10-python.tar.gz').write_bytes(b'junk'),
     'broken cifar10 files'),
])
def test_bad_sources_raise_one_line(tmp_path, name, make, error):
  make(tmp_path)
  with pytest.raises(preparation.PrepareError, match=error) as info:
    preparation.read_source(name, tmp_path)
  assert '\n' not in str(info.value)


def test_refuses_pickles_that_run_code(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, ('true',))
  folder = tmp_path / 'cifar-10-batches-py'
  folder.mkdir()
  (folder / 'data_batch_1').write_bytes(pickle.dumps(Evil()))
  with pytest.raises(preparation.PrepareError, match='refusing to unpickle'):
    preparation.read_source('cifar10', tmp_path)


def test_has_source(tmp_path):
  assert not preparation.has_source('fashion_mnist', str(tmp_path))
  write_fake_fashion_mnist(tmp_path)
  write_fake_cifar(tmp_path, 'cifar100')
  assert preparation.has_source('fashion_mnist', str(tmp_path))
  assert preparation.has_source('cifar100', str(tmp_path))
  assert not preparation.has_source('cifar10', str(tmp_path))
  assert not preparation.has_source('imagenet2012', str(tmp_path))


def test_main_prepares(tmp_path, capsys):
  write_fake_fashion_mnist(tmp_path / 'src')
  prepare.main(['fashion_mnist', '--from', str(tmp_path / 'src'),
                '--data_dir', str(tmp_path / 'data')])
  assert 'fashion_mnist is prepared in' in capsys.readouterr().out
  assert preparation.is_prepared('fashion_mnist', str(tmp_path / 'data'))


@pytest.mark.parametrize('args, error', [
    (['cifar10', '--from', '{src}'], 'holds no cifar10 data'),
    (['cifar10', '--from', '{src}/missing'], 'does not exist'),
    (['mnist', '--from', '{src}'], "invalid choice: 'mnist'"),
])
@pytest.mark.slow
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, error):
  (tmp_path / 'src').mkdir()
  args = [a.format(src=tmp_path / 'src') for a in args]
  result = subprocess.run(
      [sys.executable, '-m', 'ddnn_jax.prepare', *args, '--data_dir',
       str(tmp_path / 'data')],
      capture_output=True, text=True, timeout=120,
      cwd=Path(__file__).resolve().parents[1])
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and error in lines[0], result.stderr
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'data').exists()


@pytest.mark.slow
@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                    reason='needs `apt-get install dataset-fashion-mnist`')
def test_real_debian_fashion_mnist(tmp_path):
  path = preparation.prepare('fashion_mnist', str(DEBIAN_FASHION_MNIST), str(tmp_path))
  info = tfds.builder('fashion_mnist', data_dir=str(tmp_path)).info
  assert path.endswith('fashion_mnist/3.0.1')
  assert info.splits['train'].num_examples == 60000
  assert info.splits['test'].num_examples == 10000
  test = tfds.data_source('fashion_mnist', split='test', data_dir=str(tmp_path),
                          download=False)
  labels = np.asarray([test[i]['label'] for i in range(0, 10000, 7)])
  assert labels.min() == 0 and labels.max() == 9
  assert test[0]['image'].shape == (28, 28, 1) and test[0]['image'].dtype == np.uint8
