"""The main job end to end, as a user runs it: real data, kill + resume, bad input."""

import csv
import json
import signal
import time

import chex
import jax
import numpy as np
import pytest

from jobs import TINY, assert_one_line_error, checkpoint_steps, restore_state, run_main


@pytest.mark.slow
def test_default_config_learns_real_fashion_mnist(tmp_path, fashion_mnist_dir):
  workdir = tmp_path / 'run'
  result = run_main(workdir, f'--config.data.data_dir={fashion_mnist_dir}',
                    '--config.train.num_epochs=2', '--config.data.train_subset=3200',
                    '--config.data.eval_subset=2000', '--config.model.width=8')
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['depth'] for r in rows] == ['3-3-3', '2-2-2', '1-1-1']
  errors = [float(r['top1_error']) for r in rows]
  # 10 classes: chance is 90% error. After 50 steps every depth must be far better.
  assert max(errors) < 50, errors
  # The table holds the measured numbers: those of the last evaluation in metrics.jsonl.
  lines = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  evals = [line for line in lines if 'epoch' in line]
  assert [e['epoch'] for e in evals] == [1.0, 2.0]
  # Every evaluation holds the validation split; the test split is evaluated at the end.
  assert ['eval/accuracy/3-3-3' in e for e in evals] == [False, True]
  assert all('val/accuracy/1-1-1' in e and e['time/wall_s'] > e['time/eval_s'] > 0
             for e in evals)
  for row in rows:
    for split, column in (('eval', 'top1_error'), ('val', 'val_top1_error')):
      key = f'{split}/accuracy/' + row['depth']
      assert float(row[column]) == pytest.approx(100 * (1 - evals[-1][key]), abs=1e-4)
    assert int(row['params']) > 0 and int(row['flops']) > 0
  assert (workdir / 'accuracy_vs_flops.png').stat().st_size > 1000
  assert '| resnet20 | 3-3-3 |' in (workdir / 'results.md').read_text()
  assert list((workdir / 'tb').glob('events.out.tfevents.*'))
  train_lines = [line for line in lines if 'train/loss' in line]
  for key in ('train/kl/2-2-2', 'train/kl/1-1-1', 'train/kl/3-3-3', 'train/attention/1-1-1'):
    assert np.isfinite(train_lines[-1][key]), key


