"""``train_and_evaluate``: the DDNN training job, from config to results table.

Every depth trains each step over one parameter tree; every depth is evaluated
after each epoch with its own BatchNorm statistics. Runs resume from the latest
checkpoint in ``workdir`` with the parameters, optimiser state, per-depth BN
statistics, step and data-iterator position, so a killed run loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from etils import epath

from ddnn_jax import data, losses, models, parallel, profile, reporting, steps

# Fields that must not change when a run resumes in the same workdir.
_RUN_IDENTITY = ('mode', 'model.arch', 'model.subnets', 'model.width', 'data.dataset')


class UsageError(Exception):
  """Bad input from the user; ``main`` prints it as one line and exits with code 2."""


class ConfigError(UsageError):
  pass


class CheckpointError(UsageError):
  pass


class WorkdirError(UsageError):
  pass


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything derived from the config before anything is written."""
  model: models.DDNN
  depths: tuple[models.Depth, ...]
  data_dir: str
  info: data.DatasetInfo
  steps_per_epoch: int
  num_steps: int
  eval_batch_size: int  # Rounded up to a multiple of the device count (padding is masked).


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  for key in dotted.split('.'):
    config = config[key]
  return config


def _check_config(config: ml_collections.ConfigDict) -> tuple[models.DDNN, tuple]:
  """Validates model, depths and mode; raises ConfigError with one readable line."""
  try:
    subnets = config.model.subnets
    if isinstance(subnets, (str, int)):
      raise ValueError(f'model.subnets must be a tuple of depths, got {subnets!r}')
    if config.mode == 'individual':
      # The baseline: one depth trained alone, the full net or the one sub-net given.
      if len(subnets) > 1:
        raise ValueError("mode 'individual' trains one net: set model.subnets to () for the "
                         "full net or to one depth, e.g. '((1,1,1),)'")
      depths = (models.resolve_depth(subnets[0], config.model.arch),) if subnets else (
          models.arch_spec(config.model.arch).stage_sizes,)
    else:
      depths = models.depth_set(config.model.arch, subnets)
    losses.check_mode(config.mode, len(depths) - 1)
    if config.model.dtype not in ('float32', 'bfloat16'):
      raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {config.model.dtype!r}")
    if config.optim.schedule not in ('cosine', 'step'):
      raise ValueError(f"optim.schedule must be 'cosine' or 'step', got {config.optim.schedule!r}")
    if config.train.batch_size % jax.device_count():
      raise ValueError(f'train.batch_size {config.train.batch_size} is not divisible by the '
                       f'{jax.device_count()} devices')
  except ValueError as err:
    raise ConfigError(str(err)) from None
  model = models.create_model(config.model.arch, 1, width=config.model.width or None,
                              dtype=jnp.dtype(config.model.dtype),
                              bn_momentum=config.model.bn_momentum)
  return model, depths


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Checks the config and the data; writes nothing but a dataset preparation."""
  model, depths = _check_config(config)
  name = config.data.dataset
  if name not in data.DATASETS:
    raise ConfigError(f'unknown dataset {name!r}; choose one of {", ".join(data.DATASETS)}')
  data_dir = data.ensure_prepared(name, config.data.data_dir or None,
                                  config.data.source_dir or None)
  try:
    info = data.get_dataset_info(name, data_dir, config.data.image_size or None)
  except ValueError as err:
    raise ConfigError(str(err)) from None
  model = model.clone(num_classes=info.num_classes)
  num_train = min(config.data.train_subset or info.num_train, info.num_train)
  steps_per_epoch = num_train // config.train.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f'train.batch_size {config.train.batch_size} exceeds the {num_train} '
                      'training examples')
  devices = jax.device_count()
  eval_batch_size = -(-config.train.eval_batch_size // devices) * devices
  return Setup(model, depths, data_dir, info, steps_per_epoch,
               steps_per_epoch * config.train.num_epochs, eval_batch_size)


def create_learning_rate_fn(config: ml_collections.ConfigDict,
                            steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up, then cosine or step decay; peak LR scaled by the global batch."""
  peak = config.optim.learning_rate * config.train.batch_size / config.optim.reference_batch_size
  warmup = int(config.optim.warmup_epochs * steps_per_epoch)
  total = config.train.num_epochs * steps_per_epoch
  if config.optim.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, max(total - warmup, 1))
  else:
    decay = optax.piecewise_constant_schedule(
        peak, {e * steps_per_epoch - warmup: config.optim.decay_factor
               for e in config.optim.decay_epochs})
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def create_optimizer(config: ml_collections.ConfigDict,
                     learning_rate: optax.Schedule) -> optax.GradientTransformation:
  # Decay kernels only, not BN scales/biases (as the flax ImageNet example).
  kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
  return optax.chain(
      optax.add_decayed_weights(config.optim.weight_decay, mask=kernels),
      optax.sgd(learning_rate, momentum=config.optim.momentum, nesterov=config.optim.nesterov))


