"""Tests for the grain input pipeline (ddnn_jax.data.pipeline), offline.

cifar10 / imagenet2012 run on `tfds.testing.mock_data`; the real ArrayRecord
path runs on a tiny generated CIFAR-100 prepared with ddnn_jax.prepare, whose
fine label equals the example index, so batches tell which examples they hold.
"""

import json
import types

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags

from ddnn_jax.data import datasets, pipeline, preparation
from fakes import write_fake_cifar, write_fake_fashion_mnist

NUM_MOCK = 20
NUM_TRAIN, NUM_TEST = 40, 13  # fake CIFAR-100: label == index, all distinct


@pytest.fixture
def mock_tfds():
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    yield


@pytest.fixture(scope='module')
def cifar100_dir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('cifar100')
  write_fake_cifar(tmp / 'src', 'cifar100', num_train=NUM_TRAIN, num_test=NUM_TEST)
  preparation.prepare('cifar100', str(tmp / 'src'), str(tmp / 'data'))
  return str(tmp / 'data')


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  chex.assert_trees_all_equal(a, b)


def normalized_range(name):
  spec = datasets.SPECS[name]
  mean, std = np.asarray(spec.mean), np.asarray(spec.std)
  return (-mean / std).min(), ((1 - mean) / std).max()


@pytest.mark.parametrize('name, image_size, shape, num_classes', [
    ('cifar10', None, (32, 32, 3), 10),
    ('imagenet2012', 24, (24, 24, 3), 1000),
])
def test_train_batches_shapes_types_ranges(mock_tfds, name, image_size, shape,
                                           num_classes):
  info = pipeline.get_dataset_info(name, None, image_size)
  assert info == pipeline.DatasetInfo(name, num_classes, shape, NUM_MOCK, NUM_MOCK,
                                      info.class_names)
  assert len(info.class_names) == num_classes

  it = pipeline.create_train_iterator(name, None, global_batch_size=8, seed=0,
                                      image_size=image_size)
  for batch in take(it, 3):
    chex.assert_shape(batch['image'], (8, *shape))
    chex.assert_type([batch['image'], batch['label']], [np.float32, np.int32])
    lo, hi = normalized_range(name)
    assert lo - 1e-5 <= batch['image'].min() and batch['image'].max() <= hi + 1e-5
    assert batch['image'].std() > 0.1
    assert 0 <= batch['label'].min() and batch['label'].max() < num_classes


def test_train_is_deterministic_in_the_seed(mock_tfds):
  def first(seed):
    return take(pipeline.create_train_iterator('cifar10', None, global_batch_size=8,
                                               seed=seed), 3)
  assert_batches_equal(first(7), first(7))
  assert not np.array_equal(first(7)[0]['image'], first(8)[0]['image'])


@pytest.mark.parametrize('name, image_size', [('cifar10', None), ('imagenet2012', 16)])
def test_processes_split_each_global_batch(mock_tfds, name, image_size):
  def batches(index, count):
    return take(pipeline.create_train_iterator(
        name, None, global_batch_size=8, seed=3, process_index=index,
        process_count=count, image_size=image_size), 4)
  whole, first, second = batches(0, 1), batches(0, 2), batches(1, 2)
  for w, a, b in zip(whole, first, second):
    chex.assert_shape([a['image'], b['image']], (4, *w['image'].shape[1:]))
    # Augmentation included: the two halves are exactly the global batch.
    assert_batches_equal(w, {k: np.concatenate([a[k], b[k]]) for k in w})


def test_epochs_cover_distinct_examples_and_reshuffle(cifar100_dir):
  it = pipeline.create_train_iterator('cifar100', cifar100_dir, global_batch_size=16,
                                      seed=0)
  # 40 examples, batches of 16: 2 batches an epoch, 8 examples dropped.
  epochs = [np.concatenate([b['label'] for b in take(it, 2)]) for _ in range(3)]
  for labels in epochs:
    assert len(set(labels)) == 32 and labels.max() < NUM_TRAIN
  assert len({tuple(labels) for labels in epochs}) == 3


def test_disjoint_shards_on_real_array_record(cifar100_dir):
  shards = [take(pipeline.create_train_iterator(
      'cifar100', cifar100_dir, global_batch_size=16, seed=1, process_index=i,
      process_count=2), 2) for i in range(2)]
  for a, b in zip(*shards):
    assert not set(a['label']) & set(b['label'])


def test_subset_uses_the_first_examples(cifar100_dir):
  source = tfds.data_source('cifar100', split='train', data_dir=cifar100_dir,
                            download=False)
  first = {int(source[i]['label']) for i in range(10)}
  it = pipeline.create_train_iterator('cifar100', cifar100_dir, global_batch_size=5,
                                      seed=0, subset=10)
  assert set(np.concatenate([b['label'] for b in take(it, 6)])) == first