@pytest.mark.slow
def test_sigkill_then_restart_equals_uninterrupted_run(tmp_path, fashion_mnist_dir):
  args = [f'--config.data.data_dir={fashion_mnist_dir}', '--config.train.num_epochs=4',
          '--config.train.checkpoint_every_steps=5', *TINY]  # 16 steps/epoch, 64 in all.
  total = 64
  reference = run_main(tmp_path / 'reference', *args)
  assert reference.returncode == 0, reference.stderr[-3000:]

  workdir = tmp_path / 'killed'
  proc = run_main(workdir, *args, wait=False)
  deadline = time.time() + 300
  while not checkpoint_steps(workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  killed_at = checkpoint_steps(workdir)
  assert killed_at and killed_at[-1] < total, f'not killed mid-run: {killed_at}'

  resumed = run_main(workdir, *args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'resumed from checkpoint at step {killed_at[-1]}' in resumed.stdout
  # Bitwise: params, optimizer state, every depth's BN statistics and the step.
  chex.assert_trees_all_equal(restore_state(workdir, total),
                              restore_state(tmp_path / 'reference', total))
  assert ((workdir / 'results.csv').read_text() ==
          (tmp_path / 'reference' / 'results.csv').read_text())


# Every config value a user can get wrong, through the real command line: exit 2, one
# `error:` line naming the field, the value and what is allowed; nothing written.
BAD_VALUES = [
    ('train.batch_size=0', 'train.batch_size=0: must be an integer >= 1'),
    ('train.batch_size=-8', 'train.batch_size=-8: must be an integer >= 1'),
    ('train.batch_size=12', 'train.batch_size=12: must be a multiple of the 8 devices'),
    ('train.eval_batch_size=0', 'train.eval_batch_size=0: must be an integer >= 1'),
    # Widths: not one of model.widths, outside (0, 1], a group that splits a layer.
    ("model.subnets=('2-2-2@0.5',)", 'model.subnets=(\'2-2-2@0.5\',): must be sub-nets at '
     'widths of model.widths=(1.0,), but 2-2-2@0.5 has width 0.5'),
    ('model.widths=(1.5,1.0)', 'model.widths=(1.5, 1.0): must be a tuple of width multipliers '
     'in (0, 1]'),
    ('train.sandwich_n=2', 'train.sandwich_n=2: must be 0, or at most K - 1 = 1'),
    ('train.num_epochs=-1', 'train.num_epochs=-1: must be an integer >= 1'),
    ('train.num_epochs=0', 'train.num_epochs=0: must be an integer >= 1'),
    ('train.eval_every_epochs=0', 'train.eval_every_epochs=0: must be an integer >= 1'),
    ('train.log_every_steps=0', 'train.log_every_steps=0: must be an integer >= 1'),
    ('train.checkpoint_every_steps=-5', 'train.checkpoint_every_steps=-5: must be an integer'),
    ('train.keep_checkpoints=0', 'train.keep_checkpoints=0: must be an integer >= 1'),
    ('optim.learning_rate=-0.1', 'optim.learning_rate=-0.1: must be a finite number >= 0'),
    ('optim.learning_rate=nan', 'optim.learning_rate=nan: must be a finite number >= 0'),
    ('optim.learning_rate=inf', 'optim.learning_rate=inf: must be a finite number >= 0'),
    ('optim.momentum=1.0', 'optim.momentum=1: must be a number in [0, 1)'),
    ('optim.momentum=-0.5', 'optim.momentum=-0.5: must be a number in [0, 1)'),
    ('model.bn_momentum=1.5', 'model.bn_momentum=1.5: must be a number in [0, 1)'),
    ('optim.weight_decay=-0.0001', 'optim.weight_decay=-0.0001: must be a finite number >= 0'),
    ('loss.w=-1.0', 'loss.w=-1: must be a finite number >= 0, or a tuple of K=2'),
    ('loss.alpha=nan', "loss.alpha='nan': must be a finite number >= 0, or a tuple of K=2"),
    ('loss.w=(1.0,2.0,3.0)', 'loss.w=(1.0, 2.0, 3.0): must be a finite number >= 0, or a tuple'),
    ('loss.temperature=0', 'loss.temperature=0: must be a finite number > 0'),
    ('loss.attention_stages=(3,)', 'loss.attention_stages=(3,): must be None (every stage) or'),
    ('optim.warmup_epochs=6', 'optim.warmup_epochs=6: must be a number in [0, 5]'),  # 5 epochs.
    ('optim.decay_epochs=(20,10)', 'optim.decay_epochs=(20, 10): must be increasing whole'),
    ('optim.decay_epochs=(40,)', 'optim.decay_epochs=(40,): must be increasing whole epochs'),
    ('model.width=-4', 'model.width=-4: must be None (the standard width) or an integer >= 1'),
    ('model.width=5', 'model.width=5: must be None or an even integer for a cifar_resnet'),
    ('model.dtype=float16', "model.dtype='float16': must be one of float32, bfloat16"),
    ('optim.schedule=linear', "optim.schedule='linear': must be one of cosine, step"),
    ('mode=kd', "mode='kd': must be one of individual, ddnn, ekd"),
    ('data.dataset=mnist2', "data.dataset='mnist2': must be one of fashion_mnist, cifar10"),
    ('data.train_subset=-1', 'data.train_subset=-1: must be None or an integer >= 1'),
    ('data.eval_subset=0', 'data.eval_subset=0: must be None or an integer >= 1'),
    ('data.validation_examples=-5', 'data.validation_examples=-5: must be an integer >= 0'),
    ('data.num_workers=-1', 'data.num_workers=-1: must be an integer >= 0'),
    ('data.image_size=64', 'data.image_size=64: must be None for fashion_mnist, whose images'),
    ('seed=-1', 'seed=-1: must be an integer >= 0'),
    ('model.subnets=((1,1,4),)', 'model.subnets=((1, 1, 4),): must be depths such as 2-2-2'),
    ('model.subnets=2-2', "model.subnets=('2-2',): must be depths such as 2-2-2, 2-2-2@0.5"),
    ('model.subnets=resnet14', "unknown depth 'resnet14'; use block counts per stage such as "
     '3-3-3 or one of resnet20, resnet32, resnet44, resnet56, resnet110'),
    ('model.arch=resnet21', "model.arch='resnet21': must be one of resnet20"),
]


@pytest.mark.slow
@pytest.mark.parametrize('override,message', BAD_VALUES, ids=[v for v, _ in BAD_VALUES])
def test_every_bad_config_value_is_one_line_and_exit_2(tmp_path, override, message):
  workdir = tmp_path / 'run'
  result = run_main(workdir, f'--config.{override}')
  assert_one_line_error(result, message)
  assert not workdir.exists()  # Nothing half-written: no workdir, no checkpoint.


def test_the_bad_value_table_is_long_enough():
  assert len(BAD_VALUES) >= 25 and len({v.split('=')[0] for v, _ in BAD_VALUES}) >= 25


@pytest.mark.parametrize('args,fragments', [
    (['--config.mode=individual'], ["model.subnets=((1, 1, 1), (2, 2, 2))",
                                    "at most one depth in mode 'individual'"]),
    (['--config.model.subnets=((1,1),)'], ['has 2 stages but resnet20 has 3']),
    (['--config.train.num_epochs=abc'], ['num_epochs', 'abc']),
    (['--config.train.epochs=1'], ["unknown config field 'train.epochs' (did you mean "
                                   'train.num_epochs?)']),
    (['--config=configs/no_such.py'], ['cannot load --config configs/no_such.py: no such file']),
    (['--config=configs/imagenet_r50.py:v9'], ["unknown hardware preset 'v9'"]),
    (['--config=configs/cifar10.py:r99'], ["unknown group 'r99'; known groups: r20_r16,"]),
    (['positional'], ['unexpected arguments: positional']),
])
@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, fragments):
  workdir = tmp_path / 'run'
  result = run_main(workdir, *args)
  assert_one_line_error(result, *fragments)
  assert not workdir.exists()  # Nothing half-written.


@pytest.mark.slow
def test_missing_data_names_the_command(tmp_path):
  empty = tmp_path / 'tfds'
  empty.mkdir()
  result = run_main(tmp_path / 'run', '--config=configs/cifar10_resnet56.py',
                    f'--config.data.data_dir={empty}')
  assert_one_line_error(result, 'cifar10 is not prepared', 'cifar-10-python.tar.gz',
                        'python -m ddnn_jax.prepare cifar10')
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_unwritable_workdir(tmp_path, fashion_mnist_dir):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')  # A file where a directory is needed: unwritable even for root.
  result = run_main(blocker / 'run', f'--config.data.data_dir={fashion_mnist_dir}')
  assert_one_line_error(result, 'is not usable', 'Not a directory')


@pytest.mark.slow
def test_corrupted_checkpoint_is_reported_not_replaced(tmp_path, fashion_mnist_dir):
  workdir = tmp_path / 'run'
  args = [f'--config.data.data_dir={fashion_mnist_dir}', '--config.train.num_epochs=1', *TINY]
  assert run_main(workdir, *args).returncode == 0
  steps_before = checkpoint_steps(workdir)
  latest = workdir / 'checkpoints' / str(steps_before[-1]) / 'state'
  for f in latest.rglob('*'):
    if f.is_file():
      f.write_bytes(b'garbage')
  result = run_main(workdir, *args[:-len(TINY)], '--config.train.num_epochs=2', *TINY)
  assert_one_line_error(result, f'checkpoint {steps_before[-1]}', 'cannot be restored')
  assert checkpoint_steps(workdir) == steps_before  # No new "latest" was written.


@pytest.mark.slow
def test_resuming_with_another_architecture_is_refused(tmp_path, fashion_mnist_dir):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps({
      'mode': 'ekd', 'model': {'arch': 'resnet56', 'subnets': [[1, 1, 1]], 'width': None},
      'data': {'dataset': 'fashion_mnist'}}))
  result = run_main(workdir, f'--config.data.data_dir={fashion_mnist_dir}')
  assert_one_line_error(result, "model.arch='resnet56'", 'another --workdir')


