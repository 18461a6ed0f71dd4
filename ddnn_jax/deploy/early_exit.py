"""Per-input depth: confidence cascades over the depths of one parameter tree.

A cascade runs a small depth on every input and passes on to a deeper one only the
inputs whose calibrated confidence is below that stage's threshold; the last stage
answers for the rest. Its cost is the **mean** over inputs: every input pays the first
stage, those passed on pay the next, and so on.

* Scores (higher = more confident, all in [0, 1]) of ``softmax(z / T)``: ``maxprob``
  (the top probability), ``margin`` (top minus second), ``entropy`` (1 - H / log C).
  An input exits at a stage when its score is at least the threshold; a threshold of 1
  passes every input on, 0 stops every input there.
* ``T`` is fitted per depth on the validation split (NLL); ECE is reported before and after.
* Trunk: a later stage either recomputes its depth from the image (``recompute``) or
  continues from the previous stage's output of their shared leading modules
  (``reuse``: ``architectures.shared_prefix``), with its own BN statistics from there on.
* ``simulate`` decides from cached logits exactly what ``Executor`` (the real early
  exit: gather the passed inputs, pad them to a bucket size, run the next stage) does.

Everything is fitted on the validation split; the test split only reports.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import jax
import numpy as np
from etils import epath

from ddnn_jax.core import errors
from ddnn_jax.deploy import trained_run
from ddnn_jax.nn import architectures, flops, models, notation

SCORES = ('maxprob', 'margin', 'entropy')
TRUNKS = ('recompute', 'reuse')
CASCADE_DIR = 'cascade'
ECE_BINS = 15
MIN_BUCKET = 8  # XLA's CPU logits are bitwise batch-invariant from batch 8 on (measured).
_STAGE_IDS = itertools.count()


# --- scores and calibration ---------------------------------------------------------------


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
  z = np.asarray(logits, np.float64) / temperature
  z -= z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def confidence(logits: np.ndarray, temperature: float, score: str) -> np.ndarray:
  """The ``score`` of every row of ``logits`` at ``temperature``, in [0, 1]."""
  p = softmax(logits, temperature)
  if score == 'maxprob':
    return p.max(-1)
  if score == 'margin':
    top2 = np.sort(p, -1)[:, -2:]
    return top2[:, 1] - top2[:, 0]
  if score == 'entropy':
    h = -np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300)), 0.0), -1)
    return np.clip(1 - h / math.log(p.shape[-1]), 0.0, 1.0)
  raise ValueError(f'unknown score {score!r}; choose one of {", ".join(SCORES)}')


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
  p = softmax(logits, temperature)
  return float(-np.mean(np.log(np.maximum(p[np.arange(len(labels)), labels], 1e-300))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
  """The temperature minimising the NLL of ``labels`` (golden-section search on log T)."""
  lo, hi = math.log(0.05), math.log(20.0)
  ratio = (math.sqrt(5) - 1) / 2
  a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
  fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
  for _ in range(60):
    if fa < fb:
      hi, b, fb = b, a, fa
      a = hi - ratio * (hi - lo)
      fa = nll(logits, labels, math.exp(a))
    else:
      lo, a, fa = a, b, fb
      b = lo + ratio * (hi - lo)
      fb = nll(logits, labels, math.exp(b))
  return math.exp((lo + hi) / 2)


def ece(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0,
        bins: int = ECE_BINS) -> float:
  """Expected calibration error (%) of the top probability, ``bins`` equal-width bins."""
  p = softmax(logits, temperature)
  conf, correct = p.max(-1), p.argmax(-1) == labels
  edges = np.linspace(0, 1, bins + 1)
  which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
  total = 0.0
  for k in range(bins):
    in_bin = which == k
    if in_bin.any():
      total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
  return 100 * total


# --- what a cascade decides ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cascade:
  """Depths of increasing cost, a threshold per stage but the last, a temperature each."""
  depths: tuple[notation.Depth, ...]
  thresholds: tuple[float, ...]
  temperatures: tuple[float, ...]
  score: str = 'maxprob'
  trunk: str = 'recompute'

  def __post_init__(self):
    if len(self.depths) < 2:
      raise ValueError('a cascade needs at least 2 depths')
    if len(self.thresholds) != len(self.depths) - 1:
      raise ValueError(f'{len(self.depths)} depths need {len(self.depths) - 1} thresholds, '
                       f'got {len(self.thresholds)}')
    if len(self.temperatures) != len(self.depths):
      raise ValueError(f'{len(self.depths)} depths need {len(self.depths)} temperatures, '
                       f'got {len(self.temperatures)}')
    for t in self.thresholds:
      if not (isinstance(t, (int, float)) and 0 <= t <= 1):
        raise ValueError(f'threshold {t!r} is not in [0, 1]')
    for t in self.temperatures:
      if not (isinstance(t, (int, float)) and 0 < t < math.inf):
        raise ValueError(f'temperature {t!r} is not a number > 0')
    if self.score not in SCORES:
      raise ValueError(f'unknown score {self.score!r}; choose one of {", ".join(SCORES)}')
    if self.trunk not in TRUNKS:
      raise ValueError(f'unknown trunk {self.trunk!r}; choose one of {", ".join(TRUNKS)}')


def exits(scores: np.ndarray, threshold: float) -> np.ndarray:
  """Which inputs stop at a stage: score >= threshold (a threshold of 1: none)."""
  return (scores >= threshold) & (threshold < 1)


def simulate(cascade: Cascade, stage_logits: Sequence[np.ndarray]
             ) -> tuple[np.ndarray, np.ndarray]:
  """(the stage each input exits at, its logits) from every stage's logits of all inputs."""
  n = len(stage_logits[0])
  stage = np.full(n, len(cascade.depths) - 1)
  undecided = np.ones(n, bool)
  for k, threshold in enumerate(cascade.thresholds):
    stop = undecided & exits(confidence(stage_logits[k], cascade.temperatures[k],
                                        cascade.score), threshold)
    stage[stop] = k
    undecided &= ~stop
  logits = np.stack(stage_logits)[stage, np.arange(n)]
  return stage, logits


