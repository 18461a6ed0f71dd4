"""Input pipeline: grain over `tfds.data_source`, no TensorFlow needed.

Both iterators read global batches of example indices and let process i take
rows [i * local, (i + 1) * local) of each: the processes' local batches are
disjoint and together form exactly the batch a single process would see.
Augmentation draws its randomness for the whole global batch from
(seed, step) too, so it does not depend on the number of processes either.

Batches are augmented whole with numpy (one gather does pad + crop + flip);
only ImageNet, whose images vary in size, is cropped per example with PIL.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
from collections.abc import Sequence

from absl import flags
import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ddnn_jax.core import errors
from ddnn_jax.data import datasets, preparation

Batch = dict[str, np.ndarray]


DataError = errors.DataError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str              # 'fashion_mnist' | 'cifar10' | 'cifar100' | 'imagenet2012'
  num_classes: int
  image_shape: tuple     # (H, W, C) of batches fed to the model
  num_train: int         # examples in the train split (as prepared on disk)
  num_eval: int
  class_names: tuple[str, ...] = ()  # of the labels, when the dataset names them


_RRC_SCALE = (0.08, 1.0)  # random-resized crop: area fraction and aspect ratio
_RRC_RATIO = (3 / 4, 4 / 3)
_RRC_ATTEMPTS = 10
_EVAL_CROP_FRACTION = 0.875  # ImageNet eval: 224 center crop of the 256 resize


# ------------------------------------------------------------ data sources


def _resolve_data_dir(data_dir: str | None) -> str:
  return os.path.expanduser(data_dir or preparation.default_data_dir())


def _how_to_prepare(name: str, data_dir: str) -> str:
  """One line naming what to download and the command to run."""
  command = f'python -m ddnn_jax.prepare {name} --from DIR --data_dir {data_dir}'
  how = {
      'fashion_mnist': (
          '`apt-get install dataset-fashion-mnist` and run `python -m '
          'ddnn_jax.prepare fashion_mnist --from /usr/share/datasets/fashion-mnist'
          f' --data_dir {data_dir}` (or --from a DIR holding the four idx .gz '
          'files of https://github.com/zalandoresearch/fashion-mnist)'),
      'cifar10': ('download cifar-10-python.tar.gz from '
                  'https://www.cs.toronto.edu/~kriz/cifar.html into DIR and run '
                  f'`{command}`'),
      'cifar100': ('download cifar-100-python.tar.gz from '
                   'https://www.cs.toronto.edu/~kriz/cifar.html into DIR and '
                   f'run `{command}`'),
      'imagenet2012': (
          'put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from '
          'https://image-net.org into MANUAL_DIR, `pip install tensorflow` and '
          'run `tfds build imagenet2012 --manual_dir MANUAL_DIR '
          f'--data_dir {data_dir} --file_format=array_record`, or point '
          'data_dir at an existing ArrayRecord copy (e.g. on GCS)'),
  }[name]
  return f'{name} is not prepared (as ArrayRecord) in {data_dir}: {how}'


def _data_source(name: str, split: str, data_dir: str | None):
  """Random-access tfds source of one split; DataError if not prepared."""
  data_dir = _resolve_data_dir(data_dir)
  try:
    # download=False: never reach for the network or TensorFlow from here.
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False)
  except Exception as e:  # tfds raises many types for missing/foreign data
    raise DataError(_how_to_prepare(name, data_dir)) from e


def _image_size(spec: datasets.DatasetSpec, name: str, image_size: int | None) -> int:
  if image_size is None or image_size == spec.image_size or spec.resize:
    return image_size or spec.image_size
  raise ValueError(f'{name} images are {spec.image_size}px; image_size only '
                   'applies to imagenet2012 (pass None)')


def ensure_prepared(name: str, data_dir: str | None,
                    source_dir: str | None) -> str:
  """Returns the data_dir in use, preparing `name` from source_dir if needed.

  Datasets that ddnn_jax.prepare handles are prepared automatically when
  source_dir holds their original files (e.g. the Debian Fashion-MNIST).
  """
  datasets.get(name)
  data_dir = _resolve_data_dir(data_dir)
  try:
    _data_source(name, 'train', data_dir)  # readable (also under mock_data)
    return data_dir
  except DataError:
    pass
  if source_dir and preparation.has_source(name, source_dir):
    print(f'Preparing {name} from {source_dir} into {data_dir} (one-off).')
    try:
      preparation.prepare(name, source_dir, data_dir)
    except preparation.PrepareError as e:
      raise DataError(f'cannot prepare {name} from {source_dir}: {e}') from e
    return data_dir
  raise DataError(_how_to_prepare(name, data_dir))


def get_dataset_info(name: str, data_dir: str | None,
                     image_size: int | None = None) -> DatasetInfo:
  spec = datasets.get(name)
  size = _image_size(spec, name, image_size)
  train = _data_source(name, 'train', data_dir)
  try:
    class_names = tuple(train.dataset_info.features['label'].names)
  except (AttributeError, KeyError):
    class_names = ()
  return DatasetInfo(
      name=name, num_classes=spec.num_classes,
      image_shape=(size, size, spec.image_shape[2]),
      num_train=len(train),
      num_eval=len(_data_source(name, spec.eval_split, data_dir)),
      class_names=class_names if len(class_names) == spec.num_classes else ())


# ------------------------------------------------------------ preprocessing


def normalize(images: np.ndarray, spec: datasets.DatasetSpec) -> np.ndarray:
  """Pixels (uint8, or floats in [0, 255]) -> float32 with the dataset's per-channel mean 0
  and std 1."""
  scale, shift = spec.normalization()
  out = np.multiply(images, scale, dtype=np.float32)  # one pass less than astype
  out -= shift
  return out


def pad_crop_flip(images: np.ndarray, pad: int, offsets: np.ndarray,
                  flips: np.ndarray) -> np.ndarray:
  """Zero-pads a NHWC batch by `pad`, crops back to HxW, mirrors some.

  offsets: int [N, 2] top-left corners (y, x) in [0, 2 * pad];
  flips: bool [N]. One fancy-index gather does all three for the batch.
  """
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows = offsets[:, :1] + np.arange(h)
  cols = offsets[:, 1:] + np.arange(w)
  cols = np.where(flips[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_resized_crop(image: np.ndarray, size: int,
                        uniforms: np.ndarray) -> np.ndarray:
  """Inception-style crop of a random area and aspect ratio, resized.

  uniforms: [attempts, 4] in [0, 1) for area, log-ratio, y, x. The first
  attempt that fits is used; if none fits, the largest central crop with a
  ratio in range (as torchvision does).
  """
  h, w = image.shape[:2]
  log_lo, log_hi = np.log(_RRC_RATIO)
  for u_area, u_ratio, u_y, u_x in uniforms:
    area = h * w * (_RRC_SCALE[0] + u_area * (_RRC_SCALE[1] - _RRC_SCALE[0]))
    ratio = np.exp(log_lo + u_ratio * (log_hi - log_lo))
    cw = round(math.sqrt(area * ratio))
    ch = round(math.sqrt(area / ratio))
    if 0 < cw <= w and 0 < ch <= h:
      y, x = int(u_y * (h - ch + 1)), int(u_x * (w - cw + 1))
      return _resize(image, (x, y, x + cw, y + ch), size)
  ratio = min(max(w / h, _RRC_RATIO[0]), _RRC_RATIO[1])
  cw, ch = (w, w / ratio) if w / h < ratio else (h * ratio, h)
  x, y = (w - cw) / 2, (h - ch) / 2
  return _resize(image, (x, y, x + cw, y + ch), size)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resize shorter side to size / 0.875, then the central size x size."""
  h, w = image.shape[:2]
  side = min(h, w) * _EVAL_CROP_FRACTION  # the crop, in source pixels
  x, y = (w - side) / 2, (h - side) / 2
  return _resize(image, (x, y, x + side, y + side), size)


