"""The divergence guard: a run whose loss goes non-finite stops with exit code 3.

The train step's metrics are fetched at every log point (and before every evaluation
and checkpoint) anyway, so checking them there costs no extra host sync. A state is
also checked before it is saved, so the latest checkpoint on disk is always finite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

EXIT_CODE = 3


class Diverged(Exception):
  """str(err) is one line: the step, the non-finite terms and the last good checkpoint."""


def non_finite_terms(metrics: Mapping[str, Any], names: Sequence[str]) -> list[str]:
  """The metric names ('loss', 'ce/1-1-1', 'kl/2-2-2', ...) that are not finite.

  ``metrics`` holds one train step's metrics (or their mean over several steps, which
  is non-finite whenever one step was): arrays over depths are named per depth.
  """
  bad = []
  order = ('loss', 'ce', 'accuracy', 'kl', 'attention', 'kl_full', 'attention_full')
  for key, value in sorted(metrics.items(), key=lambda kv: (
      order.index(kv[0]) if kv[0] in order else len(order), kv[0])):
    value = np.asarray(value)
    if value.ndim == 0:
      if not np.isfinite(value):
        bad.append(key)
      continue
    # Per-depth terms cover every depth (ce, accuracy) or only the sub-nets (kl, attention).
    depth_names = names if len(value) == len(names) else names[1:]
    bad.extend(f'{key}/{n}' for n, v in zip(depth_names, value) if not np.isfinite(v))
  return bad


def check(step: int, metrics: Mapping[str, Any], names: Sequence[str],
          last_good: int | None, checkpoint_dir: str) -> None:
  """Raises Diverged if any metric of the steps up to ``step`` is not finite."""
  bad = non_finite_terms(metrics, names)
  if bad:
    raise Diverged(diverged_message(step, bad, last_good, checkpoint_dir))


def diverged_message(step: int, terms: Sequence[str], last_good: int | None,
                     checkpoint_dir: str) -> str:
  depths = sorted({t.split('/', 1)[1] for t in terms if '/' in t})
  where = f' (depths {", ".join(depths)})' if depths else ''
  good = (f'the last good checkpoint is step {last_good} in {checkpoint_dir}: lower '
          'optim.learning_rate and run again to resume from it' if last_good is not None
          else 'no checkpoint was saved yet: lower optim.learning_rate and start again')
  return f'diverged by step {step}: non-finite {", ".join(terms)}{where}; {good}'