def stage_costs(model: models.DDNN, image_shape: Sequence[int], depths: Sequence[notation.Depth],
                trunk: str) -> list[int]:
  """Multiply-adds each stage adds for an input that reaches it (``stage_plan``)."""
  costs = []
  for depth, (resume, _) in zip(depths, stage_plan(model.arch, depths, trunk)):
    per_module = flops.module_flops(model, image_shape, depth)
    leading = architectures.module_sequence(model.arch, depth)[:resume]
    skipped = sum(per_module.get(m, 0) for m in leading)
    costs.append(sum(per_module.values()) - skipped)
  return costs


def mean_cost(stage: np.ndarray, costs: Sequence[float]) -> float:
  """Mean per input: every input pays the stages up to the one it exits at."""
  reached = np.array([(stage >= k).mean() for k in range(len(costs))])
  return float(np.dot(reached, costs))


def threshold_grid(scores: np.ndarray, points: int) -> np.ndarray:
  """Thresholds at evenly spaced quantiles of the validation ``scores``, with 0 and 1."""
  quantiles = np.quantile(scores, np.linspace(0, 1, points))
  return np.unique(np.concatenate([[0.0], quantiles, [1.0]]))


def sweep(stage_logits: Sequence[np.ndarray], labels: np.ndarray,
          temperatures: Sequence[float], score: str, grids: Sequence[np.ndarray]
          ) -> list[tuple[tuple[float, ...], np.ndarray, float]]:
  """Every threshold combination of ``grids`` (one per stage but the last): a list of
  (thresholds, fraction of inputs exiting at each stage, error %)."""
  scores = [confidence(z, t, score) for z, t in zip(stage_logits, temperatures)]
  wrong = [np.argmax(z, -1) != labels for z in stage_logits]
  n = len(labels)
  out = []
  for thresholds in itertools.product(*grids):
    undecided = np.ones(n, bool)
    fractions, errors_ = [], 0
    for k, t in enumerate(thresholds):
      stop = undecided & exits(scores[k], t)
      fractions.append(stop.mean())
      errors_ += int(wrong[k][stop].sum())
      undecided &= ~stop
    fractions.append(undecided.mean())
    errors_ += int(wrong[-1][undecided].sum())
    out.append((tuple(float(t) for t in thresholds), np.array(fractions), 100 * errors_ / n))
  return out