def _resize(image: np.ndarray, box: tuple[float, ...], size: int) -> np.ndarray:
  # Resizing only the box crops and scales in one pass over the source.
  pil = Image.fromarray(image)
  return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR, box=box))


def _batched_read(source: Sequence[dict]) -> bool:
  """Whether source.__getitems__ works: ~20x faster than reading one by one.

  tfds.testing.mock_data sources fail on it (tfds 4.9), so probe once.
  """
  try:
    source.__getitems__([0])
    return True
  except (AttributeError, TypeError):
    return False


@dataclasses.dataclass(frozen=True)
class _Loader:
  """Reads examples by index."""
  source: Sequence[dict]
  batched_read: bool
  spec: datasets.DatasetSpec
  size: int

  def read(self, ids: np.ndarray) -> list[dict]:
    ids = [int(i) for i in ids]
    if self.batched_read:
      return list(self.source.__getitems__(ids))
    return [self.source[i] for i in ids]


def _labels(examples: list[dict]) -> np.ndarray:
  return np.asarray([ex['label'] for ex in examples], np.int32)


@dataclasses.dataclass(frozen=True)
class _TrainBatch(_Loader):
  """(step, global batch of indices) -> augmented local batch."""
  seed: int
  process_index: int
  local_batch: int

  def __call__(self, step: int, global_ids: np.ndarray) -> Batch:
    # One rng per global step, drawn for the global batch; each process
    # keeps its rows, so augmentation does not depend on process_count.
    rng = np.random.default_rng((self.seed, step))
    n = len(global_ids)
    rows = slice(self.process_index * self.local_batch,
                 (self.process_index + 1) * self.local_batch)
    flips = (rng.random(n) < 0.5)[rows]
    examples = self.read(global_ids[rows])
    if self.spec.resize:
      uniforms = rng.random((n, _RRC_ATTEMPTS, 4))[rows]
      images = np.stack([random_resized_crop(ex['image'], self.size, u)
                         for ex, u in zip(examples, uniforms)])
      images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    else:
      offsets = rng.integers(0, 2 * self.spec.pad + 1, (n, 2))[rows]
      images = pad_crop_flip(np.stack([ex['image'] for ex in examples]),
                             self.spec.pad, offsets, flips)
    return {'image': normalize(images, self.spec), 'label': _labels(examples)}


