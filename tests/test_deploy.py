"""After training: evaluate any depth, recalibrate BN, search, export, switch depth, predict.

One small EKD run of the default config on real Fashion-MNIST (session fixture) is
evaluated, searched, exported and served by the tools, as a user runs them.
"""

import csv
import json
import shutil
import subprocess
import sys
import textwrap

import chex
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ddnn_jax.core import errors
from ddnn_jax.data import pipeline
from ddnn_jax.deploy import bn_calibration, depth_search, dynamic, evaluation, latency, trained_run
from ddnn_jax.nn import notation
from ddnn_jax.training import config_lib, optim, trainer
from fakes import write_fake_cifar
from jobs import assert_one_line_error, run_main, run_module

pytestmark = pytest.mark.slow  # A real training run, then the tools as subprocesses.

VALIDATION, CALIB = 1000, 500


@pytest.fixture(scope='module')
def trained(tmp_path_factory, fashion_mnist_dir):
  """ResNet-20 (width 8) with [2,2,2] and [1,1,1], EKD, 2 epochs on 12,800 images."""
  workdir = tmp_path_factory.mktemp('deploy') / 'run'
  result = run_main(workdir, f'--config.data.data_dir={fashion_mnist_dir}',
                    '--config.model.width=8', '--config.train.num_epochs=2',
                    '--config.data.train_subset=12800', '--config.data.eval_subset=2000',
                    f'--config.data.validation_examples={VALIDATION}', optimized=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope='module')
def run(trained):
  return trained_run.load_run(str(trained))


def tool(name, *args):
  return run_module(name, *args, optimized=True)


def test_every_depth_configuration_is_a_candidate(run):
  depths = run.all_depths()
  assert len(depths) == 27 and len(set(depths)) == 27
  assert depths[0] == (3, 3, 3) and depths[-1] == (1, 1, 1)
  assert set(run.trained_depths) == {(3, 3, 3), (2, 2, 2), (1, 1, 1)}
  assert len(trained_run.enumerate_depths((9, 9, 9))) == 729
  assert len(trained_run.enumerate_depths((3, 4, 6, 3))) == 216


