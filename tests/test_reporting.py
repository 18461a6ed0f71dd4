"""Tests for ddnn_jax.training.reporting (metric files, results table and plot) and the CSV
helpers of ddnn_jax.core.file_io."""

from __future__ import annotations

import csv
import glob
import json
import os
import struct
import types

import numpy as np
import pytest
from PIL import Image

from ddnn_jax.training import reporting


def _read_tb_scalars(tb_dir: str) -> dict[str, list[tuple[int, float]]]:
  """Parses TensorBoard event files (TFRecord framing + Event protos)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(tb_dir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack_from('<Q', data, pos)
      record = data[pos + 12:pos + 12 + length]  # skip length + its crc
      pos += 12 + length + 4  # + data crc
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
  workdir = str(tmp_path / 'run')
  writer = reporting.MetricWriter(workdir)
  writer.write_scalars(1, {'loss': np.float32(2.5), 'lr': 0.1})
  writer.write_scalars(np.int64(2), {'loss': np.array(1.25), 'top1': 0.5})
  writer.flush()
  writer.close()
  writer.close()  # idempotent

  lines = (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
  records = [json.loads(line) for line in lines]
  assert records == [{'step': 1, 'loss': 2.5, 'lr': pytest.approx(0.1)},
                     {'step': 2, 'loss': 1.25, 'top1': 0.5}]
  assert all(type(v) in (int, float) for r in records for v in r.values())
  assert reporting.read_metrics(workdir) == records

  events = glob.glob(os.path.join(workdir, 'tb', 'events.out.tfevents.*'))
  assert events and all(os.path.getsize(p) > 0 for p in events)
  tb = _read_tb_scalars(os.path.join(workdir, 'tb'))
  assert tb['loss'] == [(1, 2.5), (2, 1.25)]
  assert tb['top1'] == [(2, 0.5)]


def test_metric_writer_appends_on_resume(tmp_path):
  with reporting.MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(1, {'loss': 1.0})
  with reporting.MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(2, {'loss': 0.5})
  assert [r['step'] for r in reporting.read_metrics(str(tmp_path))] == [1, 2]


def test_metric_writer_jax_scalars(tmp_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  with reporting.MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(jnp.int32(3), {'loss': jnp.float32(0.75), 'acc': jnp.array([0.5])})
  assert reporting.read_metrics(str(tmp_path)) == [{'step': 3, 'loss': 0.75, 'acc': 0.5}]


def test_metric_writer_rejects_bad_scalars(tmp_path):
  with reporting.MetricWriter(str(tmp_path)) as writer:
    with pytest.raises(ValueError, match='shape'):
      writer.write_scalars(0, {'loss': np.zeros(3)})
    with pytest.raises(ValueError, match='reserved'):
      writer.write_scalars(0, {'step': 1.0})


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  writer = reporting.MetricWriter(str(workdir), enabled=False)
  writer.write_scalars(1, {'loss': 1.0})
  writer.flush()
  writer.close()
  assert not workdir.exists()


def _rows():
  return reporting.results_rows(
      names=['full', 'sub1', 'sub2'],
      depths=[[3, 3, 3], (2, 2, 2), '[1,1,1]'],
      params=[272_474, 175_258, 78_042],
      flops=[40.56e6, 27.9e6, 15.3e6],
      top1_acc=[0.9215, np.float32(0.9001), 0.85])


def test_results_rows():
  rows = _rows()
  assert [r['name'] for r in rows] == ['full', 'sub1', 'sub2']
  assert [r['depth'] for r in rows] == ['3-3-3', '2-2-2', '1-1-1']
  assert rows[0]['params'] == 272_474 and rows[0]['flops'] == 40_560_000
  assert rows[0]['top1_error'] == pytest.approx(7.85)
  assert rows[2]['top1_error'] == pytest.approx(15.0)
  with pytest.raises(ValueError, match='fraction'):
    reporting.results_rows(['full'], [[1]], [1], [1], [92.1])
  with pytest.raises(ValueError, match='lengths'):
    reporting.results_rows(['full', 'sub1'], [[1]], [1], [1], [0.9])


def test_format_markdown_table():
  table = reporting.format_markdown_table(_rows())
  lines = table.splitlines()
  assert lines[0] == '| Net | Depth | Params (M) | FLOPs (M) | Top-1 err (%) |'
  assert lines[2] == '| full | 3-3-3 | 0.27 | 40.6 | 7.85 |'
  assert lines[4] == '| sub2 | 1-1-1 | 0.08 | 15.3 | 15.00 |'
  assert len(lines) == 5


def test_write_results(tmp_path):
  rows = _rows()
  workdir = str(tmp_path / 'out')
  paths = reporting.write_results(workdir, rows, title='ResNet-20 on CIFAR-10')
  assert set(paths) == {'markdown', 'csv', 'plot'}
  assert all(os.path.dirname(p) == workdir for p in paths.values())
  # No temp files left behind.
  assert sorted(os.listdir(workdir)) == ['accuracy_vs_flops.png', 'results.csv', 'results.md']

  markdown = open(paths['markdown']).read()
  assert markdown.startswith('# ResNet-20 on CIFAR-10\n\n| Net |')
  assert '| sub1 | 2-2-2 | 0.18 | 27.9 | 9.99 |' in markdown

  with open(paths['csv'], newline='') as f:
    parsed = list(csv.DictReader(f))
  assert [tuple(r) for r in parsed] == [reporting.CSV_FIELDS] * 3
  for got, want in zip(parsed, rows):
    assert got['name'] == want['name'] and got['depth'] == want['depth']
    assert int(got['params']) == want['params'] and int(got['flops']) == want['flops']
    assert float(got['top1_error']) == pytest.approx(want['top1_error'])

  with open(paths['plot'], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with Image.open(paths['plot']) as image:
    image.verify()
  with Image.open(paths['plot']) as image:
    assert image.format == 'PNG' and image.size == (720, 540)
    assert len(set(image.convert('L').getdata())) > 2  # something was drawn


def test_write_results_replaces_and_rejects_empty(tmp_path):
  reporting.write_results(str(tmp_path), _rows())
  reporting.write_results(str(tmp_path), _rows()[:1])
  assert not open(tmp_path / 'results.md').read().startswith('#')
  assert len(open(tmp_path / 'results.csv').read().splitlines()) == 2
  with pytest.raises(ValueError):
    reporting.write_results(str(tmp_path), [])


def test_results_with_a_validation_column_and_unnamed_depths(tmp_path):
  rows = reporting.results_rows(['resnet20', '2-2-2'], [(3, 3, 3), (2, 2, 2)], [10, 5],
                                [2e6, 1e6], [0.9, 0.8], val_top1_acc=[0.875, 0.75])
  assert [r['val_top1_error'] for r in rows] == [12.5, 25.0]
  assert [r['top1_error'] for r in rows] == [pytest.approx(10.0), pytest.approx(20.0)]
  table = reporting.format_markdown_table(rows).splitlines()
  assert table[0].endswith('| Top-1 err (%) | Val. err (%) |')
  assert table[3] == '| 2-2-2 | 2-2-2 | 0.00 | 1.0 | 20.00 | 25.00 |'
  reporting.write_results(str(tmp_path), rows)
  with open(tmp_path / 'results.csv', newline='') as f:
    parsed = list(csv.DictReader(f))
  assert [float(r['val_top1_error']) for r in parsed] == [12.5, 25.0]
  with pytest.raises(ValueError, match='lengths'):
    reporting.results_rows(['a'], [(1, 1, 1)], [1], [1], [0.5], val_top1_acc=[0.5, 0.5])


def test_depth_results_name_unnamed_depths_by_their_blocks():
  profiles = [types.SimpleNamespace(depth=d, params=1, flops=1)
              for d in ((3, 3, 3), (2, 2, 2), (1, 2, 1))]
  rows = reporting.depth_results('resnet20', profiles, [0.5, 0.5, 0.5])
  assert [r['name'] for r in rows] == ['resnet20', '2-2-2', '1-2-1']
  assert all(r['val_top1_error'] is None for r in rows)
  assert 'Val.' not in reporting.format_markdown_table(rows)


def test_eval_scalars_name_test_and_validation_apart():
  scalars = reporting.eval_scalars({'accuracy': [0.9, 0.8], 'ce': [0.3, 0.5]}, ['3-3-3', '1-1-1'],
                                   2, {'accuracy': [0.85, 0.7], 'ce': [0.4, 0.6]})
  assert scalars['eval/accuracy/1-1-1'] == pytest.approx(0.8)
  assert scalars['val/accuracy/1-1-1'] == pytest.approx(0.7)
  assert scalars['val/ce/3-3-3'] == pytest.approx(0.4) and scalars['epoch'] == 2.0