# --- logits of every depth and stage, cached per checkpoint -----------------------------------


def cache_path(run: trained_run.TrainedRun, split: str, name: str) -> epath.Path:
  return epath.Path(run.workdir) / CASCADE_DIR / 'logits' / str(run.step) / split / f'{name}.npz'


class StageApply:
  """Jitted inference of one stage: (params, stats, images or the previous stage's output)
  -> (logits, this stage's output of the modules the next stage reuses)."""

  def __init__(self, run: trained_run.TrainedRun, depth: notation.Depth, resume_at: int,
               capture_at: int, max_traces: int):
    self.depth = depth
    self.resume_at, self.capture_at = resume_at, capture_at

    self.traces = 0  # Compilations so far: one per bucket size at most.

    def apply(params, stats, x):
      self.traces += 1
      return run.model.apply({'params': params, 'batch_stats': stats}, x, depth, resume_at,
                             capture_at, method=models.DDNN.cascade_stage)

    # chex keys its trace count on the function's name and where it was defined: a name
    # of its own gives every stage its own count.
    apply.__name__ = f'cascade_stage_{next(_STAGE_IDS)}'
    self._apply = jax.jit(chex.assert_max_traces(apply, n=max_traces))

  def __call__(self, params, stats, x):
    return self._apply(params, stats, x)


def stage_plan(arch: str, depths: Sequence[notation.Depth], trunk: str
               ) -> list[tuple[int, int]]:
  """Per stage, (resume_at, capture_at): how many leading modules it takes from the stage
  before, and how many of its own it hands to the next (0: none). With 'reuse', a stage
  continues from the previous stage's output of their shared leading modules when that
  stage computed them itself; otherwise (and always with 'recompute') from the image."""
  resume = [0] * len(depths)
  if trunk == 'reuse':
    for k in range(1, len(depths)):
      shared = architectures.shared_prefix(arch, depths[k - 1], depths[k])
      resume[k] = shared if shared > resume[k - 1] else 0
  capture = [resume[k + 1] if k + 1 < len(depths) else 0 for k in range(len(depths))]
  return list(zip(resume, capture))


def stage_logits_of_split(run: trained_run.TrainedRun, depths: Sequence[notation.Depth],
                          trunk: str, split: str, stats: Mapping[notation.Depth, Any],
                          batch_size: int, tags: Mapping[notation.Depth, str]
                          ) -> tuple[list[np.ndarray], np.ndarray]:
  """Every stage's logits of every input of ``split``, cached per checkpoint step.

  ``tags[depth]`` says where a depth's BN statistics came from ('own', 'recalibrated-N'):
  a cached file with another tag is stale and recomputed. A recomputed stage is its
  depth's plain logits (one file per depth, shared by every cascade); a reusing stage
  depends on the chain before it (one file per chain prefix).
  """
  if trunk == 'recompute':
    names = [notation.depth_name(d) for d in depths]
    stage_tags = [tags[d] for d in depths]
  else:
    names = ['_to_'.join(notation.depth_name(d) for d in depths[:k + 1])
             for k in range(len(depths))]
    stage_tags = ['|'.join(tags[d] for d in depths[:k + 1]) for k in range(len(depths))]
  paths = [cache_path(run, split, n) for n in names]
  cached = [_read_cache(p, t) for p, t in zip(paths, stage_tags)]
  if all(c is not None for c in cached):
    return [c[0] for c in cached], cached[0][1]
  plan = stage_plan(run.model.arch, depths, trunk)
  applies = [cached_stage(run, d, r, c) for d, (r, c) in zip(depths, plan)]
  params = [jax.device_put(run.used_params(d)) for d in depths]
  dstats = [jax.device_put(stats[d]) for d in depths]
  outputs: list[list[np.ndarray]] = [[] for _ in depths]
  labels, masks = [], []
  for batch in trained_run.SplitCache(run, split, batch_size):
    x = batch['image']
    for k in range(len(depths)):
      logits, captured = applies[k](params[k], dstats[k], x)
      outputs[k].append(np.asarray(logits))
      if k + 1 < len(depths):
        x = captured if plan[k + 1][0] else batch['image']
    labels.append(batch['label'])
    masks.append(batch.get('mask', np.ones(len(batch['label']))) > 0)
  mask = np.concatenate(masks)
  label = np.concatenate(labels)[mask]
  result = [np.concatenate(o)[mask] for o in outputs]
  for path, logits, tag in zip(paths, result, stage_tags):
    _write_cache(path, logits, label, tag)
  return result, label


