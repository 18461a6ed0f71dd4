"""Confidence cascades: calibration, thresholds, the simulation against the real early
exit, the command line, DynamicModel, predict and export."""

import csv
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from ddnn_jax.deploy import bn_calibration, dynamic, early_exit, trained_run
from ddnn_jax.nn import notation
from jobs import SMALL_FASHION_MNIST, assert_one_line_error, run_main, run_module


def _overconfident(n=4000, seed=0):
  """Logits that are right 70% of the time but claim ~99%: a case temperature must fix."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n)
  predicted = np.where(rng.uniform(size=n) < 0.7, labels, rng.integers(0, 10, n))
  logits = rng.normal(0, 0.5, (n, 10))
  logits[np.arange(n), predicted] += 8.0
  return logits.astype(np.float32), labels


def test_temperature_lowers_ece_on_an_overconfident_model():
  logits, labels = _overconfident()
  t = early_exit.fit_temperature(logits, labels)
  before, after = early_exit.ece(logits, labels), early_exit.ece(logits, labels, t)
  assert t > 2  # Overconfident: softened.
  assert before > 20 and after < before / 4, (before, after)
  assert early_exit.nll(logits, labels, t) < early_exit.nll(logits, labels, 1.0)


def test_temperature_recovers_the_one_that_made_the_labels():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 3, (20000, 5))
  p = early_exit.softmax(logits, 2.0)
  labels = np.array([rng.choice(5, p=row) for row in p])
  assert early_exit.fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.1)


@pytest.mark.parametrize('score', early_exit.SCORES)
def test_scores_are_in_the_unit_interval_and_order_confidence(score):
  sure = np.array([[10.0, 0.0, 0.0]])
  unsure = np.array([[1.0, 0.9, 0.8]])
  uniform = np.zeros((1, 3))
  values = [early_exit.confidence(z, 1.0, score)[0] for z in (sure, unsure, uniform)]
  assert 1 >= values[0] > values[1] > values[2] >= 0, values


def _random_cascade(stages=3, n=500, seed=0):
  rng = np.random.default_rng(seed)
  logits = [rng.normal(0, 2, (n, 10)).astype(np.float32) for _ in range(stages)]
  labels = rng.integers(0, 10, n)
  depths = [(1, 1, 1), (2, 2, 2), (3, 3, 3)][:stages]
  return logits, labels, depths


@pytest.mark.parametrize('score', early_exit.SCORES)
def test_threshold_one_is_the_last_stage_and_zero_the_first(score):
  logits, _, depths = _random_cascade()
  temps = (1.0, 1.0, 1.0)
  last = early_exit.Cascade(tuple(depths), (1.0, 1.0), temps, score)
  stage, out = early_exit.simulate(last, logits)
  assert (stage == 2).all()
  np.testing.assert_array_equal(out, logits[2])
  first = early_exit.Cascade(tuple(depths), (0.0, 0.5), temps, score)
  stage, out = early_exit.simulate(first, logits)
  assert (stage == 0).all()
  np.testing.assert_array_equal(out, logits[0])


def test_sweep_agrees_with_the_simulation_and_counts_costs():
  logits, labels, depths = _random_cascade()
  temps = (0.7, 1.3, 1.0)
  grids = [np.array([0.2, 0.5]), np.array([0.3, 0.9])]
  swept = early_exit.sweep(logits, labels, temps, 'maxprob', grids)
  assert len(swept) == 4
  for thresholds, fractions, error in swept:
    cascade = early_exit.Cascade(tuple(depths), thresholds, temps, 'maxprob')
    stage, out = early_exit.simulate(cascade, logits)
    np.testing.assert_allclose(fractions, np.bincount(stage, minlength=3) / len(stage))
    assert error == pytest.approx(100 * np.mean(out.argmax(-1) != labels))
    # Mean cost: every input pays stage 0, those passed on pay the next ones.
    reach = [1.0, 1 - fractions[0], fractions[2]]
    assert early_exit.mean_cost(stage, [10, 20, 30]) == pytest.approx(np.dot(reach, [10, 20, 30]))


@pytest.mark.parametrize('kwargs, message', [
    (dict(thresholds=(1.5,)), 'threshold 1.5 is not in [0, 1]'),
    (dict(thresholds=(-0.1,)), 'threshold -0.1 is not in [0, 1]'),
    (dict(thresholds=(0.5, 0.5)), '2 depths need 1 thresholds, got 2'),
    (dict(temperatures=(1.0,)), '2 depths need 2 temperatures, got 1'),
    (dict(temperatures=(1.0, 0.0)), 'temperature 0.0 is not a number > 0'),
    (dict(score='best'), "unknown score 'best'"),
    (dict(trunk='share'), "unknown trunk 'share'"),
])
def test_a_bad_cascade_says_what_is_wrong(kwargs, message):
  spec = dict(depths=((1, 1, 1), (3, 3, 3)), thresholds=(0.5,), temperatures=(1.0, 1.0)) | kwargs
  with pytest.raises(ValueError, match=message.replace('[', r'\[').replace(']', r'\]')):
    early_exit.Cascade(**spec)


def test_stage_plan_reuses_what_the_previous_stage_computed():
  assert early_exit.stage_plan('resnet20', [(1, 1, 1), (3, 3, 3)], 'recompute') == [(0, 0), (0, 0)]
  # 1-1-1 and 3-3-3 share the stem and stage 0's first block.
  assert early_exit.stage_plan('resnet20', [(1, 1, 1), (3, 3, 3)], 'reuse') == [(0, 3), (3, 0)]
  # 2-2-2 would take 4 modules from 2-2-1, which took 7 from the stage before: it did not
  # compute them itself, so 3-3-3 recomputes.
  assert early_exit.stage_plan('resnet20', [(2, 2, 1), (2, 2, 2), (3, 3, 3)], 'reuse') == [
      (0, 7), (7, 0), (0, 0)]
  assert early_exit.buckets(256) == (8, 16, 32, 64, 128, 256)
  assert early_exit.buckets(100) == (8, 16, 32, 64, 100)
  assert early_exit.buckets(1) == (1,) and early_exit.buckets(8) == (8,)


# --- on a trained run ------------------------------------------------------------------------

CALIB = 256


@pytest.fixture(scope='module')
def trained(tmp_path_factory, small_fashion_mnist_dir):
  """ResNet-20 (width 4) with [2,2,2] and [1,1,1], EKD, 2 epochs on 2,048 images; the
  tools read the whole test split, 1,000 images in this data_dir."""
  workdir = tmp_path_factory.mktemp('cascade') / 'run'
  result = run_main(workdir, f'--config.data.data_dir={small_fashion_mnist_dir}',
                    '--config.model.width=4', '--config.train.num_epochs=2',
                    '--config.data.train_subset=2048', '--config.data.eval_subset=1000',
                    '--config.data.validation_examples=1000', '--config.train.batch_size=64',
                    optimized=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def tool(name, *args, **kwargs):
  return run_module(name, *args, optimized=True, **kwargs)


@pytest.fixture(scope='module')
def built(trained):
  result = tool('cascade', '--workdir', trained, '--depths', '1-1-1,2-2-2,2-2-3,3-3-3',
                '--stages', '3', '--trunk', 'both', '--calib_examples', CALIB,
                '--max_error_increase', '1', '--latency_repeats', 3)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_the_command_writes_candidates_front_and_the_choice(trained, built):
  out = trained / 'cascade'
  chosen = json.loads((out / 'chosen.json').read_text())
  assert chosen['selected_on'] == 'validation' and chosen['score'] == 'maxprob'
  assert len(chosen['thresholds']) == len(chosen['depths']) - 1
  assert chosen['expected']['validation_top1_error'] <= (
      chosen['full_net']['validation_top1_error'] + 1 + 1e-9)
  rows = list(csv.DictReader(open(out / 'candidates.csv')))
  assert {r['trunk'] for r in rows} == {'recompute', 'reuse'}
  assert {len(r['depths'].split()) for r in rows} == {2, 3}
  # The chosen one is the cheapest cascade within the budget, on validation.
  full_val = chosen['full_net']['validation_top1_error']
  fitting = [r for r in rows if float(r['top1_error_val']) <= full_val + 1 + 1e-9]
  assert chosen['expected']['mean_flops'] == pytest.approx(
      min(float(r['mean_flops_val']) for r in fitting))
  for r in rows[:50]:
    fractions = [float(x) for x in r['exit_fractions_val'].split()]
    assert sum(fractions) == pytest.approx(1.0, abs=1e-3)
  calibration = list(csv.DictReader(open(out / 'calibration.csv')))
  assert [r['depth'] for r in calibration] == ['1-1-1', '2-2-2', '2-2-3', '3-3-3']
  assert all(float(r['temperature']) > 0 for r in calibration)
  budgets = list(csv.DictReader(open(out / 'budgets.csv')))
  assert len(budgets) == 5
  assert (out / 'front.png').stat().st_size > 1000
  assert 'ECE before' in built.stdout and 'chosen (' in built.stdout
  # Logits are cached per step: a second call computes none (it only re-sweeps).
  cached = sorted(p.name for p in (out / 'logits').rglob('*.npz'))
  assert '3-3-3.npz' in cached and any('_to_' in name for name in cached)


def _test_images(run):
  return np.concatenate([b['image'][b['mask'] > 0]
                         for b in trained_run.SplitCache(run, 'test', 500)])


@pytest.mark.parametrize('trunk', early_exit.TRUNKS)
def test_the_real_early_exit_routes_every_test_example_as_the_simulation(trained, built, trunk):
  run = trained_run.load_run(str(trained))
  cascade = early_exit.Cascade(
      ((1, 1, 1), (2, 2, 2), (3, 3, 3)), (0.6, 0.8), (0.9, 1.1, 1.0), 'maxprob', trunk)
  stats = {d: bn_calibration.stats_for(run, d, CALIB)[0] for d in cascade.depths}
  tags = {d: 'own' for d in cascade.depths}
  logits, labels = early_exit.stage_logits_of_split(run, cascade.depths, trunk, 'test', stats,
                                                    500, tags)
  want_stage, want_logits = early_exit.simulate(cascade, logits)
  assert 0 < (want_stage == 0).mean() < 1 and (want_stage == 2).any()  # Every stage used.
  executor = early_exit.Executor(run, cascade, stats, batch_size=64)
  got_logits, got_stage = executor.logits(_test_images(run))
  assert len(got_stage) == len(labels) == SMALL_FASHION_MNIST['test']  # The whole test split.
  np.testing.assert_array_equal(got_stage, want_stage)
  # Batches of other sizes reorder float32 sums: logits near 10 differ in their 6th digit.
  np.testing.assert_allclose(got_logits, want_logits, rtol=1e-6, atol=1e-5)
  # 157 batches of varying composition: each stage compiled at most once per bucket.
  assert all(1 <= t <= len(executor.buckets) for t in executor.traces), executor.traces


def test_dynamic_model_and_predict_run_the_chosen_cascade(trained, built, tmp_path):
  chosen_path = str(trained / 'cascade' / 'chosen.json')
  chosen = early_exit.read_chosen(chosen_path)
  model = dynamic.DynamicModel.load(str(trained), list(chosen.depths), calib_examples=CALIB,
                                    batch_size=32)
  pixels = np.random.default_rng(0).uniform(0, 255, (40, 28, 28, 1)).astype(np.float32)
  prediction = model.predict(pixels, cascade=chosen_path)
  executor = model.cascade_executor(chosen_path)
  logits, stage = executor.predict(pixels)
  assert prediction.depth is None
  assert prediction.exit_depths == tuple(chosen.depths[k] for k in stage)
  np.testing.assert_allclose(prediction.probabilities.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(prediction.probabilities.argmax(-1), logits.argmax(-1))
  paths = []
  for i in range(3):
    paths.append(tmp_path / f'{i}.png')
    Image.fromarray(pixels[i, ..., 0].astype(np.uint8)).save(paths[-1])
  result = tool('predict', '--workdir', trained, '--images', *paths, '--cascade', chosen_path,
                '--out', tmp_path / 'p.csv')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines()[0].startswith('cascade ' + ' -> '.join(
      map(notation.format_depth, chosen.depths)))
  rows = list(csv.DictReader(open(tmp_path / 'p.csv')))
  assert len(rows) == 3 and {r['depth'] for r in rows} <= {
      notation.format_depth(d) for d in chosen.depths}


def test_export_cascade_runs_with_jax_and_numpy_only(trained, built, tmp_path):
  run = trained_run.load_run(str(trained))
  spec = {'depths': ['1-1-1', '2-2-2', '3-3-3'], 'thresholds': [0.6, 0.8],
          'temperatures': [0.9, 1.1, 1.0], 'score': 'margin', 'trunk': 'reuse'}
  (tmp_path / 'chosen.json').write_text(json.dumps(spec))
  out = tmp_path / 'exported'
  result = tool('export', '--workdir', trained, '--cascade', tmp_path / 'chosen.json', '--out',
                out, '--calib_examples', CALIB)
  assert result.returncode == 0, result.stderr[-3000:]
  exported = json.loads((out / 'cascade.json').read_text())
  assert [s['input'] for s in exported['stages']] == ['pixels', 'previous', 'previous']
  assert exported['class_names'][9] == 'Ankle boot'
  pixels = np.random.default_rng(2).uniform(0, 255, (50, 28, 28, 1)).astype(np.float32)
  np.save(tmp_path / 'pixels.npy', pixels)
  needed = exported['requirements']['imports']
  program = textwrap.dedent(f'''
      import pkgutil, sys
      for module in pkgutil.iter_modules():
        if (module.name not in {set(needed)!r} and module.name not in sys.stdlib_module_names
            and not module.name.startswith('_')):
          sys.modules[module.name] = None
      for name in ('ddnn_jax', 'flax', 'orbax', 'etils'):
        sys.modules[name] = None
  ''') + exported['loader'] + textwrap.dedent(f'''
      pixels = np.load('{tmp_path}/pixels.npy')
      logits, stage = classify(pixels)
      np.save('{tmp_path}/stage.npy', stage)
      np.save('{tmp_path}/logits.npy', logits)
  ''')
  fresh = subprocess.run([sys.executable, '-c', program], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  cascade = early_exit.from_json(spec, run)
  stats = {d: bn_calibration.stats_for(run, d, CALIB)[0] for d in cascade.depths}
  want_logits, want_stage = early_exit.Executor(run, cascade, stats, 64).predict(pixels)
  np.testing.assert_array_equal(np.load(tmp_path / 'stage.npy'), want_stage)
  np.testing.assert_allclose(np.load(tmp_path / 'logits.npy'), want_logits, atol=1e-4)


@pytest.mark.parametrize('content, message', [
    ('{not json', 'is not a readable cascade file'),
    ('[1, 2]', 'not a cascade'),
    ('{"depths": ["1-1-1", "3-3-3"]}', 'missing thresholds, temperatures, score'),
    ('{"depths": ["1-1-1", "3-3-3"], "thresholds": [1.2], "temperatures": [1, 1], '
     '"score": "maxprob"}', 'threshold 1.2 is not in [0, 1]'),
    ('{"depths": ["1-1-1", "3-3-3"], "thresholds": [0.5, 0.5], "temperatures": [1, 1], '
     '"score": "maxprob"}', '2 depths need 1 thresholds, got 2'),
    ('{"depths": ["1-1-1", "4-4-4"], "thresholds": [0.5], "temperatures": [1, 1], '
     '"score": "maxprob"}', 'stage 0 has 4 blocks but resnet20 3-3-3 has only 3'),
    ('{"arch": "resnet56", "depths": ["1-1-1", "3-3-3"], "thresholds": [0.5], '
     '"temperatures": [1, 1], "score": "maxprob"}', 'is a cascade of a resnet56'),
])
def test_a_bad_cascade_file_is_one_line_and_writes_nothing(trained, tmp_path, content, message):
  bad = tmp_path / 'chosen.json'
  bad.write_text(content)
  image = tmp_path / 'x.png'
  Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
  for module, args in (('predict', ['--images', image, '--out', tmp_path / 'p.csv']),
                       ('export', ['--out', tmp_path / 'e'])):
    result = tool(module, '--workdir', trained, '--cascade', bad, *args)
    assert_one_line_error(result, message)
  assert not (tmp_path / 'p.csv').exists() and not (tmp_path / 'e').exists()


def test_bad_cascade_flags_are_one_line_and_write_nothing(trained, tmp_path):
  before = sorted(p.relative_to(trained) for p in trained.rglob('*'))
  for args, message in (
      (['--max_flops', '5M', '--max_error_increase', '0.1'], 'not allowed with argument'),
      (['--depths', '1-1-1,9-9-9'], 'stage 0 has 9 blocks'),
      (['--stages', '4'], "argument --stages: invalid choice: 4"),
      (['--max_error_increase', '-1'], '--max_error_increase -1: must be in [0, 100)'),
      (['--depths', '3-3-3'], '--depths gives 1 depth: a cascade needs at least 2')):
    assert_one_line_error(tool('cascade', '--workdir', trained, *args), message)
  assert sorted(p.relative_to(trained) for p in trained.rglob('*')) == before
  # A run that held out no validation split: the field is named.
  copy = tmp_path / 'no_validation'
  shutil.copytree(trained, copy)
  config = json.loads((copy / 'config.json').read_text())
  config['data']['validation_examples'] = 0
  (copy / 'config.json').write_text(json.dumps(config))
  assert_one_line_error(tool('cascade', '--workdir', copy), 'data.validation_examples=0')


def test_a_front_of_the_full_net_alone_is_one_line_before_the_cascades(trained, monkeypatch):
  """With no smaller depth on the validation front no chain is left: a UsageError (one
  line, exit 2) before latencies and cascades are measured, never a traceback."""
  from ddnn_jax import cascade  # pylint: disable=g-import-not-at-top
  from ddnn_jax.core import errors  # pylint: disable=g-import-not-at-top
  from ddnn_jax.deploy import evaluation, latency  # pylint: disable=g-import-not-at-top
  real_front = evaluation.pareto_front
  monkeypatch.setattr(evaluation, 'pareto_front',
                      lambda points: [max(range(len(points)), key=lambda i: points[i][0])])
  measured = []
  monkeypatch.setattr(latency.LatencyTable, 'measure',
                      lambda *a, **k: measured.append(a) or 1.0)
  with pytest.raises(errors.UsageError, match='no cascade is left: the validation front of .* '
                     'keeps only the full net 3-3-3'):
    cascade.main(['--workdir', str(trained), '--calib_examples', str(CALIB)])
  assert not measured
  assert real_front([(1, 2), (2, 1)]) == [0, 1]
