"""Offline preparation of image datasets into a tfds ArrayRecord data_dir.

Stock tfds builders need TensorFlow and network access to prepare CIFAR and
Fashion-MNIST. This module reads the original archives from a local folder,
with numpy only, and writes the same dataset (name, version, features) that
the stock builder would, so `tfds.data_source(name, data_dir=...)` reads it
like any other copy.

The command line is ``python -m ddnn_jax.prepare``; ``pipeline`` prepares Fashion-MNIST
with it on first use.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ddnn_jax.core import errors
from ddnn_jax.data import datasets

# split -> feature -> array with one row per example; 'image' is uint8 NHWC.
Arrays = dict[str, dict[str, np.ndarray]]
# Reads one file, given its name inside the dataset folder or archive.
ReadMember = Callable[[str], bytes]


class PrepareError(errors.UsageError):
  """Bad or missing source files; str(err) is one line for the user."""


@dataclasses.dataclass(frozen=True)
class Source:
  """Where the original CIFAR files live and what they hold."""
  archive: str  # name of the .tar.gz as downloaded
  folder: str   # folder the archive extracts to
  train: tuple[str, ...]
  test: tuple[str, ...]
  # (feature, pickle key); for binary files, the order of the label bytes.
  labels: tuple[tuple[str, bytes], ...]
  # (feature, file, pickle key) of the class names.
  names: tuple[tuple[str, str, bytes], ...]
  binary: bool  # fixed-size binary records (else python pickles)


_CIFAR10_PY = Source(
    archive='cifar-10-python.tar.gz', folder='cifar-10-batches-py',
    train=tuple(f'data_batch_{i}' for i in range(1, 6)), test=('test_batch',),
    labels=(('label', b'labels'),),
    names=(('label', 'batches.meta', b'label_names'),), binary=False)
_CIFAR10_BIN = Source(
    archive='cifar-10-binary.tar.gz', folder='cifar-10-batches-bin',
    train=tuple(f'data_batch_{i}.bin' for i in range(1, 6)),
    test=('test_batch.bin',), labels=(('label', b''),),
    names=(('label', 'batches.meta.txt', b''),), binary=True)
_CIFAR100_PY = Source(
    archive='cifar-100-python.tar.gz', folder='cifar-100-python',
    train=('train',), test=('test',),
    labels=(('label', b'fine_labels'), ('coarse_label', b'coarse_labels')),
    names=(('label', 'meta', b'fine_label_names'),
           ('coarse_label', 'meta', b'coarse_label_names')), binary=False)
_CIFAR100_BIN = Source(
    archive='cifar-100-binary.tar.gz', folder='cifar-100-binary',
    train=('train.bin',), test=('test.bin',),
    labels=(('coarse_label', b''), ('label', b'')),
    names=(('label', 'fine_label_names.txt', b''),
           ('coarse_label', 'coarse_label_names.txt', b'')), binary=True)

CIFAR_SOURCES = {'cifar10': (_CIFAR10_PY, _CIFAR10_BIN),
                 'cifar100': (_CIFAR100_PY, _CIFAR100_BIN)}
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}


def default_data_dir() -> str:
  """tfds' own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get('TFDS_DATA_DIR',
                        os.path.join('~', 'tensorflow_datasets'))


# ---------------------------------------------------------------- idx files


def parse_idx(data: bytes, what: str) -> np.ndarray:
  """Decodes an idx file of unsigned bytes (the MNIST format) into an array."""
  if len(data) < 4 or data[:3] != b'\0\0\x08' or not 1 <= data[3] <= 4:
    raise PrepareError(f'{what} is not an idx file of unsigned bytes')
  ndim = data[3]
  header = 4 + 4 * ndim
  dims = tuple(int(d) for d in np.frombuffer(data[4:header], '>u4'))
  if len(data) != header + int(np.prod(dims)):
    raise PrepareError(f'{what}: size does not match its header dims {dims}')
  return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _idx_path(folder: Path, stem: str) -> Path | None:
  """`stem.gz`, or the uncompressed `stem`, in folder."""
  for path in (folder / f'{stem}.gz', folder / stem):
    if path.is_file():
      return path
  return None


def _read_idx(folder: Path, stem: str) -> np.ndarray:
  path = _idx_path(folder, stem)
  if path is None:
    raise PrepareError(f'{folder} has neither {stem}.gz nor {stem}')
  try:
    with (gzip.open if path.suffix == '.gz' else open)(path, 'rb') as f:
      return parse_idx(f.read(), str(path))
  except (OSError, EOFError) as e:
    raise PrepareError(f'cannot read {path}: {e}') from e


