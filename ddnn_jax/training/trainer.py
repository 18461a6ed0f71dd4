"""``train_and_evaluate``: the DDNN training job, from config to results table.

Every depth trains each step over one parameter tree; every depth is evaluated with
its own BatchNorm statistics every ``train.eval_every_epochs``. Runs resume from the
latest checkpoint in ``workdir`` with the parameters, optimiser state, per-depth BN
statistics, step and data-iterator position, so a killed run loses nothing. A run
stops with exit code 3 when it diverges (``divergence``) and with 75 after saving on
SIGTERM/SIGINT (``preemption``).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from etils import epath

from ddnn_jax.core import errors, parallel
from ddnn_jax.data import datasets, pipeline
from ddnn_jax.nn import flops, models, ranking
from ddnn_jax.training import (checkpoints, config_lib, divergence, optim, preemption, reporting,
                               steps, workdir as workdir_lib)


def evaluate(eval_step, state: steps.TrainState, config: ml_collections.ConfigDict,
             run: config_lib.RunSetup, mesh, split: str = 'test') -> dict[str, np.ndarray]:
  """Top-1 accuracy and mean CE of every depth over a whole split ('test' or the held-out
  'validation')."""
  eval_iter = pipeline.create_eval_iterator(
      config.data.dataset, run.data_dir, global_batch_size=run.eval_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      image_size=config.data.image_size, subset=config.data.eval_subset, split=split,
      validation_examples=config.data.validation_examples)
  totals = None
  for batch in eval_iter:
    sums = eval_step(state, parallel.shard_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = parallel.fetch(totals)
  return {'accuracy': totals['correct'] / totals['count'], 'ce': totals['ce_sum'] / totals['count']}


def initial_state(config: ml_collections.ConfigDict, run: config_lib.RunSetup,
                  learning_rate) -> steps.TrainState:
  """A new train state; with ``init_from``, that workdir's latest parameters and the BN
  statistics of the depths it trained too."""
  state = steps.create_train_state(jax.random.key(config.seed), run.model, run.depths,
                                   optim.create_optimizer(config, learning_rate),
                                   run.info.image_shape)
  if config.init_from is None:
    return state
  source = epath.Path(config.init_from)
  try:
    other = json.loads((source / workdir_lib.CONFIG_FILE).read_text())
  except (OSError, ValueError) as err:
    raise errors.ConfigError(f'init_from={config.init_from!r}: not a ddnn_jax workdir '
                                 f'({err})') from None
  for key in ('model.arch', 'model.width', 'data.dataset'):
    if config_lib.get_field(other, key) != config_lib.get_field(config, key):
      raise errors.ConfigError(
          f'init_from={config.init_from!r} trained {key}={config_lib.get_field(other, key)!r}, '
          f'this run {config_lib.get_field(config, key)!r}: its parameters do not fit')
  _, params, batch_stats = checkpoints.restore_variables(source)
  jax.tree.map(lambda a, b: None, state.params, params)  # Same structure, or a clear error.
  stats = {name: batch_stats.get(name, own) for name, own in state.batch_stats.items()}
  return state.replace(params=jax.tree.map(jnp.asarray, params),
                       batch_stats=jax.tree.map(jnp.asarray, stats))


def _mean_of_runs(values: np.ndarray) -> np.ndarray:
  """The mean over steps (axis 0) of the steps that ran a depth (NaN: did not)."""
  counts = np.sum(~np.isnan(values), axis=0)
  return np.where(counts > 0, np.nansum(values, axis=0) / np.maximum(counts, 1), np.nan)


class Sandwich:
  """The sandwich rule: each step trains the full net, the smallest sub-net and
  ``train.sandwich_n`` others drawn at random (seeded by the run's seed and the step, so
  a resumed run draws the same). Each subset is its own compiled step."""

  def __init__(self, config: ml_collections.ConfigDict, run: config_lib.RunSetup, mesh):
    self.depths = run.depths
    self.n = config.train.sandwich_n
    self.seed = config.seed
    self.mode, self.weights, self.mesh = (config.mode, steps.LossWeights.from_config(config),
                                          mesh)
    self._steps: dict[tuple[int, ...], Any] = {}

  def choose(self, step: int) -> tuple[int, ...]:
    """Indices into the depth set: 0 (the full net), the smallest and n others, in order."""
    middle = range(1, len(self.depths) - 1)
    rng = np.random.default_rng((self.seed, step))
    drawn = rng.choice(list(middle), size=self.n, replace=False) if self.n else []
    return tuple(sorted({0, len(self.depths) - 1, *map(int, drawn)}))

  def step(self, chosen: tuple[int, ...]):
    if chosen not in self._steps:
      self._steps[chosen], _ = steps.jit_steps(
          tuple(self.depths[i] for i in chosen), self.mode, self.weights, mesh=self.mesh,
          max_traces=1)
    return self._steps[chosen]

  def expand(self, metrics: dict[str, Any], chosen: tuple[int, ...]) -> dict[str, Any]:
    """A subset's metrics laid out over every depth (NaN where a depth did not run)."""
    out = {}
    for key, value in metrics.items():
      value = np.asarray(value, np.float64)
      if value.ndim == 0:
        out[key] = value
        continue
      positions = chosen if len(value) == len(chosen) else chosen[1:]
      full = np.full(len(self.depths) if len(value) == len(chosen) else len(self.depths) - 1,
                     np.nan)
      full[[p if len(value) == len(chosen) else p - 1 for p in positions]] = value
      out[key] = full
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains every depth of the DDNN in ``config``; returns the final eval metrics by depth."""
  run = config_lib.setup(config)
  names = run.depth_names
  is_main = parallel.is_main_process()
  with workdir_lib.claim(workdir, config), preemption.StopSignals() as stop_signals:
    mesh = parallel.create_mesh()
    learning_rate = optim.create_learning_rate_fn(config, run.steps_per_epoch)
    checkpointer = checkpoints.Checkpointer(workdir, config.train.keep_checkpoints)
    state = parallel.replicate(initial_state(config, run, learning_rate), mesh)
    state, data_state = checkpointer.restore(state)
    start = int(parallel.fetch(state.step))
    train_step, eval_step = steps.jit_steps(
        run.depths, config.mode, steps.LossWeights.from_config(config),
        mesh=mesh, max_traces=1)
    sandwich = Sandwich(config, run, mesh) if config.train.sandwich_n else None
    term_norms, term_every = None, config.train.term_gradients_every_steps
    if term_every:  # At log steps only: one backward pass per term.
      shared = models.variable_shapes(run.model, run.info.image_shape, run.depths[-1])['params']
      term_norms = steps.jit_term_gradient_norms(
          run.depths, config.mode, steps.LossWeights.from_config(config), mesh=mesh,
          shared=shared)
    train_iter = pipeline.create_train_iterator(
        config.data.dataset, run.data_dir, global_batch_size=config.train.batch_size,
        seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
        image_size=config.data.image_size, num_workers=config.data.num_workers,
        subset=config.data.train_subset, validation_examples=config.data.validation_examples)
    if data_state is not None:
      train_iter.set_state(data_state)

    profiles = [flops.profile_subnet(run.model, run.info.image_shape, d) for d in run.depths]
    if is_main:
      workdir_lib.write_dataset_facts(workdir, run.info, datasets.get(config.data.dataset))
      print(f'{config.mode} on {config.data.dataset}: {config.model.arch} with sub-nets '
            f'{", ".join(names[1:]) or "none"}; {jax.device_count()} devices, '
            f'{run.num_steps} steps', flush=True)
      print(flops.format_profile_table(config.model.arch, profiles), flush=True)
      if start:
        print(f'resumed from checkpoint at step {start}', flush=True)

    writer = reporting.MetricWriter(workdir, enabled=is_main)
    bar = tqdm.tqdm(total=run.num_steps, initial=start, disable=not is_main, unit='step',
                    dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    steps_per_eval = run.steps_per_epoch * config.train.eval_every_epochs
    pending: list[dict[str, Any]] = []  # Step metrics not yet logged.
    eval_result = val_result = None
    has_validation = config.data.validation_examples > 0
    ranked = config.model.noise_ranking

    def evaluate_splits(final: bool = True):
      """(test or None, validation or None) results; the validation split is what selects.
      With a validation split, the test split is evaluated at the end only (unless
      train.test_every_eval): it reports, and the curves need only the held-out split."""
      with_test = final or not has_validation or config.train.test_every_eval
      test = evaluate(eval_step, state, config, run, mesh) if with_test else None
      val = evaluate(eval_step, state, config, run, mesh, 'validation') if has_validation else None
      return test, val

    def log_pending(step: int, extra: dict[str, Any] | None = None) -> None:
      """Writes the mean of the pending metrics (and ``extra``, this step's term gradient
      norms); stops the run if one was not finite."""
      nonlocal pending
      if not pending:
        return
      fetched = parallel.fetch(pending)
      pending = []
      # The log line is written before the check raises, so the log shows the divergence.
      check = functools.partial(divergence.check, step, last_good=checkpointer.latest_step(),
                                checkpoint_dir=checkpointer.directory)
      if sandwich is not None:  # Steps of depth subsets: checked each, averaged per depth.
        checks = [functools.partial(check, m, [names[i] for i in chosen]) for m, chosen in fetched]
        fetched = [sandwich.expand(m, chosen) for m, chosen in fetched]
        with np.errstate(invalid='ignore'):  # A depth no step of the window ran: NaN.
          mean = jax.tree.map(lambda *x: _mean_of_runs(np.stack(x)), *fetched)
        scalars = reporting.train_scalars(mean, names, learning_rate(step - 1))
        scalars = {k: v for k, v in scalars.items() if not np.isnan(v)}
      else:
        mean = jax.tree.map(lambda *x: np.mean(np.stack(x), 0), *fetched)
        checks = [functools.partial(check, mean, names)]
        scalars = reporting.train_scalars(mean, names, learning_rate(step - 1))
      if extra:
        scalars.update(reporting.term_scalars(parallel.fetch(extra), names))
      writer.write_scalars(step, scalars)
      for check_ in checks:
        check_()
      bar.set_postfix(loss=f'{mean["loss"]:.3f}',
                      acc='/'.join(f'{a:.2f}' for a in mean['accuracy']))

    # Wall time, and the parts evaluating and diagnosing (train.term_gradients_every_steps).
    started, eval_seconds, term_seconds = time.perf_counter(), 0.0, 0.0
    try:
      for step in range(start + 1, run.num_steps + 1):
        batch = parallel.shard_batch(next(train_iter), mesh)
        if sandwich is None:
          state, metrics = train_step(state, batch)
          pending.append(metrics)
        else:
          chosen = sandwich.choose(step)
          state, metrics = sandwich.step(chosen)(state, batch)
          pending.append((metrics, chosen))
        bar.update(1)
        is_last = step == run.num_steps
        if ranked and step % run.steps_per_epoch == 0 and not is_last:
          # Before this step's evaluation and checkpoint: they see the ranked net.
          state, moved = ranking.sort_channels(state, config.model.channel_group, run.depths,
                                               batch['image'])
          state = parallel.replicate(state, mesh)
          writer.write_scalars(step, {'ranking/groups_moved': moved})
        evaluate_now = step % steps_per_eval == 0 or is_last
        save_now = evaluate_now or step % config.train.checkpoint_every_steps == 0
        if step % config.train.log_every_steps == 0 or save_now:
          extra = None
          if term_norms is not None and step % term_every == 0:
            jax.block_until_ready(state)  # The steps in flight are not the diagnosis' time.
            term_start = time.perf_counter()
            extra = jax.block_until_ready(term_norms(state, batch))
            term_seconds += time.perf_counter() - term_start
          log_pending(step, extra)
        checkpoint_metrics = None
        if evaluate_now:
          eval_start = time.perf_counter()
          eval_result, val_result = evaluate_splits(final=is_last)
          eval_seconds += time.perf_counter() - eval_start
          epoch = step // run.steps_per_epoch
          writer.write_scalars(step, {**reporting.eval_scalars(eval_result, names, epoch,
                                                               val_result),
                                      'time/wall_s': time.perf_counter() - started,
                                      'time/eval_s': eval_seconds,
                                      **({'time/term_gradients_s': term_seconds}
                                         if term_norms is not None else {})})
          writer.flush()
          # The best checkpoint is chosen on held-out data when the run has some.
          selecting = val_result if has_validation else eval_result
          checkpoint_metrics = {'mean_accuracy': float(np.mean(selecting['accuracy']))}
          if is_main:
            shown = [(split, r) for split, r in (('test', eval_result), ('validation', val_result))
                     if r is not None]
            bar.write(f'epoch {epoch}: top-1 ' + '; '.join(split + ' ' + ', '.join(
                f'{n} {a:.2%}' for n, a in zip(names, r['accuracy'])) for split, r in shown))
        if save_now:
          checkpointer.save(step, state, train_iter.get_state(), checkpoint_metrics)
        reason = stop_signals.requested()
        if reason and not is_last:
          log_pending(step)
          if not save_now:
            checkpointer.save(step, state, train_iter.get_state())
          checkpointer.wait()
          raise preemption.Preempted(step, reason)
    finally:
      bar.close()
      train_iter.close()  # Stops grain's worker processes, if any.
      writer.close()
      checkpointer.close()

    if eval_result is None:  # Resumed a finished run.
      eval_result, val_result = evaluate_splits()
    rows = reporting.depth_results(config.model.arch, profiles, eval_result['accuracy'],
                                   None if val_result is None else val_result['accuracy'])
    if is_main:
      reporting.write_results(workdir, rows, title=f'{config.mode}: {config.model.arch} on '
                              f'{config.data.dataset}, {run.num_steps} steps')
      print(reporting.format_markdown_table(rows), flush=True)
  return {'step': run.num_steps, 'names': names, **eval_result,
          **({} if val_result is None else {f'val_{k}': v for k, v in val_result.items()})}


def measure_step_seconds(config: ml_collections.ConfigDict, repeats: int = 5) -> dict[str, float]:
  """What a run of ``config`` spends computing, from its steps timed on a synthetic batch
  here (compiled first; nothing is written): ``seconds`` for every train step, the term
  gradient norms at their steps, and every evaluation (validation each time, the test
  split at the end), plus the per-call seconds of each."""
  run = config_lib.setup(config)
  mesh = parallel.create_mesh()
  learning_rate = optim.create_learning_rate_fn(config, run.steps_per_epoch)
  state = parallel.replicate(initial_state(config, run, learning_rate), mesh)
  weights = steps.LossWeights.from_config(config)
  train_step, eval_step = steps.jit_steps(run.depths, config.mode, weights, mesh=mesh)
  shape = run.info.image_shape

  def batch_of(size: int) -> dict[str, Any]:
    return parallel.shard_batch({'image': np.zeros((size, *shape), np.float32),
                                 'label': np.zeros((size,), np.int32)}, mesh)

  def timed(fn, *args) -> float:
    jax.block_until_ready(fn(*args))  # Compiles.
    began = time.perf_counter()
    for _ in range(repeats):
      out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - began) / repeats

  train_batch, eval_batch = batch_of(config.train.batch_size), batch_of(run.eval_batch_size)
  # Donation consumes the state: each timed call gets a fresh copy.
  step_s = timed(lambda b: train_step(jax.tree.map(jnp.copy, state), b)[1], train_batch)
  eval_s = timed(eval_step, state, eval_batch)
  every = config.train.term_gradients_every_steps
  term_s = 0.0
  if every:
    shared = models.variable_shapes(run.model, shape, run.depths[-1])['params']
    term_s = timed(steps.jit_term_gradient_norms(run.depths, config.mode, weights, mesh=mesh,
                                                 shared=shared), state, train_batch)
  evals = run.num_steps // (run.steps_per_epoch * config.train.eval_every_epochs)
  per_eval = config.data.validation_examples or run.info.num_eval
  eval_batches = (evals * -(-per_eval // run.eval_batch_size)
                  + -(-run.info.num_eval // run.eval_batch_size))
  seconds = (run.num_steps * step_s + (run.num_steps // every if every else 0) * term_s
             + eval_batches * eval_s)
  return {'seconds': seconds, 'train_step_s': step_s, 'eval_batch_s': eval_s,
          'term_gradients_s': term_s}

