"""Seed statistics of a comparison: mean ± std, and paired differences with t-intervals.

Runs of two schemes with the same seed share their initialisation and data order, so
their difference is paired by seed: the interval is the one-sample t-interval of the
per-seed differences, ``mean ± t(1 - (1 - level)/2, n - 1) · sd / √n``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class Summary:
  mean: float
  std: float  # Sample standard deviation (n - 1); 0 for one seed.
  n: int


@dataclasses.dataclass(frozen=True)
class Difference:
  """``a - b`` over the seeds both have."""
  mean: float
  low: float | None  # The interval; None with fewer than two paired seeds.
  high: float | None
  n: int
  seeds: tuple[int, ...]

  @property
  def supported(self) -> bool:
    """Whether the interval excludes zero (the difference is shown at this level)."""
    return self.low is not None and (self.high < 0 or self.low > 0)


def summarize(values: Mapping[int, float]) -> Summary:
  data = list(values.values())
  if not data:
    raise ValueError('no values to summarize')
  return Summary(statistics.fmean(data), statistics.stdev(data) if len(data) > 1 else 0.0,
                 len(data))


def t_quantile(p: float, dof: int) -> float:
  """The p-quantile of Student's t with ``dof`` degrees of freedom."""
  from scipy import stats as scipy_stats  # pylint: disable=g-import-not-at-top
  return float(scipy_stats.t.ppf(p, dof))


def paired_difference(a: Mapping[int, float], b: Mapping[int, float],
                      level: float = 0.95) -> Difference | None:
  """``a - b`` paired by seed (the keys), with its ``level`` t-interval; None if no seed is
  shared."""
  seeds = tuple(sorted(set(a) & set(b)))
  if not seeds:
    return None
  diffs = [a[s] - b[s] for s in seeds]
  mean = statistics.fmean(diffs)
  if len(diffs) < 2:
    return Difference(mean, None, None, 1, seeds)
  half = t_quantile(1 - (1 - level) / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(
      len(diffs))
  return Difference(mean, mean - half, mean + half, len(diffs), seeds)