_STAGES: dict[tuple[Any, ...], StageApply] = {}


def cached_stage(run: trained_run.TrainedRun, depth: notation.Depth, resume_at: int,
                  capture_at: int) -> StageApply:
  """One compiled stage per run, depth and plan, shared by every split and cascade (the
  logits passes use one batch size: the last batch is padded)."""
  key = (run.workdir, run.step, depth, resume_at, capture_at)
  if key not in _STAGES:
    _STAGES[key] = StageApply(run, depth, resume_at, capture_at, max_traces=2)
  return _STAGES[key]


def _read_cache(path: epath.Path, tag: str):
  if not path.exists():
    return None
  with path.open('rb') as f:
    data = dict(np.load(f))
  if str(data.get('tag')) != tag:
    return None  # Stale: other BN statistics or data.
  return data['logits'], data['labels']


def _write_cache(path: epath.Path, logits: np.ndarray, labels: np.ndarray, tag: str) -> None:
  import io  # pylint: disable=g-import-not-at-top
  from ddnn_jax.core import file_io  # pylint: disable=g-import-not-at-top
  path.parent.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  np.savez(buf, logits=logits, labels=labels, tag=np.asarray(tag))
  file_io.atomic_write(str(path), buf.getvalue())


# --- the chosen cascade: a file, and its real early exit -------------------------------------


def to_json(cascade: Cascade, run: trained_run.TrainedRun, **extra: Any) -> dict[str, Any]:
  return {'arch': run.config.model.arch, 'dataset': run.config.data.dataset,
          'workdir': os.path.abspath(run.workdir), 'step': run.step,
          'depths': [notation.format_depth(d) for d in cascade.depths],
          'thresholds': list(cascade.thresholds), 'temperatures': list(cascade.temperatures),
          'score': cascade.score, 'trunk': cascade.trunk, **extra}


def read_chosen(path: str, run: trained_run.TrainedRun | None = None,
                arch: str | None = None) -> Cascade:
  """A ``chosen.json`` (``python -m ddnn_jax.cascade``), checked against ``run``'s net (or
  only against the full net ``arch``); one UsageError line for whatever is wrong with it."""
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except FileNotFoundError:
    raise errors.UsageError(f'{path} does not exist') from None
  except (OSError, ValueError) as err:
    raise errors.UsageError(f'{path} is not a readable cascade file ({err})') from None
  return from_json(data, run, where=path, arch=arch)


