"""Every config file and preset loads and validates; sizes and schedules are as documented."""

import csv
import importlib
import pathlib
import subprocess
import sys

import jax
import pytest

from ddnn_jax import profile
from ddnn_jax.nn import architectures, flops, models, notation
from ddnn_jax.training import config_lib, optim
from fakes import write_fake_cifar

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # Config files import configs.default, as under `python -m`.
CONFIGS = sorted(p.stem for p in (REPO / 'configs').glob('*.py') if p.stem != '__init__')


def load(spec):
  return config_lib.load_config(str(REPO / 'configs' / spec))


# Published sizes of full nets and named sub-nets: He et al. 2016, Table 6 (CIFAR
# ResNets), torchvision (ImageNet ResNets). Other sub-nets are checked by construction.
PUBLISHED_PARAMS_M = {('resnet20', 10): 0.27, ('resnet32', 10): 0.46, ('resnet44', 10): 0.66,
                      ('resnet56', 10): 0.85, ('resnet18', 1000): 11.69,
                      ('resnet34', 1000): 21.80, ('resnet50', 1000): 25.56}

PRESETS = [
    # The paper's Table 1 (CIFAR-10 and CIFAR-100) and Table 2 (ImageNet) groups.
    ('cifar10.py:r20_r16', ((3, 3, 3), (2, 2, 2))),
    ('cifar10.py:r32_r20', ((5, 5, 5), (3, 3, 3))),
    ('cifar10.py:r44_r32', ((7, 7, 7), (5, 5, 5))),
    ('cifar10.py:r56_r44', ((9, 9, 9), (7, 7, 7))),
    ('cifar10.py:r56_r44_r32', ((9, 9, 9), (7, 7, 7), (5, 5, 5))),
    ('cifar10.py:vgg16_vgg11', ((2, 2, 3, 3, 3), (1, 1, 2, 2, 2))),
    ('cifar10.py:vgg16_vgg13', ((2, 2, 3, 3, 3), (2, 2, 2, 2, 2))),
    ('cifar100.py:r20_r16', ((3, 3, 3), (2, 2, 2))),
    ('cifar100.py:r56_r44_r32', ((9, 9, 9), (7, 7, 7), (5, 5, 5))),
    ('cifar100.py:vgg16_vgg13', ((2, 2, 3, 3, 3), (2, 2, 2, 2, 2))),
    ('imagenet.py:r34_r18', ((3, 4, 6, 3), (2, 2, 2, 2))),
    ('imagenet.py:r50_r26', ((3, 4, 6, 3), (2, 2, 2, 2))),
    ('imagenet.py:r50_r32', ((3, 4, 6, 3), (2, 3, 3, 2))),
    ('imagenet.py:r50_r41', ((3, 4, 6, 3), (3, 4, 4, 2))),
    ('imagenet.py:r50_r44_r38', ((3, 4, 6, 3), (3, 4, 4, 3), (3, 3, 3, 3))),
    # Slimmable MobileNet-V1 at four widths (IPKD-TA's setting), largest first.
    ('cifar10.py:mbv1_slim', ((1, 2, 2, 6, 2), notation.SubNet((1, 2, 2, 6, 2), 0.75),
                              notation.SubNet((1, 2, 2, 6, 2), 0.5),
                              notation.SubNet((1, 2, 2, 6, 2), 0.25))),
    ('cifar100.py:mbv1_slim', ((1, 2, 2, 6, 2), notation.SubNet((1, 2, 2, 6, 2), 0.75),
                               notation.SubNet((1, 2, 2, 6, 2), 0.5),
                               notation.SubNet((1, 2, 2, 6, 2), 0.25))),
    # The other config files: the offline default and names kept from earlier releases.
    ('default.py', ((3, 3, 3), (2, 2, 2), (1, 1, 1))),
    ('fmnist20k.py', ((3, 3, 3), (2, 2, 2), (1, 1, 1))),  # The evidence study's regime.
    ('cifar10_resnet20.py', ((3, 3, 3), (2, 2, 2), (1, 1, 1))),
    ('cifar10_resnet56.py', ((9, 9, 9), (7, 7, 7), (5, 5, 5))),
    ('cifar100_resnet56.py', ((9, 9, 9), (7, 7, 7), (5, 5, 5))),
    ('cifar10_vgg16.py', ((2, 2, 3, 3, 3), (2, 2, 2, 2, 2), (1, 1, 2, 2, 2))),
    ('imagenet_r50.py', ((3, 4, 6, 3), (3, 4, 4, 3), (3, 3, 3, 3))),
    ('imagenet_r34.py', ((3, 4, 6, 3), (2, 2, 2, 2))),
]