@dataclasses.dataclass(frozen=True)
class _EvalBatch(_Loader):
  """Global batch number -> local batch of the examples ``ids``, padded past their end."""
  ids: np.ndarray
  process_index: int
  local_batch: int
  global_batch: int

  def __call__(self, batch: int) -> Batch:
    start = batch * self.global_batch + self.process_index * self.local_batch
    ids = self.ids[start:start + self.local_batch]
    examples = self.read(ids)
    # Padding rows stay black images with label 0 and mask 0.
    images = np.zeros((self.local_batch, self.size, self.size,
                       self.spec.image_shape[2]), np.uint8)
    labels = np.zeros(self.local_batch, np.int32)
    mask = np.zeros(self.local_batch, np.float32)
    for i, ex in enumerate(examples):
      image = ex['image']
      images[i] = center_crop(image, self.size) if self.spec.resize else image
    labels[:len(ids)] = _labels(examples)
    mask[:len(ids)] = 1
    return {'image': normalize(images, self.spec), 'label': labels,
            'mask': mask}


# ---------------------------------------------------------------- iterators


def _local_batch_size(global_batch_size: int, process_index: int,
                      process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not divisible '
                     f'by process_count={process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in '
                     f'[0, {process_count})')
  return global_batch_size // process_count


def _to_iter_dataset(ds: grain.MapDataset, num_workers: int) -> grain.IterDataset:
  # Elements are whole batches: a few threads and a short buffer suffice.
  threads = min(4, os.cpu_count() or 1)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=2 * threads))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags: say so, not UnparsedFlagAccessError.
      raise ValueError('num_workers > 0 needs parsed absl flags, as in an absl app '
                       '(python -m ddnn_jax.main); elsewhere call '
                       'absl.flags.FLAGS.mark_as_parsed() first')
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                              worker_init_fn=_ignore_stop_signals)
  return it_ds


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
  """Workers leave SIGINT/SIGTERM to the trainer, which saves, then closes them.

  Ctrl-C reaches the whole process group, workers included; without this they would
  die under the trainer before it saves its checkpoint.
  """
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _shuffle_seed(seed: int) -> int:
  # grain reshuffles epoch e with seed + e; hashing the seed keeps nearby
  # seeds (seed, seed + 1) from sharing epochs.
  return int(np.random.SeedSequence(seed).generate_state(1)[0])


# Held-out validation examples are drawn with this seed, not the run's: every run of a
# dataset holds out the same examples, so runs with different seeds compare fairly.
_VALIDATION_SEED = 20210301


def split_train(num_train: int, validation_examples: int) -> tuple[np.ndarray, np.ndarray]:
  """(training ids, validation ids) of the train split, each sorted.

  The validation ids are a fixed random sample of ``validation_examples`` (the same for
  every run and seed); training uses the rest. With 0, training uses every example.
  """
  if not 0 <= validation_examples < num_train:
    raise ValueError(f'validation_examples={validation_examples} must be in [0, {num_train})')
  held = np.random.default_rng(_VALIDATION_SEED).permutation(num_train)[:validation_examples]
  held = np.sort(held)
  return np.setdiff1d(np.arange(num_train), held, assume_unique=True), held


