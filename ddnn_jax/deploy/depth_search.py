"""The search of a trained run's depths for the best accuracy per FLOP and per ms.

Every depth configuration is a candidate; a large space is searched progressively
(``progressive_search``): from the full net, remove one block at a time (or step to the
next narrower width), keeping at each size the ``beam`` candidates that lose the least
accuracy per FLOP saved. ``python -m ddnn_jax.search`` runs it and writes ``W/search/``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ddnn_jax.core import file_io
from ddnn_jax.nn import notation

SEARCH_DIR = 'search'
Scores = Mapping[notation.Depth, tuple[float, float]]  # depth -> (top-1 error, FLOPs)


def children(depth: notation.Depth, widths: Sequence[float] = (1.0,)) -> list[notation.Depth]:
  """The sub-nets one step smaller: one stage loses its last block (stages keep >= 1), or
  the whole net runs at the next narrower of ``widths``."""
  width = notation.width_of(depth)
  blocks = notation.blocks_of(depth)
  smaller = [notation.subnet(blocks[:s] + (n - 1,) + blocks[s + 1:], width)
             for s, n in enumerate(blocks) if n > 1]
  narrower = sorted(w for w in widths if w < width)
  if narrower:
    smaller.append(notation.subnet(blocks, narrower[-1]))
  return smaller


def progressive_search(full: notation.Depth,
                       evaluate_fn: Callable[[list[notation.Depth]], Scores],
                       beam: int, widths: Sequence[float] = (1.0,)
                       ) -> dict[notation.Depth, tuple[float, float]]:
  """Beam search from the full net down to one block per stage (at the narrowest width).

  ``evaluate_fn(depths)`` returns {depth: (error, flops)}. At each size, the ``beam``
  candidates kept are those that add the least error per FLOP saved, relative to the
  best of their parents. Returns every candidate evaluated.
  """
  scores = dict(evaluate_fn([full]))
  frontier = [full]
  while True:
    parents: dict[notation.Depth, list[notation.Depth]] = {}
    for parent in frontier:
      for child in children(parent, widths):
        parents.setdefault(child, []).append(parent)
    if not parents:
      return scores
    new = [d for d in parents if d not in scores]
    if new:
      scores.update(evaluate_fn(new))

    def cost_of_removal(child):
      error, macs = scores[child]
      return min((error - scores[p][0]) / max(scores[p][1] - macs, 1) for p in parents[child])

    frontier = sorted(parents, key=lambda d: (cost_of_removal(d), d))[:beam]


def best_under(rows: Sequence[Mapping[str, Any]], key: str, budget: float
               ) -> Mapping[str, Any] | None:
  fitting = [r for r in rows if float(r[key]) <= budget]
  return min(fitting, key=lambda r: (float(r['top1_error']), float(r[key]))) if fitting else None


def plot_fronts(rows: Sequence[Mapping[str, Any]], fronts: Mapping[str, list[int]],
          title: str, split: str) -> bytes:
  fig, canvas = file_io.new_figure((11, 4.5))
  for panel, (key, label) in enumerate((('flops', 'FLOPs (M multiply-adds)'),
                                        ('latency_ms_batch_1', 'Latency at batch 1 (ms)'))):
    ax = fig.add_subplot(1, 2, panel + 1)
    scale = 1e-6 if key == 'flops' else 1.0
    x = [float(r[key]) * scale for r in rows]
    y = [float(r['top1_error']) for r in rows]
    ax.scatter(x, y, s=12, color='0.6', label='candidates', zorder=2)
    front = fronts[key]
    ax.plot([x[i] for i in front], [y[i] for i in front], 'o-', color='tab:blue',
            label='Pareto front', zorder=3)
    trained = [i for i, r in enumerate(rows) if r['bn'] == 'own']
    ax.scatter([x[i] for i in trained], [y[i] for i in trained], marker='*', s=150,
               color='tab:red', label='trained depths', zorder=4)
    for i in set(front) | set(trained):
      ax.annotate(rows[i]['depth'], (x[i], y[i]), textcoords='offset points', xytext=(4, 4),
                  fontsize=7)
    ax.set_xlabel(label)
    ax.set_ylabel(f'Top-1 error (%), {split}')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  return file_io.figure_png(fig, canvas)