def from_json(data: Any, run: trained_run.TrainedRun | None = None, where: str = 'cascade',
              arch: str | None = None) -> Cascade:
  if not isinstance(data, dict):
    raise errors.UsageError(f'{where}: not a cascade (a JSON object with depths, thresholds, '
                            'temperatures and score)')
  missing = [k for k in ('depths', 'thresholds', 'temperatures', 'score') if k not in data]
  if missing:
    raise errors.UsageError(f'{where}: missing {", ".join(missing)}')
  arch = run.config.model.arch if run is not None else arch
  if arch is not None and data.get('arch', arch) != arch:
    raise errors.UsageError(f'{where} is a cascade of a {data["arch"]}, but this run trained '
                            f'a {arch}')
  try:
    if not isinstance(data['depths'], list):
      raise ValueError('depths must be a list')
    depths = tuple(architectures.resolve_depth(notation.parse_depth(d), arch) if arch is not None
                   else tuple(notation.parse_depth(d)) for d in data['depths'])
    return Cascade(depths, tuple(data['thresholds']), tuple(data['temperatures']),
                   data['score'], data.get('trunk', 'recompute'))
  except (ValueError, TypeError, errors.UsageError) as err:
    raise errors.UsageError(f'{where}: {err}') from None


def buckets(batch_size: int) -> tuple[int, ...]:
  """Padded batch sizes of the later stages: powers of two from MIN_BUCKET to the batch
  (just the batch below MIN_BUCKET: batch-1 serving runs every stage at batch 1)."""
  sizes, size = [], MIN_BUCKET
  while size < batch_size:
    sizes.append(size)
    size *= 2
  return (*sizes, batch_size)


class Executor:
  """Runs a cascade for real: stage 1 on the batch, then only the inputs it passes on,
  gathered and padded to a bucket size (each stage compiles once per bucket, whatever
  the batch's composition)."""

  def __init__(self, run: trained_run.TrainedRun, cascade: Cascade,
               stats: Mapping[notation.Depth, Any], batch_size: int = 256):
    self.run, self.cascade = run, cascade
    self.batch_size = batch_size
    self.buckets = buckets(self.batch_size)
    self.plan = stage_plan(run.model.arch, cascade.depths, cascade.trunk)
    self.stages = [StageApply(run, d, r, c, max_traces=len(self.buckets))
                   for d, (r, c) in zip(cascade.depths, self.plan)]
    self._params = [jax.device_put(run.used_params(d)) for d in cascade.depths]
    self._stats = [jax.device_put(stats[d]) for d in cascade.depths]
    self._scale, self._shift = run.normalization()

  @property
  def traces(self) -> list[int]:
    return [s.traces for s in self.stages]

  def logits(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, exit stage) per normalised image, in batches of ``batch_size``."""
    out_logits, out_stage = [], []
    for start in range(0, len(images), self.batch_size):
      logits, stage = self._batch(images[start:start + self.batch_size])
      out_logits.append(logits)
      out_stage.append(stage)
    return np.concatenate(out_logits), np.concatenate(out_stage)

  def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, exit stage) per image of pixels in [0, 255], normalised as in training."""
    return self.logits(np.asarray(pixels, np.float32) * self._scale - self._shift)

  def _run(self, k: int, x: np.ndarray | jax.Array, n: int):
    size = next((b for b in self.buckets if b >= n), self.buckets[-1])
    if x.shape[0] < size:
      x = np.concatenate([np.asarray(x), np.zeros((size - x.shape[0], *x.shape[1:]), x.dtype)])
    logits, captured = self.stages[k](self._params[k], self._stats[k], x)
    return np.asarray(logits)[:n], captured

  def _batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(images)
    cascade = self.cascade
    logits_out = np.zeros((n, self.run.spec.num_classes), np.float32)
    stage_out = np.full(n, len(self.stages) - 1)
    alive = np.arange(n)  # Inputs of this batch still undecided.
    x = images
    for k in range(len(self.stages)):
      logits, captured = self._run(k, x, len(alive))
      if k == len(self.stages) - 1:
        logits_out[alive] = logits
        break
      stop = exits(confidence(logits, cascade.temperatures[k], cascade.score),
                   cascade.thresholds[k])
      logits_out[alive[stop]] = logits[stop]
      stage_out[alive[stop]] = k
      keep = np.nonzero(~stop)[0]
      alive = alive[keep]
      if not len(alive):
        break
      x = np.asarray(captured)[keep] if self.plan[k + 1][0] else images[alive]
    return logits_out, stage_out