def num_train_examples(info: DatasetInfo, subset: int | None,
                       validation_examples: int) -> int:
  """How many examples a run trains on: the first ``subset`` of those not held out."""
  available = info.num_train - validation_examples
  return min(subset, available) if subset else available


def create_train_iterator(
    name: str, data_dir: str | None, *, global_batch_size: int, seed: int,
    process_index: int = 0, process_count: int = 1,
    image_size: int | None = None, num_workers: int = 0,
    subset: int | None = None, validation_examples: int = 0) -> grain.DatasetIterator:
  """Infinite iterator of augmented train batches of this process.

  Yields dict(image=float32 [local, H, W, C], label=int32 [local]), with
  local = global_batch_size // process_count. Each epoch is reshuffled and
  its last partial global batch dropped. `it.get_state()` is a small
  JSON-serialisable dict; `it.set_state(s)` on a new iterator resumes there.
  Training uses the train split minus ``validation_examples`` held out
  (``split_train``); subset > 0 uses only the first `subset` of those.
  """
  spec = datasets.get(name)
  size = _image_size(spec, name, image_size)
  local = _local_batch_size(global_batch_size, process_index, process_count)
  source = _data_source(name, 'train', data_dir)
  ids, _ = split_train(len(source), validation_examples)
  if subset:
    ids = ids[:subset]
  if len(ids) < global_batch_size:
    raise ValueError(f'{name} train has {len(ids)} examples, fewer than '
                     f'global_batch_size={global_batch_size}')
  ds = (grain.MapDataset.range(len(ids))
        .shuffle(seed=_shuffle_seed(seed))
        .map(_Lookup(ids))
        .batch(global_batch_size, drop_remainder=True)
        .repeat()
        .map_with_index(_TrainBatch(source, _batched_read(source), spec, size,
                                    seed, process_index, local)))
  return iter(_to_iter_dataset(ds, num_workers))


@dataclasses.dataclass(frozen=True)
class _Lookup:
  """Position -> example id (a picklable map for grain's worker processes)."""
  ids: np.ndarray

  def __call__(self, position: int) -> int:
    return int(self.ids[position])


SPLITS = ('test', 'validation', 'calibration')


def create_eval_iterator(
    name: str, data_dir: str | None, *, global_batch_size: int,
    process_index: int = 0, process_count: int = 1,
    image_size: int | None = None, subset: int | None = None,
    num_workers: int = 0, split: str = 'test',
    validation_examples: int = 0) -> grain.IterDataset:
  """Finite, re-iterable eval batches of this process, in a fixed order, not augmented.

  ``split``: 'test' is the dataset's evaluation split (ImageNet: its validation set);
  'validation' the ``validation_examples`` held out of the train split
  (``split_train``); 'calibration' the training examples in a fixed random order
  (for BatchNorm recalibration). ``subset`` takes the first examples of that order.

  Yields dict(image, label, mask) for ceil(num_examples / global_batch_size)
  batches on every process; mask is 1 for real examples and 0 for the padding
  (black images, label 0) of the last global batch, so each example counts
  exactly once. Each `iter()` starts a fresh pass.
  """
  spec = datasets.get(name)
  size = _image_size(spec, name, image_size)
  local = _local_batch_size(global_batch_size, process_index, process_count)
  if split == 'test':
    source = _data_source(name, spec.eval_split, data_dir)
    ids = np.arange(len(source))
  elif split in ('validation', 'calibration'):
    source = _data_source(name, 'train', data_dir)
    train_ids, ids = split_train(len(source), validation_examples)
    if split == 'calibration':
      ids = np.random.default_rng(_VALIDATION_SEED + 1).permutation(train_ids)
    if not len(ids):
      raise ValueError('the validation split is empty: the run held out no examples '
                       '(data.validation_examples=0)')
  else:
    raise ValueError(f'unknown split {split!r}; choose one of {", ".join(SPLITS)}')
  if subset:
    ids = ids[:subset]
  num_batches = -(-len(ids) // global_batch_size)
  ds = grain.MapDataset.range(num_batches).map(_EvalBatch(
      source, _batched_read(source), spec, size, ids, process_index,
      local, global_batch_size))
  return _to_iter_dataset(ds, num_workers)