def _prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> epath.Path:
  """Creates workdir, proves it writable and refuses to resume a different run in it."""
  path = epath.Path(workdir)
  saved = path / 'config.json'
  try:
    if parallel.is_main_process():
      path.mkdir(parents=True, exist_ok=True)
      probe = path / '.write_test'
      probe.write_text('ok')
      probe.unlink()
    previous = json.loads(saved.read_text()) if saved.exists() else None
  except (OSError, ValueError) as err:
    raise WorkdirError(f'workdir {workdir} is not usable: {err}') from None
  current = json.loads(config.to_json())
  if previous is not None:
    for key in _RUN_IDENTITY:
      old, new = _get(previous, key), _get(current, key)
      if old != new:
        raise WorkdirError(f'workdir {workdir} holds a run with {key}={old!r}, not {new!r}: '
                           'use another --workdir')
  elif parallel.is_main_process():
    # Atomic: other processes of a multi-host run may read it at the same moment.
    partial = path / 'config.json.tmp'
    partial.write_text(config.to_json(indent=2))
    partial.rename(saved)
  return path


def _checkpoint_manager(path: epath.Path, keep: int) -> ocp.CheckpointManager:
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m['mean_accuracy'], reverse=False,
                                    n=1, keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True)
  return ocp.CheckpointManager(path / 'checkpoints', options=options,
                               item_names=('state', 'data'))


def _state_items(state: steps.TrainState) -> dict[str, Any]:
  return {'step': state.step, 'params': state.params, 'opt_state': state.opt_state,
          'batch_stats': state.batch_stats}


def _restore(manager: ocp.CheckpointManager, state: steps.TrainState):
  step = manager.latest_step()
  if step is None:
    return state, None
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_items(state))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  except Exception as err:  # noqa: BLE001 - any failure to read means a damaged checkpoint.
    message = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    raise CheckpointError(
        f'checkpoint {step} in {manager.directory} cannot be restored ({message}); delete that '
        'step directory to resume from an earlier one, or use a new --workdir') from None
  return state.replace(**restored['state']), restored['data']