def test_recalibration_changes_only_batch_norm_statistics(run):
  depth = (2, 1, 3)
  params_before = jax.tree.map(np.copy, run.params)
  batches = bn_calibration.calibration_batches(run, CALIB, batch_size=128)  # 4 batches.
  assert [int(b['mask'].sum()) for b in batches] == [128, 128, 128, 116]  # The rest is padding.
  stats = bn_calibration.recalibrate(run, depth, batches)
  chex.assert_trees_all_equal(run.params, params_before)  # Parameters untouched.
  # Statistics of exactly the depth's BatchNorms, in the layout of its 'batch_stats'.
  shapes = jax.eval_shape(lambda x: run.model.init(jax.random.key(0), x, depth=depth,
                                                   train=False), np.zeros((1, 28, 28, 1)))
  chex.assert_trees_all_equal_shapes(stats, shapes['batch_stats'])
  # Exact over the whole set (not a running average): the stem BatchNorm's input does
  # not depend on other BatchNorms, so its statistics are those of the stem conv's output.
  outputs = []

  def keep_stem_conv(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.module.name == 'stem_conv' and context.method_name == '__call__':
      outputs.append(np.asarray(out, np.float64))
    return out

  with nn.intercept_methods(keep_stem_conv):
    for batch in batches:
      run.model.apply({'params': run.params, 'batch_stats': run.batch_stats['3-3-3']},
                      batch['image'][batch['mask'] > 0], depth=depth, train=False)
  conv = np.concatenate(outputs).reshape(-1, 8)
  assert len(conv) == CALIB * 28 * 28
  np.testing.assert_allclose(stats['stem_bn']['mean'], conv.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats['stem_bn']['var'], conv.var(0), rtol=1e-4, atol=1e-5)
  # Not the statistics of any single batch.
  assert not np.allclose(stats['stem_bn']['mean'], conv[:128 * 784].mean(0), rtol=1e-4)


def test_recalibrated_bn_beats_the_full_nets_statistics(run):
  validation = trained_run.SplitCache(run, 'validation', 250)
  calibration = bn_calibration.calibration_batches(run, CALIB)
  gains = []
  for depth in [(1, 3, 3), (2, 1, 3), (3, 1, 1)]:
    recalibrated = bn_calibration.recalibrate(run, depth, calibration)
    gains.append(trained_run.accuracy(run, depth, recalibrated, validation) -
                 trained_run.accuracy(run, depth, run.full_net_stats(depth), validation))
  assert np.mean(gains) > 0, gains


@pytest.fixture(scope='module')
def evaluated(trained):
  """``python -m ddnn_jax.evaluate`` of the trained depths and [2,1,3] (recalibrated)."""
  result = tool('evaluate', '--workdir', trained, '--depths', 'trained,2-1-3,resnet20',
                '--split', 'validation', '--calib_examples', CALIB, '--full_net_bn')
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_evaluate_writes_the_table_and_latencies(trained, evaluated):
  result = evaluated
  rows = list(csv.DictReader(open(trained / 'evaluation' / 'validation.csv')))
  assert [r['depth'] for r in rows] == ['3-3-3', '2-2-2', '2-1-3', '1-1-1']
  assert [r['bn'] for r in rows] == ['own', 'own', 'recalibrated', 'own']
  for r in rows:
    assert 0 < float(r['top1_error']) < 50, r  # Chance is 90%.
    assert int(r['params']) > 0 and int(r['flops']) > 0
  assert rows[2]['top1_error_full_net_bn'] and not rows[0]['top1_error_full_net_bn']
  measured = json.loads((trained / 'latency.json').read_text())
  assert list(measured) == [latency.backend_key()]
  assert set(measured['cpu']) >= {'3-3-3', '2-2-2', '2-1-3', '1-1-1'}
  for row in measured['cpu'].values():
    assert row['batch_1_ms'] > 0 and row['batch_64_ms'] > row['batch_1_ms']
  assert '| 2-1-3 | - | 6 |' in result.stdout
  assert (trained / 'evaluation' / 'validation.png').stat().st_size > 1000
  # A second evaluation of other depths keeps these rows.
  again = tool('evaluate', '--workdir', trained, '--depths', '3-3-1', '--split', 'validation',
               '--calib_examples', CALIB)
  assert again.returncode == 0, again.stderr[-3000:]
  rows = list(csv.DictReader(open(trained / 'evaluation' / 'validation.csv')))
  assert len(rows) == 5 and '3-3-1' in {r['depth'] for r in rows}


def _dominated(point, others):
  return any(o[0] <= point[0] and o[1] <= point[1] and o != point for o in others)


def test_search_front_is_a_true_front_and_progressive_finds_it(trained, run):
  result = tool('search', '--workdir', trained, '--max_flops', '5M', '--max_latency_ms', '50',
                '--calib_examples', CALIB)
  assert result.returncode == 0, result.stderr[-3000:]
  out = trained / 'search'
  rows = list(csv.DictReader(open(out / 'candidates.csv')))
  assert len(rows) == 27
  pareto = list(csv.DictReader(open(out / 'pareto.csv')))
  for front, key in (('flops', 'flops'), ('latency', 'latency_ms_batch_1')):
    points = [(float(r[key]), float(r['top1_error'])) for r in rows]
    on_front = [(float(r[key]), float(r['top1_error'])) for r in pareto if r['front'] == front]
    assert on_front, front
    # No candidate beats a front point on both axes; every other candidate is beaten.
    for p in on_front:
      assert not _dominated(p, points), (front, p)
    for p in points:
      assert p in on_front or _dominated(p, on_front), (front, p)
  assert (out / 'pareto.png').stat().st_size > 1000
  best = [line for line in result.stdout.splitlines() if line.startswith('best <= 5M FLOPs: ')]
  fitting = [r for r in rows if int(r['flops']) <= 5e6]
  want = min(fitting, key=lambda r: (float(r['top1_error']), int(r['flops'])))
  assert best and best[0].startswith(f'best <= 5M FLOPs: {want["depth"]} with '), best

  # The progressive search on the same space, from the same measurements.
  measured = {evaluation.row_depth(r): (float(r['top1_error']), float(r['flops'])) for r in rows}
  exhaustive_front = {evaluation.row_depth(rows[i]) for i in evaluation.pareto_front(
      [(s[1], s[0]) for s in map(measured.get, map(evaluation.row_depth, rows))])}
  # Beam 2 (the CLI default is 4): fewer evaluations than exhaustive, >= 80% of its front.
  # Beam 1 is plain greedy and cheaper still; it may miss front points (2 of 7 once here).
  found = {beam: depth_search.progressive_search(
      run.full_depth, lambda depths: {d: measured[d] for d in depths}, beam) for beam in (1, 2)}
  assert len(found[1]) < len(found[2]) < 27, {beam: len(f) for beam, f in found.items()}
  found = found[2]
  depths = list(found)
  points = [(found[d][1], found[d][0]) for d in depths]
  front = {depths[i] for i in evaluation.pareto_front(points)}
  assert len(front & exhaustive_front) >= 0.8 * len(exhaustive_front), (front, exhaustive_front)


def test_progressive_search_through_the_command_line(trained):
  result = tool('search', '--workdir', trained, '--max_candidates', '10', '--beam', '1',
                '--calib_examples', CALIB)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'progressive' in result.stdout
  rows = list(csv.DictReader(open(trained / 'search' / 'candidates.csv')))
  assert 3 <= len(rows) < 27 and rows[0]['depth'] == '3-3-3' and rows[-1]['depth'] == '1-1-1'


def test_export_runs_in_a_fresh_process_with_only_its_stated_requirements(trained, run, tmp_path):
  sizes = {}
  pixels = np.random.default_rng(0).uniform(0, 255, (7, 28, 28, 1)).astype(np.float32)
  np.save(tmp_path / 'pixels.npy', pixels)
  for depth in ('2-1-3', '3-3-3'):
    out = tmp_path / depth
    result = tool('export', '--workdir', trained, '--depth', depth, '--out', out,
                  '--calib_examples', CALIB)
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = json.loads((out / 'metadata.json').read_text())
    assert metadata['depth'] == [int(n) for n in depth.split('-')]
    assert metadata['class_names'][0] == 'T-shirt/top' and len(metadata['class_names']) == 10
    assert metadata['input']['shape'] == ['batch', 28, 28, 1]
    assert metadata['jax_version'] == jax.__version__
    sizes[depth] = sum(f.stat().st_size for f in out.iterdir())
    # Only what metadata.json lists may be imported: every other installed package
    # (ddnn_jax, flax, orbax, etils, ...) looks absent to this process.
    needed = metadata['requirements']['imports']
    assert needed == ['jax', 'jaxlib', 'numpy', 'ml_dtypes', 'opt_einsum', 'scipy', 'flatbuffers']
    loader = textwrap.dedent(f'''
        import pkgutil, sys
        allowed = {set(needed)!r}
        for module in pkgutil.iter_modules():
          if (module.name not in allowed and module.name not in sys.stdlib_module_names
              and not module.name.startswith('_')):
            sys.modules[module.name] = None
        for name in ('ddnn_jax', 'flax', 'orbax', 'optax', 'etils'):
          sys.modules[name] = None
        import jax, numpy as np
        exported = jax.export.deserialize(open('{out}/model.jax', 'rb').read())
        variables = dict(np.load('{out}/variables.npz'))
        pixels = np.load('{tmp_path}/pixels.npy')
        for b in (1, 7):
          np.save(f'{out}/logits{{b}}.npy', np.asarray(exported.call(variables, pixels[:b])))
        loaded = {{m.split('.')[0] for m, v in sys.modules.items() if v is not None}}
        assert not {{'flax', 'ddnn_jax', 'optax', 'orbax'}} & loaded, sorted(loaded)
    ''')
    fresh = subprocess.run([sys.executable, '-c', loader], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    d = run.resolve(depth)
    stats, _ = bn_calibration.stats_for(run, d, CALIB)
    want = np.asarray(trained_run.logits_fn(run.model, d)(
        run.used_params(d), stats, pipeline.normalize(pixels, run.spec)))
    for b in (1, 7):
      got = np.load(out / f'logits{b}.npy')
      chex.assert_shape(got, (b, 10))
      np.testing.assert_allclose(got, want[:b], rtol=1e-5, atol=1e-5)
  assert sizes['2-1-3'] < sizes['3-3-3'], sizes


def test_dynamic_model_switches_depth_without_recompiling(trained, evaluated):
  model = dynamic.DynamicModel.load(str(trained), ['resnet20', '2-2-2', '2-1-3'],
                                    calib_examples=CALIB, batch_size=4)
  pixels = np.random.default_rng(1).uniform(0, 255, (6, 28, 28, 1))
  first = {}
  for _ in range(3):
    for depth in model.depths:
      first.setdefault(depth, model.predict(pixels, depth=depth).probabilities)
      np.testing.assert_array_equal(model.predict(pixels, depth=depth).probabilities,
                                    first[depth])
  assert model.traces == {(3, 3, 3): 1, (2, 2, 2): 1, (2, 1, 3): 1}
  assert not np.allclose(first[(3, 3, 3)], first[(2, 1, 3)])
  # The latency budget picks the most accurate depth that fits (evaluated above).
  assert set(model.errors) == set(model.latencies) == set(model.depths)
  slowest = max(model.latencies.values())
  assert model.choose(slowest) == min(model.depths, key=lambda d: model.errors[d])
  fastest = min(model.depths, key=model.latencies.get)
  assert model.predict(pixels, latency_ms=model.latencies[fastest]).depth == fastest
  with pytest.raises(errors.UsageError, match='no depth runs within'):
    model.choose(model.latencies[fastest] / 2)


def test_predict_classifies_fashion_mnist_pngs(trained, evaluated, fashion_mnist_dir, tmp_path):
  source = tfds.data_source('fashion_mnist', split='test', data_dir=fashion_mnist_dir,
                            download=False)
  paths, labels = [], []
  for i in range(20):
    example = source[i]
    path = tmp_path / f'test{i}.png'
    Image.fromarray(example['image'][..., 0]).save(path)
    paths.append(str(path))
    labels.append(int(example['label']))
  names = trained_run.load_run(str(trained)).class_names()
  result = tool('predict', '--workdir', trained, '--images', *paths, '--out',
                tmp_path / 'predictions.csv')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines()[0] == 'depth 3-3-3'
  rows = list(csv.DictReader(open(tmp_path / 'predictions.csv')))
  assert len(rows) == 20
  correct = sum(row['top1'] == names[label] for row, label in zip(rows, labels, strict=True))
  assert correct >= 12, correct  # The run's accuracy is about 80%: most, not all.
  for path, row in zip(paths, rows, strict=True):
    line = [ln for ln in result.stdout.splitlines() if ln.startswith(f'{path}: ')]
    assert line and line[0].startswith(f'{path}: {row["top1"]} ')
    assert len(line[0].split(', ')) == 5  # Top 5 with probabilities.
  by_latency = tool('predict', '--workdir', trained, '--images', paths[0], '--latency_ms', '1000')
  assert by_latency.returncode == 0, by_latency.stderr[-3000:]
  assert 'most accurate within 1000 ms' in by_latency.stdout.splitlines()[0]


@pytest.mark.parametrize('module,args,message', [
    ('evaluate', ['--depths', '2-2-9'], 'stage 2 has 9 blocks but resnet20 3-3-3 has only 3'),
    ('evaluate', ['--depths', 'resnet99'], "unknown depth 'resnet99'"),
    ('evaluate', ['--depths', '2-2'], 'has 2 stages but resnet20 has 3'),
    ('evaluate', ['--step', '7'], 'has no checkpoint 7; it has '),
    ('evaluate', ['--step', 'first'], "argument --step: 'latest', 'best' or a step number"),
    ('search', ['--max_flops', '1K'], '--max_flops 0.001M is below the smallest depth, 1-1-1'),
    ('search', ['--max_latency_ms', '0.000001'], 'is below the smallest depth, 1-1-1, which '
     'takes'),
    ('search', ['--max_flops', 'lots'], 'a number of multiply-adds like 20M or 1.5G'),
    ('export', ['--depth', '4-1-1', '--out', 'OUT'], 'stage 0 has 4 blocks'),
    ('predict', ['--images', 'MISSING.png'], 'MISSING.png is not a file'),
    ('predict', ['--images', 'NOT_AN_IMAGE.png'], 'NOT_AN_IMAGE.png is not a readable image'),
    ('predict', ['--images', 'NOT_AN_IMAGE.png', '--depth', '1-1-1', '--latency_ms', '3'],
     'not allowed with argument'),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(trained, tmp_path, module, args,
                                                         message):
  (tmp_path / 'NOT_AN_IMAGE.png').write_text('not a png')
  args = [str(tmp_path / a) if a in ('OUT', 'MISSING.png', 'NOT_AN_IMAGE.png') else a
          for a in args]
  before = sorted(p.relative_to(trained) for p in trained.rglob('*'))
  result = tool(module, '--workdir', trained, *args)
  assert_one_line_error(result, message)
  assert sorted(p.relative_to(trained) for p in trained.rglob('*')) == before
  assert not (tmp_path / 'OUT').exists()


def test_tools_refuse_a_workdir_without_a_checkpoint_and_a_busy_export_dir(trained, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'config.json').write_text((trained / 'config.json').read_text())
  for module, extra in (('evaluate', []), ('search', []), ('export', ['--depth', '1-1-1',
                                                                      '--out', tmp_path / 'x']),
                        ('predict', ['--images', tmp_path / 'none.png'])):
    if module == 'predict':
      Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / 'none.png')
    result = tool(module, '--workdir', empty, *extra)
    assert_one_line_error(result, 'holds no checkpoint: train first')
  assert_one_line_error(tool('evaluate', '--workdir', tmp_path / 'nowhere'),
                        'is not a ddnn_jax workdir')
  busy = tmp_path / 'busy'
  busy.mkdir()
  (busy / 'keep.txt').write_text('mine')
  result = tool('export', '--workdir', trained, '--depth', '1-1-1', '--out', busy)
  assert_one_line_error(result, f'--out {busy} exists and is not empty (use --force')
  assert [p.name for p in busy.iterdir()] == ['keep.txt']
  forced = tool('export', '--workdir', trained, '--depth', '1-1-1', '--out', busy, '--force')
  assert forced.returncode == 0, forced.stderr[-3000:]
  assert sorted(p.name for p in busy.iterdir()) == ['metadata.json', 'model.jax', 'variables.npz']


def test_init_from_starts_a_new_depth_set_from_the_trained_parameters(trained, run):
  config = ml_collections.ConfigDict(json.loads((trained / 'config.json').read_text()))
  config.unlock()
  config.model.subnets = ((2, 1, 3), (1, 1, 1))
  config.init_from = str(trained)
  config.model.subnets = tuple(tuple(d) for d in config.model.subnets)
  run_setup = config_lib.setup(config)
  lr = optim.create_learning_rate_fn(config, run_setup.steps_per_epoch)
  state = trainer.initial_state(config, run_setup, lr)
  chex.assert_trees_all_equal(jax.device_get(state.params), run.params)
  # Depths both runs train keep their statistics; a new one starts fresh.
  chex.assert_trees_all_equal(jax.device_get(state.batch_stats['1-1-1']),
                              run.batch_stats['1-1-1'])
  assert not np.allclose(state.batch_stats['2-1-3']['stem_bn']['mean'],
                         run.batch_stats['3-3-3']['stem_bn']['mean'])
  assert notation.depth_name((2, 1, 3)) in state.batch_stats


def _depths_in_files(workdir):
  """Every (depth as written, file) in the run's CSV and JSON files."""
  found = set()
  for path in [workdir / 'results.csv', *sorted(workdir.glob('evaluation/*.csv')),
               *sorted(workdir.glob('search/*.csv'))]:
    found |= {(row['depth'], path.name) for row in csv.DictReader(open(path))}
  summary = json.loads((workdir / 'search' / 'summary.json').read_text())
  found |= {(depth, 'summary.json') for depth in [
      *summary['flops_front'], *summary['latency_front'],
      *(b['depth'] for b in summary['best'].values() if b)]}
  found |= {(depth, 'latency.json')
            for depth in json.loads((workdir / 'latency.json').read_text())['cpu']}
  return found


def test_every_written_depth_round_trips_through_every_depth_flag(trained, run, evaluated,
                                                                  tmp_path):
  tool('search', '--workdir', trained, '--max_flops', '5M', '--calib_examples', CALIB)
  found = _depths_in_files(trained)
  assert len({text for text, _ in found}) == 27
  assert {source for _, source in found} >= {'results.csv', 'validation.csv', 'candidates.csv',
                                             'pareto.csv', 'summary.json', 'latency.json'}
  for text, source in sorted(found):
    depth = notation.parse_depth(text)
    assert notation.format_depth(depth) == text, (text, source)  # One notation everywhere.
    assert evaluation.parse_depths(run, text) == [depth]  # evaluate --depths, DynamicModel.load.
    assert run.resolve(text) == depth  # export --depth, predict --depth.
  # What export and predict write reads back the same way.
  exported = tool('export', '--workdir', trained, '--depth', '[2, 1, 3]', '--out', tmp_path / 'e',
                  '--calib_examples', CALIB)
  assert exported.returncode == 0, exported.stderr[-3000:]
  metadata = json.loads((tmp_path / 'e' / 'metadata.json').read_text())
  assert run.resolve(metadata['depth_name']) == (2, 1, 3) == tuple(metadata['depth'])
  image = tmp_path / 'x.png'
  Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
  predicted = tool('predict', '--workdir', trained, '--images', image, '--depth', '2,1,3',
                   '--out', tmp_path / 'p.csv')
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  row, = csv.DictReader(open(tmp_path / 'p.csv'))
  assert row['depth'] == '2-1-3' and run.resolve(row['depth']) == (2, 1, 3)
  # A depth pasted from an older table, through the command line.
  pasted = tool('evaluate', '--workdir', trained, '--depths', '[2,1,3],resnet20', '--split',
                'validation', '--calib_examples', CALIB)
  assert pasted.returncode == 0, pasted.stderr[-3000:]
  assert '| 2-1-3 | - | 6 |' in pasted.stdout and '| 3-3-3 | resnet20 | 9 |' in pasted.stdout


def test_a_copied_workdir_without_its_data_predicts_and_exports_class_names(trained, tmp_path):
  copy = tmp_path / 'copied'
  shutil.copytree(trained, copy, ignore=shutil.ignore_patterns('bn_calibration'))
  config = json.loads((copy / 'config.json').read_text())
  config['data']['data_dir'] = str(tmp_path / 'no_data_here')
  (copy / 'config.json').write_text(json.dumps(config))
  image = tmp_path / 'x.png'
  Image.fromarray(np.full((28, 28), 200, np.uint8)).save(image)
  env = {'TFDS_DATA_DIR': str(tmp_path / 'empty_tfds')}
  predicted = run_module('predict', '--workdir', copy, '--images', image, '--depth', '2-2-2',
                         optimized=True, extra_env=env)
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  names = set(json.loads((trained / 'dataset.json').read_text())['class_names'])
  assert len(names) == 10 and predicted.stdout.splitlines()[1].split(': ')[1].split(' ')[0] in {
      n.split(' ')[0] for n in names}
  exported = run_module('export', '--workdir', copy, '--depth', '1-1-1', '--out', tmp_path / 'e',
                        optimized=True, extra_env=env)
  assert exported.returncode == 0, exported.stderr[-3000:]
  metadata = json.loads((tmp_path / 'e' / 'metadata.json').read_text())
  assert metadata['class_names'][9] == 'Ankle boot'
  # A depth the run did not train needs training images for its BN statistics; an
  # evaluation needs its split: both say what is missing.
  for module, args in (('export', ['--depth', '2-1-1', '--out', tmp_path / 'f']),
                       ('evaluate', ['--split', 'validation'])):
    result = run_module(module, '--workdir', copy, *args, optimized=True, extra_env=env)
    assert_one_line_error(result, "needs the run's data: fashion_mnist is not prepared",
                          'no_data_here')
  assert not (tmp_path / 'f').exists()


@pytest.fixture(scope='module')
def paper_preset_run(tmp_path_factory):
  """A tiny run of the paper preset configs/cifar10.py:r20_r16 (no validation split) on a
  generated CIFAR-10 archive."""
  tmp = tmp_path_factory.mktemp('preset')
  write_fake_cifar(tmp / 'downloads', 'cifar10', num_train=64, num_test=32)
  workdir = tmp / 'run'
  result = run_main(workdir, '--config=configs/cifar10.py:r20_r16',
                    f'--config.data.source_dir={tmp / "downloads"}',
                    f'--config.data.data_dir={tmp / "tfds"}', '--config.model.width=4',
                    '--config.train.batch_size=16', '--config.train.eval_batch_size=16',
                    '--config.train.num_epochs=1', '--config.optim.decay_epochs=()',
                    optimized=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_search_on_the_test_split_says_so_in_every_output(paper_preset_run):
  workdir = paper_preset_run
  refused = tool('search', '--workdir', workdir, '--calib_examples', 32)
  assert_one_line_error(refused, 'held out no validation examples', '--split test')
  result = tool('search', '--workdir', workdir, '--split', 'test', '--calib_examples', 32,
                '--max_candidates', 4, '--beam', 1, '--max_flops', '1G')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'warning: the depths and their fronts are selected on the TEST split' in result.stderr
  out = workdir / 'search'
  for name in ('candidates.csv', 'pareto.csv'):
    rows = list(csv.DictReader(open(out / name)))
    assert rows and {r['selected_on'] for r in rows} == {'test'}, name
  assert 'selected on the TEST split: not held out' in (out / 'pareto.md').read_text()
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['split'] == 'test' and summary['held_out'] is False
  assert 'TEST split' in summary['note'] and 'TEST split' in result.stdout.splitlines()[0]
  assert (out / 'pareto.png').stat().st_size > 1000