@pytest.mark.parametrize('num_workers', [0, pytest.param(2, marks=pytest.mark.slow)])
def test_state_restore_resumes_identically(cifar100_dir, num_workers):
  if num_workers:
    flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags, as in an absl app.

  def make(workers=num_workers):
    return pipeline.create_train_iterator('cifar100', cifar100_dir, global_batch_size=8,
                                          seed=5, num_workers=workers)
  it, resumed, reference = make(), make(), make(0)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint would
  expected = take(it, 7)  # crosses an epoch boundary (5 batches an epoch)

  resumed.set_state(state)
  for want, got, ref in zip(expected, take(resumed, 7), take(reference, 10)[3:]):
    assert_batches_equal(want, got)
    assert_batches_equal(want, ref)  # worker processes change nothing
  for iterator in (it, resumed, reference):
    iterator.close()  # ends worker processes


def test_worker_processes_outside_an_absl_app_are_a_clear_error(cifar100_dir, monkeypatch):
  unparsed = types.SimpleNamespace(FLAGS=types.SimpleNamespace(is_parsed=lambda: False))
  monkeypatch.setattr(pipeline, 'flags', unparsed)
  with pytest.raises(ValueError, match='num_workers > 0 needs parsed absl flags'):
    pipeline.create_train_iterator('cifar100', cifar100_dir, global_batch_size=8, seed=5,
                                   num_workers=1)


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_counts_every_example_once(cifar100_dir, process_count):
  labels, masks = [], []
  for index in range(process_count):
    batches = list(pipeline.create_eval_iterator(
        'cifar100', cifar100_dir, global_batch_size=6, process_index=index,
        process_count=process_count))
    assert len(batches) == 3  # ceil(13 / 6), the same on every process
    for batch in batches:
      chex.assert_shape([batch['image'], batch['label'], batch['mask']],
                        [(6 // process_count, 32, 32, 3), (6 // process_count,),
                         (6 // process_count,)])
      chex.assert_type([batch['image'], batch['label'], batch['mask']],
                       [np.float32, np.int32, np.float32])
      labels.append(batch['label'])
      masks.append(batch['mask'])
  labels, masks = np.concatenate(labels), np.concatenate(masks)
  assert sorted(labels[masks == 1]) == list(range(NUM_TEST))
  assert masks.sum() == NUM_TEST and set(masks) == {0.0, 1.0}


def test_eval_images_are_not_augmented(cifar100_dir):
  source = tfds.data_source('cifar100', split='test', data_dir=cifar100_dir,
                            download=False)
  batch = next(iter(pipeline.create_eval_iterator('cifar100', cifar100_dir,
                                                  global_batch_size=4)))
  spec = datasets.SPECS['cifar100']
  expected = (source[2]['image'] / 255 - spec.mean) / spec.std
  np.testing.assert_allclose(batch['image'][2], expected, atol=1e-5)
  assert batch['label'][2] == source[2]['label']


def test_eval_imagenet_center_crop(mock_tfds):
  batches = list(pipeline.create_eval_iterator('imagenet2012', None, global_batch_size=8,
                                               image_size=16, subset=10))
  assert len(batches) == 2
  chex.assert_shape(batches[1]['image'], (8, 16, 16, 3))
  np.testing.assert_array_equal(batches[1]['mask'], [1, 1, 0, 0, 0, 0, 0, 0])


def test_eval_is_reiterable(mock_tfds):
  ds = pipeline.create_eval_iterator('cifar10', None, global_batch_size=8)
  assert_batches_equal(list(ds), list(ds))


def test_pad_crop_flip():
  images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 1) + 1
  out = pipeline.pad_crop_flip(images, 1, np.array([[1, 1], [0, 0]]),
                               np.array([True, False]))
  np.testing.assert_array_equal(out[0], images[0, :, ::-1])  # centred, mirrored
  np.testing.assert_array_equal(out[1, 0], 0)  # shifted in the zero padding
  np.testing.assert_array_equal(out[1, 1:, 1:], images[1, :2, :2])


def _coordinates_image(h, w):
  """Channel 0 holds each pixel's column, channel 1 its row: a crop shows where it was."""
  image = np.zeros((h, w, 3), np.uint8)
  image[..., 0] = np.arange(w)[None, :]
  image[..., 1] = np.arange(h)[:, None]
  return image


def _box_seen(crop, size):
  """The source box (x0, y0, x1, y1) a bilinear resize to ``size`` pixels sampled."""
  cols, rows = crop[0, :, 0].astype(float), crop[:, 0, 1].astype(float)
  # Pixel j samples the source at x0 + (j + 0.5) * (x1 - x0) / size (minus 0.5 for centres).
  step_x, step_y = (cols[-1] - cols[0]) / (size - 1), (rows[-1] - rows[0]) / (size - 1)
  return (cols[0] + 0.5 - step_x / 2, rows[0] + 0.5 - step_y / 2,
          cols[-1] + 0.5 + step_x / 2, rows[-1] + 0.5 + step_y / 2)


def test_random_resized_crop_takes_the_drawn_box():
  image = _coordinates_image(50, 80)
  # Area 0.08 + 0.5 * 0.92 = 54% of 4000 px at ratio exp(0) = 1: a 46x46 box (rounded),
  # at y = int(0.25 * (50 - 46 + 1)) = 1 and x = int(0.5 * (80 - 46 + 1)) = 17.
  uniforms = np.array([[0.5, 0.5, 0.25, 0.5]] * 10)
  crop = pipeline.random_resized_crop(image, 16, uniforms)
  chex.assert_shape(crop, (16, 16, 3))
  np.testing.assert_allclose(_box_seen(crop, 16), (17, 1, 63, 47), atol=1.0)


def test_random_resized_crop_falls_back_to_the_widest_central_box():
  # No attempt fits (all of the area at ratio 4/3 is a 73x55 box, taller than the 50 px
  # image): the fallback is the central crop of the widest allowed ratio, 66.7 x 50.
  image = _coordinates_image(50, 80)
  crop = pipeline.random_resized_crop(image, 16, np.ones((10, 4)))
  np.testing.assert_allclose(_box_seen(crop, 16), (80 / 2 - 100 / 3, 0, 80 / 2 + 100 / 3, 50),
                             atol=1.0)
  # A tall image falls back to the tallest allowed ratio, 3/4, centred vertically.
  tall = pipeline.random_resized_crop(_coordinates_image(80, 50), 16, np.ones((10, 4)))
  np.testing.assert_allclose(_box_seen(tall, 16), (0, 40 - 100 / 3, 50, 40 + 100 / 3), atol=1.0)


def test_center_crop():
  flat = np.full((50, 80, 3), 7, np.uint8)
  np.testing.assert_array_equal(pipeline.center_crop(flat, 16), 7)
  # The central square of 87.5% of the shorter side: 43.75 px around (40, 25).
  crop = pipeline.center_crop(_coordinates_image(50, 80), 16)
  np.testing.assert_allclose(_box_seen(crop, 16), (40 - 21.875, 25 - 21.875, 40 + 21.875,
                                                   25 + 21.875), atol=1.0)


def test_unknown_dataset_is_a_value_error():
  for call in (lambda: pipeline.get_dataset_info('mnist', None),
               lambda: pipeline.ensure_prepared('mnist', None, None),
               lambda: pipeline.create_train_iterator('mnist', None, global_batch_size=8,
                                                      seed=0)):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; choose one of"):
      call()


def test_bad_batch_split_is_a_value_error(mock_tfds):
  with pytest.raises(ValueError, match='not divisible'):
    pipeline.create_train_iterator('cifar10', None, global_batch_size=9, seed=0,
                                   process_count=2)
  with pytest.raises(ValueError, match='only applies to imagenet2012'):
    pipeline.get_dataset_info('cifar10', None, image_size=64)


@pytest.mark.parametrize('name, command', [
    ('cifar10', 'python -m ddnn_jax.prepare cifar10 --from DIR --data_dir {d}'),
    ('cifar100', 'cifar-100-python.tar.gz'),
    ('fashion_mnist', 'apt-get install dataset-fashion-mnist` and run `python -m '
     'ddnn_jax.prepare fashion_mnist --from /usr/share/datasets/fashion-mnist '
     '--data_dir {d}`'),
    ('imagenet2012', 'tfds build imagenet2012 --manual_dir MANUAL_DIR --data_dir {d}'),
])
def test_missing_data_is_a_one_line_data_error(tmp_path, name, command):
  command = command.format(d=tmp_path)
  for call in (lambda: pipeline.get_dataset_info(name, str(tmp_path)),
               lambda: pipeline.create_eval_iterator(name, str(tmp_path),
                                                     global_batch_size=8),
               lambda: pipeline.ensure_prepared(name, str(tmp_path),
                                                str(tmp_path / 'nothing'))):
    with pytest.raises(pipeline.DataError) as info:
      call()
    message = str(info.value)
    assert '\n' not in message and command in message
    assert f'{name} is not prepared' in message
  assert not (tmp_path / 'downloads').exists()  # no download was attempted


def test_ensure_prepared_prepares_fashion_mnist(tmp_path, capsys):
  write_fake_fashion_mnist(tmp_path / 'src', num_train=20, num_test=10)
  data_dir = str(tmp_path / 'data')

  assert pipeline.ensure_prepared('fashion_mnist', data_dir, str(tmp_path / 'src')) == data_dir
  assert capsys.readouterr().out.count('\n') == 1
  assert pipeline.ensure_prepared('fashion_mnist', data_dir, None) == data_dir

  info = pipeline.get_dataset_info('fashion_mnist', data_dir)
  assert info == pipeline.DatasetInfo('fashion_mnist', 10, (28, 28, 1), 20, 10, (
      'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
      'Bag', 'Ankle boot'))
  batch = next(pipeline.create_train_iterator('fashion_mnist', data_dir,
                                              global_batch_size=4, seed=0))
  chex.assert_shape(batch['image'], (4, 28, 28, 1))