@pytest.mark.slow
def test_two_processes_run_the_job_like_one(tmp_path, fashion_mnist_dir):
  """2 processes x 2 devices (jax.distributed, CPU collectives) vs 1 process x 4 devices."""
  import portpicker  # pylint: disable=g-import-not-at-top
  args = [f'--config.data.data_dir={fashion_mnist_dir}', '--config.train.num_epochs=1', *TINY,
          '--config.data.train_subset=128']  # 4 steps of 32, then a checkpoint and eval.
  single = run_main(tmp_path / 'single', *args, devices=4)
  assert single.returncode == 0, single.stderr[-3000:]

  workdir = tmp_path / 'multi'
  address = f'localhost:{portpicker.pick_unused_port()}'
  procs = [run_main(workdir, *args, f'--coordinator_address={address}', '--num_processes=2',
                    f'--process_id={i}', wait=False, devices=2) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs, strict=True):
    assert p.returncode == 0, err[-3000:]
  # Only process 0 reports: the run header, the size table and the results table.
  # (Process 1's stdout still holds Gloo's connection messages, from several threads.)
  for marker in ('4 devices', '| resnet20 depth |', '| Net |'):
    assert marker in outputs[0][0] and marker not in outputs[1][0], marker
  # One train line and one eval line at step 4: process 1 wrote no metrics.
  assert (workdir / 'metrics.jsonl').read_text().count('{"step": 4,') == 2

  single_rows = list(csv.DictReader(open(tmp_path / 'single' / 'results.csv')))
  multi_rows = list(csv.DictReader(open(workdir / 'results.csv')))
  assert len(single_rows) == len(multi_rows) == 3
  for a, b in zip(single_rows, multi_rows, strict=True):
    assert a['depth'] == b['depth'] and a['params'] == b['params']
    assert abs(float(a['top1_error']) - float(b['top1_error'])) <= 100 / 256 + 1e-6
  # The checkpoint both processes wrote together holds the single-process state, up to
  # the order of float32 sums, which EKD amplifies: its gradients of the blocks every depth
  # shares are sums of nearly cancelling terms (docs/performance-notes.md). Measured after these 4
  # steps (relative to the whole tree's norm; params / batch_stats / momentum): this twin
  # 1.2e-5 / 3.5e-6 / 4e-3; 1 process on 2 devices instead of 4, 1e-4 / 6e-5 / 2.4e-2; a
  # process reading the other's data shard, 1.2e-2 / 3.4e-2 / 0.49.
  multi, single = restore_state(workdir, 4), restore_state(tmp_path / 'single', 4)
  assert multi['step'] == single['step'] == 4
  for part, tolerance in (('params', 1e-3), ('batch_stats', 1e-3), ('opt_state', 0.1)):
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(s[part])])
            for s in (multi, single))
    assert a.shape == b.shape and b.size > 0, part
    assert np.linalg.norm(a - b) <= tolerance * np.linalg.norm(b), part
