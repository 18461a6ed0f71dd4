"""Every config file loads and validates; schedules are what the docstrings say."""

import csv
import importlib
import pathlib
import subprocess
import sys

import pytest

from ddnn_jax import train
from test_prepare import write_fake_cifar

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # Config files import configs.default, as under `python -m`.
CONFIGS = sorted(p.stem for p in (REPO / 'configs').glob('*.py') if p.stem != '__init__')


def load(name, *args):
  return importlib.import_module(f'configs.{name}').get_config(*args)


@pytest.mark.parametrize('name,depths', [
    ('default', ((3, 3, 3), (2, 2, 2), (1, 1, 1))),
    ('cifar10_resnet20', ((3, 3, 3), (2, 2, 2), (1, 1, 1))),
    ('cifar10_resnet56', ((9, 9, 9), (7, 7, 7), (5, 5, 5))),
    ('cifar100_resnet56', ((9, 9, 9), (7, 7, 7), (5, 5, 5))),
    ('cifar10_vgg16', ((2, 2, 3, 3, 3), (2, 2, 2, 2, 2), (1, 1, 2, 2, 2))),
    ('imagenet_r50', ((3, 4, 6, 3), (3, 4, 4, 3), (3, 3, 3, 3))),
    ('imagenet_r34', ((3, 4, 6, 3), (2, 2, 2, 2))),
])
def test_configs_validate(name, depths):
  assert name in CONFIGS
  _, got = train._check_config(load(name))  # pylint: disable=protected-access
  assert got == depths


def test_every_config_file_is_covered():
  assert set(CONFIGS) == {'default', 'cifar10_resnet20', 'cifar10_resnet56', 'cifar100_resnet56',
                          'cifar10_vgg16', 'imagenet_r50', 'imagenet_r34'}


def test_imagenet_schedule_scales_with_the_global_batch():
  config = load('imagenet_r50')
  lr = train.create_learning_rate_fn(config, steps_per_epoch=10)
  peak = 0.1 * 1024 / 256
  assert float(lr(0)) == 0.0
  assert float(lr(25)) == pytest.approx(peak / 2)  # Linear warm-up over 5 epochs.
  assert float(lr(50)) == pytest.approx(peak)
  assert float(lr(50 + 425)) == pytest.approx(peak / 2, rel=1e-3)  # Cosine midpoint.
  assert float(lr(900)) == pytest.approx(0.0, abs=1e-6)
  v3 = train.create_learning_rate_fn(load('imagenet_r50', 'v3_32'), steps_per_epoch=10)
  assert float(v3(50)) == pytest.approx(0.1 * 2048 / 256)
  with pytest.raises(ValueError, match='unknown hardware preset'):
    load('imagenet_r50', 'v9')


def test_cifar_step_schedule():
  lr = train.create_learning_rate_fn(load('cifar10_resnet56'), steps_per_epoch=10)
  assert [float(lr(s)) for s in (0, 999, 1000, 1499, 1500, 1999)] == pytest.approx(
      [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


@pytest.mark.slow
def test_cifar10_vgg16_config_trains_end_to_end(tmp_path):
  source = tmp_path / 'downloads'
  write_fake_cifar(source, 'cifar10', num_train=64, num_test=24)  # cifar-10-python.tar.gz
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'ddnn_jax.main', '--config=configs/cifar10_vgg16.py',
       f'--workdir={workdir}', f'--config.data.source_dir={source}',
       f'--config.data.data_dir={tmp_path / "tfds"}', '--config.model.width=4',
       '--config.train.batch_size=16', '--config.train.eval_batch_size=16',
       '--config.train.num_epochs=2'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = list(csv.DictReader(open(workdir / 'results.csv')))
  assert [(r['name'], r['depth']) for r in rows] == [
      ('vgg16', '[2,2,3,3,3]'), ('vgg13', '[2,2,2,2,2]'), ('vgg11', '[1,1,2,2,2]')]
  assert (tmp_path / 'tfds' / 'cifar10').is_dir()  # Prepared from the archive by itself.