def read_fashion_mnist(folder: Path) -> tuple[Arrays, dict[str, list[str]]]:
  """Reads the four Fashion-MNIST idx files; no class names (stock has them)."""
  arrays = {}
  for split, (images_stem, labels_stem) in FASHION_MNIST_FILES.items():
    images = _read_idx(folder, images_stem)
    labels = _read_idx(folder, labels_stem)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
      raise PrepareError(f'{images_stem}: expected 28x28 images, '
                         f'got shape {images.shape}')
    if labels.shape != images.shape[:1]:
      raise PrepareError(f'{labels_stem}: {labels.shape[0]} labels for '
                         f'{images.shape[0]} images')
    arrays[split] = {'image': images[..., None], 'label': labels}
  return arrays, {}


# ------------------------------------------------------------------ cifar


class _NumpyUnpickler(pickle.Unpickler):
  """Unpickles only plain containers and numpy arrays, never arbitrary code."""
  _ALLOWED = {('numpy', 'ndarray'), ('numpy', 'dtype')} | {
      (module, name) for module in ('numpy.core.multiarray',
                                    'numpy._core.multiarray')
      for name in ('_reconstruct', 'scalar')}

  def find_class(self, module: str, name: str):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'refusing to unpickle {module}.{name}')
    return super().find_class(module, name)


def _unpickle(data: bytes) -> dict[bytes, object]:
  return _NumpyUnpickler(io.BytesIO(data), encoding='bytes').load()


def _find_cifar(source_dir: Path, source: Source) -> Path | None:
  """The archive, or the extracted folder, of `source` in source_dir."""
  if (source_dir / source.archive).is_file():
    return source_dir / source.archive
  for folder in (source_dir / source.folder, source_dir):
    if (folder / source.train[0]).is_file():
      return folder
  return None


def _member_reader(path: Path, source: Source) -> ReadMember:
  """Reads files by name from the archive or the extracted folder."""
  if path.is_dir():
    return lambda name: (path / name).read_bytes()
  # Read every member once, in memory: nothing is extracted to disk.
  with tarfile.open(path, 'r:gz') as tar:
    members = {m.name.removeprefix(f'{source.folder}/'): tar.extractfile(m).read()
               for m in tar if m.isfile()}
  return members.__getitem__