def _evaluate(eval_fn, state, config, setup_: Setup, mesh) -> dict[str, np.ndarray]:
  """Top-1 accuracy and mean CE of every depth over the whole eval split."""
  eval_iter = data.create_eval_iterator(
      config.data.dataset, setup_.data_dir, global_batch_size=setup_.eval_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      image_size=config.data.image_size or None, subset=config.data.eval_subset)
  totals = None
  for batch in eval_iter:
    sums = eval_fn(state, parallel.shard_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = parallel.fetch(totals)
  return {'accuracy': totals['correct'] / totals['count'], 'ce': totals['ce_sum'] / totals['count']}


def _per_depth(prefix: str, values, names) -> dict[str, float]:
  return {f'{prefix}/{n}': float(v) for n, v in zip(names, np.asarray(values))}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains every depth of the DDNN in ``config``; returns the final eval metrics by depth."""
  s = setup(config)
  names = [models.depth_name(d) for d in s.depths]
  main = parallel.is_main_process()
  path = _prepare_workdir(workdir, config)

  mesh = parallel.create_mesh()
  learning_rate = create_learning_rate_fn(config, s.steps_per_epoch)
  state = steps.create_train_state(jax.random.key(config.seed), s.model, s.depths,
                                   create_optimizer(config, learning_rate), s.info.image_shape)
  state = parallel.replicate(state, mesh)
  train_step, eval_step = steps.jit_steps(
      s.depths, config.mode,
      steps.LossWeights(w=config.loss.w, alpha=config.loss.alpha,
                        temperature=config.loss.temperature),
      mesh=mesh, max_traces=1)

  manager = _checkpoint_manager(path, config.train.keep_checkpoints)
  state, data_state = _restore(manager, state)
  start = int(parallel.fetch(state.step))
  train_iter = data.create_train_iterator(
      config.data.dataset, s.data_dir, global_batch_size=config.train.batch_size,
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      image_size=config.data.image_size or None, num_workers=config.data.num_workers,
      subset=config.data.train_subset)
  if data_state is not None:
    train_iter.set_state(data_state)

  profiles = [profile.profile_subnet(s.model, s.info.image_shape, d) for d in s.depths]
  if main:
    print(f'{config.mode} on {config.data.dataset}: {config.model.arch} with sub-nets '
          f'{", ".join(names[1:]) or "none"}; {jax.device_count()} devices, '
          f'{s.num_steps} steps', flush=True)
    print(profile.format_profile_table(config.model.arch, profiles), flush=True)
    if start:
      print(f'resumed from checkpoint at step {start}', flush=True)

  writer = reporting.MetricWriter(workdir, enabled=main)
  pending = []
  eval_metrics = None
  bar = tqdm.tqdm(total=s.num_steps, initial=start, disable=not main, unit='step',
                  dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
  for step in range(start, s.num_steps):
    state, metrics = train_step(state, parallel.shard_batch(next(train_iter), mesh))
    pending.append(metrics)
    done = step + 1
    if done % config.train.log_every_steps == 0 or done == s.num_steps:
      mean = jax.tree.map(lambda *x: np.mean(np.stack(x), 0), *parallel.fetch(pending))
      pending = []
      scalars = {'train/loss': mean['loss'], 'train/learning_rate': learning_rate(step),
                 **_per_depth('train/ce', mean['ce'], names),
                 **_per_depth('train/accuracy', mean['accuracy'], names)}
      # Distillation terms of each sub-net (KL from its teacher, attention MSE) and of
      # the full net taught by the ensemble (EKD).
      for part in ('kl', 'attention'):
        if part in mean:
          scalars.update(_per_depth(f'train/{part}', mean[part], names[1:]))
        if f'{part}_full' in mean:
          scalars[f'train/{part}/{names[0]}'] = mean[f'{part}_full']
      writer.write_scalars(done, scalars)
      bar.set_postfix(loss=f'{mean["loss"]:.3f}',
                      acc='/'.join(f'{a:.2f}' for a in mean['accuracy']))
    bar.update(1)

    epoch_end = done % s.steps_per_epoch == 0
    checkpoint_metrics = None
    if epoch_end:
      eval_metrics = _evaluate(eval_step, state, config, s, mesh)
      writer.write_scalars(done, {**_per_depth('eval/accuracy', eval_metrics['accuracy'], names),
                                  **_per_depth('eval/ce', eval_metrics['ce'], names),
                                  'epoch': done // s.steps_per_epoch})
      writer.flush()
      checkpoint_metrics = {'mean_accuracy': float(np.mean(eval_metrics['accuracy']))}
      if main:
        bar.write(f'epoch {done // s.steps_per_epoch}: top-1 ' + ', '.join(
            f'{n} {a:.2%}' for n, a in zip(names, eval_metrics['accuracy'])))
    if epoch_end or done % config.train.checkpoint_every_steps == 0:
      manager.save(done, metrics=checkpoint_metrics, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_state_items(state)),
          data=ocp.args.JsonSave(train_iter.get_state())))
  bar.close()
  train_iter.close()  # Stops grain's worker processes, if any.
  manager.wait_until_finished()

  if eval_metrics is None:  # Resumed a finished run, or the run ended mid-epoch.
    eval_metrics = _evaluate(eval_step, state, config, s, mesh)
  rows = reporting.results_rows(
      [models.depth_label(config.model.arch, d) or (f'sub{k}' if k else 'single')
       for k, d in enumerate(s.depths)],
      [p.depth for p in profiles], [p.params for p in profiles], [p.flops for p in profiles],
      eval_metrics['accuracy'])
  if main:
    reporting.write_results(workdir, rows, title=f'{config.mode}: {config.model.arch} on '
                            f'{config.data.dataset}, {s.num_steps} steps')
    print(reporting.format_markdown_table(rows), flush=True)
  writer.close()
  manager.close()
  return {'step': s.num_steps, 'names': names, **eval_metrics}