def test_every_config_file_and_group_is_covered():
  files = {spec.split(':')[0][:-3] for spec, _ in PRESETS}
  assert files == set(CONFIGS)
  for name in ('cifar10', 'imagenet'):
    module = importlib.import_module(f'configs.{name}')
    covered = {spec.split(':')[1] for spec, _ in PRESETS if spec.startswith(f'{name}.py:')}
    assert covered == set(module.GROUPS), name


def _untyped_none_fields(config, prefix=''):
  """Fields holding None with no type: `--config.x=...` cannot override them."""
  for key, value in config.items():
    if hasattr(value, 'items'):
      yield from _untyped_none_fields(value, f'{prefix}{key}.')
    elif value is None and config.get_type(key) is type(None):
      yield prefix + key


@pytest.mark.parametrize('spec', [spec for spec, _ in PRESETS])
def test_every_field_of_every_preset_can_be_overridden(spec):
  assert list(_untyped_none_fields(load(spec))) == []


@pytest.mark.parametrize('spec,depths', PRESETS)
def test_presets_validate_and_profile_their_sizes(spec, depths, capsys):
  config = load(spec)
  config_lib.validate(config)
  assert config_lib.depths_of(config) == depths
  profile.main(['--config', str(REPO / 'configs' / spec)])
  table = capsys.readouterr().out
  lines = [line for line in table.splitlines() if line[:3] in {f'| {d[0]}' for d in depths}]
  assert [line.split(' | ')[0][2:] for line in lines] == [notation.format_depth(d) for d in depths]
  printed = [float(line.split(' | ')[2]) for line in lines]
  imagenet = config.data.dataset == 'imagenet2012'
  classes = {'cifar100': 100, 'imagenet2012': 1000}.get(config.data.dataset, 10)
  for depth, params_m in zip(depths, printed, strict=True):
    name = architectures.depth_label(config.model.arch, depth)
    if (name, classes) in PUBLISHED_PARAMS_M:
      assert params_m == pytest.approx(PUBLISHED_PARAMS_M[name, classes], rel=0.01), name
  # A sub-net's parameters are the full net's minus the blocks it skips.
  model = models.create_model(config.model.arch, classes)
  size = 224 if imagenet else 32
  shape = (size, size, 1 if config.data.dataset == 'fashion_mnist' else 3)
  full = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, *shape)),
                                           train=False))['params']
  for depth, params_m in zip(depths, printed, strict=True):
    if notation.width_of(depth) != 1.0:
      continue  # Narrower widths: tests/test_width.py counts their channels.
    used = sum(flops.count_params(tree) for name, tree in full.items()
               if not name.startswith('stage') or int(name.split('_block')[1]) <
               depth[int(name[5:name.index('_')])])
    assert params_m == pytest.approx(used / 1e6, abs=5e-4), depth


@pytest.mark.parametrize('spec,message', [
    ('cifar10.py:r99', "unknown group 'r99'; known groups: r20_r16,"),
    ('imagenet.py:r50_r20', "unknown group 'r50_r20'; known groups: r34_r18,"),
    ('imagenet.py:r50_r26,v9', "unknown hardware preset 'v9'"),
])
def test_unknown_presets_name_the_known_ones(spec, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    load(spec)


def test_imagenet_schedule_scales_with_the_global_batch():
  config = load('imagenet_r50.py')
  lr = optim.create_learning_rate_fn(config, steps_per_epoch=10)
  peak = 0.1 * 1024 / 256
  assert float(lr(0)) == 0.0
  assert float(lr(25)) == pytest.approx(peak / 2)  # Linear warm-up over 5 epochs.
  assert float(lr(50)) == pytest.approx(peak)
  assert float(lr(50 + 425)) == pytest.approx(peak / 2, rel=1e-3)  # Cosine midpoint.
  assert float(lr(900)) == pytest.approx(0.0, abs=1e-6)
  v3 = optim.create_learning_rate_fn(load('imagenet.py:r50_r26,v3_32'), steps_per_epoch=10)
  assert float(v3(50)) == pytest.approx(0.1 * 2048 / 256)


def test_cifar_step_schedule():
  lr = optim.create_learning_rate_fn(load('cifar10.py:r56_r44'), steps_per_epoch=10)
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
       '--config.train.num_epochs=2', '--config.optim.decay_epochs=(1,)'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = list(csv.DictReader(open(workdir / 'results.csv')))
  assert [(r['name'], r['depth']) for r in rows] == [
      ('vgg16', '2-2-3-3-3'), ('vgg13', '2-2-2-2-2'), ('vgg11', '1-1-2-2-2')]
  assert (tmp_path / 'tfds' / 'cifar10').is_dir()  # Prepared from the archive by itself.