def _parse_cifar_files(read: ReadMember, source: Source,
                       files: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Parses the image + label files of one split into stacked arrays."""
  images, labels = [], {feature: [] for feature, _ in source.labels}
  for name in files:
    data = read(name)
    if source.binary:
      # A record is one byte per label, then a 3x32x32 (CHW) image.
      width = len(source.labels) + 3072
      if len(data) % width:
        raise PrepareError(f'{name}: size is not a whole number of records')
      rows = np.frombuffer(data, np.uint8).reshape(-1, width)
      for i, (feature, _) in enumerate(source.labels):
        labels[feature].append(rows[:, i])
      images.append(rows[:, len(source.labels):])
    else:
      batch = _unpickle(data)
      images.append(np.asarray(batch[b'data'], np.uint8))
      for feature, key in source.labels:
        labels[feature].append(np.asarray(batch[key]))
  image = np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return {'image': image, **{k: np.concatenate(v) for k, v in labels.items()}}


def _parse_cifar_names(read: ReadMember, source: Source) -> dict[str, list[str]]:
  names = {}
  for feature, name, key in source.names:
    if source.binary:
      names[feature] = [n for n in read(name).decode().splitlines() if n.strip()]
    else:
      names[feature] = [n.decode() for n in _unpickle(read(name))[key]]
  return names


def read_cifar(name: str, source_dir: Path) -> tuple[Arrays, dict[str, list[str]]]:
  """Reads CIFAR-10/100 from a python-pickle or binary archive or folder."""
  for source in CIFAR_SOURCES[name]:
    path = _find_cifar(source_dir, source)
    if path is None:
      continue
    try:
      read = _member_reader(path, source)
      arrays = {'train': _parse_cifar_files(read, source, source.train),
                'test': _parse_cifar_files(read, source, source.test)}
      return arrays, _parse_cifar_names(read, source)
    except (OSError, EOFError, KeyError, ValueError, TypeError,
            pickle.UnpicklingError, tarfile.TarError) as e:
      raise PrepareError(f'{path}: broken {name} files '
                         f'({type(e).__name__}: {e})') from e
  wanted = ' or '.join(f'{s.archive} (or folder {s.folder})'
                       for s in CIFAR_SOURCES[name])
  raise PrepareError(f'{source_dir} holds no {name} data: expected {wanted}')


def has_source(name: str, source_dir: str) -> bool:
  """Whether source_dir seems to hold the original files of `name`."""
  folder = Path(source_dir).expanduser()
  if name == 'fashion_mnist':
    return all(_idx_path(folder, stem) for stems in FASHION_MNIST_FILES.values()
               for stem in stems)
  return any(_find_cifar(folder, source)
             for source in CIFAR_SOURCES.get(name, ()))


def _check_name(name: str) -> None:
  if name not in datasets.PREPARABLE:
    raise PrepareError(f"unknown dataset '{name}'; choose one of "
                       f"{', '.join(datasets.PREPARABLE)}")


def read_source(name: str, source_dir: Path) -> tuple[Arrays, dict[str, list[str]]]:
  """Reads and validates the original files; raises PrepareError."""
  _check_name(name)
  if not source_dir.is_dir():
    raise PrepareError(f'source folder {source_dir} does not exist')
  if name == 'fashion_mnist':
    arrays, names = read_fashion_mnist(source_dir)
  else:
    arrays, names = read_cifar(name, source_dir)
  spec = datasets.get(name)
  for split, features in arrays.items():
    if features['image'].shape[1:] != spec.image_shape:
      raise PrepareError(f'{name} {split}: bad image shape '
                         f'{features["image"].shape[1:]}')
    for key, classes in (('label', spec.num_classes), *spec.extra_labels):
      if key in features and not (features[key] < classes).all():
        raise PrepareError(f'{name} {split}: {key} out of range [0, {classes})')
  return arrays, names


# --------------------------------------------------------------- tfds write


def _png(image: np.ndarray) -> bytes:
  # tfds would encode numpy images with TensorFlow; PIL gives the same pixels.
  buffer = io.BytesIO()
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
      buffer, format='PNG')
  return buffer.getvalue()


def _builder_class(name: str) -> type[tfds.core.GeneratorBasedBuilder]:
  """The stock builder (name, version, features) fed from in-memory arrays."""
  stock = tfds.builder_cls(name)

  class OfflineBuilder(stock, skip_registration=True):
    # Same name as the stock builder, so readers find it under `name/version`.
    name = stock.name

    def __init__(self, *, arrays: Arrays, label_names: dict[str, list[str]],
                 **kwargs):
      self._arrays = arrays
      self._label_names = label_names
      super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
      del dl_manager  # Everything is already in memory.
      for key, names in self._label_names.items():
        self.info.features[key].names = names  # as the stock builder does
      return {split: self._generate_examples(split) for split in self._arrays}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
      features = self._arrays[split]
      with_id = 'id' in self.info.features  # cifar: 'train_00042'
      for i, image in enumerate(features['image']):
        record = {key: int(value[i]) for key, value in features.items()
                  if key != 'image'}
        record['image'] = _png(image)
        if with_id:
          record['id'] = f'{split}_{i:05d}'
        yield i, record

    # tfds would print the temporary folder; callers report the final one.
    def _log_download_bytes(self):
      pass

    def _log_download_done(self):
      pass

  return OfflineBuilder


def is_prepared(name: str, data_dir: str | None) -> bool:
  """Whether data_dir holds `name` at the stock version, as ArrayRecord."""
  builder = tfds.builder(name, data_dir=os.path.expanduser(
      data_dir or default_data_dir()))
  return (builder.is_prepared() and builder.info.file_format
          == tfds.core.FileFormat.ARRAY_RECORD)


def prepare(name: str, source_dir: str, data_dir: str) -> str:
  """Prepares `name` from source_dir into data_dir; returns the dataset dir.

  Writes into a temporary folder inside data_dir and renames the finished
  dataset into place, so a failure leaves nothing half-written behind.
  """
  _check_name(name)
  data_dir = os.path.expanduser(data_dir)
  target = Path(tfds.builder(name, data_dir=data_dir).data_dir)
  if is_prepared(name, data_dir):
    return str(target)
  arrays, label_names = read_source(name, Path(source_dir).expanduser())
  if target.exists() and any(target.iterdir()):
    raise PrepareError(f'{target} exists but is not a finished ArrayRecord '
                       f'copy of {name}; move it away and retry')
  os.makedirs(data_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=f'.{name}-', dir=data_dir) as tmp:
    builder = _builder_class(name)(
        arrays=arrays, label_names=label_names, data_dir=tmp,
        file_format='array_record')
    builder.download_and_prepare(download_dir=os.path.join(tmp, 'downloads'))
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(builder.data_dir, target)  # atomic: same filesystem
  return str(target)
