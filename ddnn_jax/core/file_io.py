"""Files every tool writes and reads: atomic writes, CSV, matplotlib figures as PNG.

Local paths are written with plain file I/O; remote paths (gs://...) go through
etils.epath, whose uploads become visible only once complete.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any


def is_remote(path: str) -> bool:
  return '://' in path


def join(*parts: str) -> str:
  # os.path.join also keeps gs:// URLs intact.
  return os.path.join(*parts)


def csv_text(rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> str:
  """Rows (dicts) as CSV with the columns ``fields`` (others ignored, missing ones empty):
  the one CSV writer of every table ddnn_jax writes."""
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction='ignore',
                          lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  return buf.getvalue()


def read_csv(path: str) -> list[dict[str, str]]:
  """The rows of a CSV file ddnn_jax wrote ([] if it does not exist)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(path)
  return list(csv.DictReader(io.StringIO(path.read_text()))) if path.exists() else []


def new_figure(size: tuple[float, float] = (6, 4.5)):
  """A matplotlib Figure and its Agg canvas.

  Figure + FigureCanvasAgg rather than pyplot: no global backend switch and no figure
  registry to leak, so it is safe inside a training process.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=size, dpi=120)
  return fig, FigureCanvasAgg(fig)


def figure_png(fig, canvas) -> bytes:
  del canvas  # Attached to fig; kept by the caller until the figure is drawn.
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format='png')
  return buf.getvalue()


def atomic_write(path: str, data: bytes) -> None:
  """Writes data so that readers see the old file or the new one, never half."""
  if is_remote(path):
    # An object-store upload only becomes visible once complete.
    from etils import epath  # pylint: disable=g-import-not-at-top
    epath.Path(path).write_bytes(data)
    return
  directory, name = os.path.split(path)
  fd, tmp = tempfile.mkstemp(dir=directory or '.', prefix=f'.{name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
