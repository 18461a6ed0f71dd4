"""Fake dataset sources (Fashion-MNIST idx files, CIFAR archives) shared by the tests."""

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
  """Writes uint8 `array` in the idx format, gzipped if path ends in .gz."""
  header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
  with (gzip.open if path.suffix == '.gz' else open)(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_fake_fashion_mnist(folder: Path, num_train: int = 20, num_test: int = 10,
                             suffix: str = '.gz') -> dict[str, np.ndarray]:
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  arrays = {}
  for split, prefix, n in (('train', 'train', num_train), ('test', 't10k', num_test)):
    arrays[split] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    arrays[f'{split}_labels'] = np.arange(n, dtype=np.uint8) % 10
    write_idx(folder / f'{prefix}-images-idx3-ubyte{suffix}', arrays[split])
    write_idx(folder / f'{prefix}-labels-idx1-ubyte{suffix}', arrays[f'{split}_labels'])
  return arrays


def fake_cifar(name: str, num_train: int, num_test: int) -> dict[str, np.ndarray]:
  """Random CIFAR-like split arrays; fine labels are the example index mod 100."""
  rng = np.random.default_rng(1)
  out = {}
  for split, n in (('train', num_train), ('test', num_test)):
    out[split] = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    out[f'{split}_labels'] = np.arange(n) % (10 if name == 'cifar10' else 100)
    out[f'{split}_coarse'] = np.arange(n) % 20
  return out


def _cifar_python_files(name: str, arrays: dict) -> dict[str, bytes]:
  chw = {s: arrays[s].transpose(0, 3, 1, 2).reshape(len(arrays[s]), -1)
         for s in ('train', 'test')}
  if name == 'cifar10':
    # Five train batches, as in the real archive.
    files = {f'data_batch_{i + 1}': {b'data': part, b'labels': labels.tolist()}
             for i, (part, labels) in enumerate(zip(
                 np.array_split(chw['train'], 5),
                 np.array_split(arrays['train_labels'], 5)))}
    files['test_batch'] = {b'data': chw['test'],
                           b'labels': arrays['test_labels'].tolist()}
    files['batches.meta'] = {b'label_names': [f'c{i}'.encode() for i in range(10)]}
  else:
    files = {s: {b'data': chw[s], b'fine_labels': arrays[f'{s}_labels'].tolist(),
                 b'coarse_labels': arrays[f'{s}_coarse'].tolist()}
             for s in ('train', 'test')}
    files['meta'] = {b'fine_label_names': [f'f{i}'.encode() for i in range(100)],
                     b'coarse_label_names': [f'k{i}'.encode() for i in range(20)]}
  return {k: pickle.dumps(v) for k, v in files.items()}


def _cifar10_binary_files(arrays: dict) -> dict[str, bytes]:
  def records(images, labels):
    chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([labels[:, None].astype(np.uint8), chw], 1).tobytes()
  files = {f'data_batch_{i + 1}.bin': records(images, labels)
           for i, (images, labels) in enumerate(zip(
               np.array_split(arrays['train'], 5),
               np.array_split(arrays['train_labels'], 5)))}
  files['test_batch.bin'] = records(arrays['test'], arrays['test_labels'])
  files['batches.meta.txt'] = ''.join(f'c{i}\n' for i in range(10)).encode()
  return files


def write_fake_cifar(folder: Path, name: str = 'cifar10', num_train: int = 20,
                     num_test: int = 8, binary: bool = False,
                     archive: bool = True) -> dict[str, np.ndarray]:
  """Writes a CIFAR archive (or its extracted folder); returns the arrays."""
  arrays = fake_cifar(name, num_train, num_test)
  if binary:
    files, top = _cifar10_binary_files(arrays), 'cifar-10-batches-bin'
  else:
    files = _cifar_python_files(name, arrays)
    top = 'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'
  folder.mkdir(parents=True, exist_ok=True)
  if archive:
    tar_name = {'cifar-10-batches-py': 'cifar-10-python.tar.gz',
                'cifar-100-python': 'cifar-100-python.tar.gz',
                'cifar-10-batches-bin': 'cifar-10-binary.tar.gz'}[top]
    with tarfile.open(folder / tar_name, 'w:gz') as tar:
      for member, data in files.items():
        info = tarfile.TarInfo(f'{top}/{member}')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  else:
    (folder / top).mkdir()
    for member, data in files.items():
      (folder / top / member).write_bytes(data)
  return arrays
