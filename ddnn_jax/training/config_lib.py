"""The run configuration: every field checked in one place, and what a run derives from it.

``validate(config)`` checks each field of ``configs/default.py`` against a rule (one
line per field in ``RULES``) before anything is read or written; ``setup(config)`` adds
the checks that need the data (sizes, examples) and returns what the training job
derives from the config. A bad value raises ``ConfigError`` whose message names the
field, the value and what is allowed; ``main`` prints it as one line and exits with 2.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ddnn_jax.core import errors
from ddnn_jax.data import datasets, pipeline
from ddnn_jax.nn import architectures, models, notation
from ddnn_jax.training import losses

# Fields that define a run: resuming a workdir with other values is refused.
RUN_IDENTITY = ('mode', 'model.arch', 'model.subnets', 'model.width', 'model.widths',
                'model.channel_group', 'model.noise_ranking', 'data.dataset', 'data.image_size', 'data.train_subset',
                'data.validation_examples', 'train.batch_size', 'seed')
# What runs saved before a field existed trained with (their config.json lacks it).
_BEFORE_THE_FIELD = {'model.widths': [1.0], 'model.channel_group': 8,
                     'model.noise_ranking': False}
# Every other field may change on resume, e.g. a lower optim.learning_rate after a
# divergence, more train.num_epochs, other logging, checkpointing or evaluation intervals.

# Smallest input each family keeps at least 1x1 after all its downsampling.
_MIN_IMAGE_SIZE = {'cifar_resnet': 4, 'resnet_basic': 32, 'resnet_bottleneck': 32, 'vgg': 16}


UsageError, ConfigError = errors.UsageError, errors.ConfigError


def get_field(config: Mapping[str, Any], dotted: str) -> Any:
  """``config['a']['b']`` for 'a.b' (ConfigDicts and the dicts of a saved config.json)."""
  for key in dotted.split('.'):
    config = config[key]
  return config


def _flatten(config: Mapping[str, Any] | ml_collections.ConfigDict,
             prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in config.items():
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


# --- rules: each returns None when the value is allowed, else what is allowed ------------


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_at_least(low: int) -> Callable[..., str | None]:
  return lambda v, c: None if _is_int(v) and v >= low else f'an integer >= {low}'


def _optional_int_at_least(low: int) -> Callable[..., str | None]:
  return lambda v, c: None if v is None or (_is_int(v) and v >= low) else (
      f'None or an integer >= {low}')


def _number_in(low: float, high: float = math.inf, *, low_open: bool = False,
               high_open: bool = True) -> Callable[..., str | None]:
  def rule(value, config):
    del config
    ok = (_is_number(value) and math.isfinite(value)
          and (low < value if low_open else low <= value)
          and (value < high if high_open else value <= high))
    if ok:
      return None
    if high == math.inf:
      return f'a finite number {">" if low_open else ">="} {low:g}'
    return f'a number in {"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'
  return rule


def _one_of(options: Sequence[Any]) -> Callable[..., str | None]:
  return lambda v, c: None if v in options else 'one of ' + ', '.join(map(str, options))


def _boolean(value, config) -> str | None:
  del config
  return None if isinstance(value, bool) else 'True or False'


def _optional_string(value, config) -> str | None:
  del config
  return None if value is None or (isinstance(value, str) and value) else (
      'None or a non-empty string')


def _label(value, config) -> str | None:
  if value is None:
    return None
  if not (isinstance(value, str) and re.fullmatch(r'[a-z][a-z0-9_.]*', value)):
    return 'None or a name of lower-case letters, digits, _ and . (e.g. ekd_w3)'
  if value in losses.MODES and value != config.mode:
    return f'a name that is not another mode (this run trains {config.mode!r})'
  return None


def _term_gradients_every_steps(value, config) -> str | None:
  every = config.train.log_every_steps
  if _is_int(value) and value >= 0 and (value == 0 or (_is_int(every) and every >= 1
                                                       and value % every == 0)):
    return None
  return f'0 (off) or a multiple of train.log_every_steps ({every})'


def _num_subnets(config) -> int:
  try:
    return len(notation.subnet_specs(config.model.subnets))
  except ValueError:
    return 0


def _subnets(value, config) -> str | None:
  allowed = ('depths such as 2-2-2, 2-2-2@0.5, [2,2,2] or (2,2,2), a tuple of them, or names '
             'of the same family')
  try:
    specs = notation.subnet_specs(value)
    if config.mode == 'individual':
      if len(specs) > 1:
        return "at most one depth in mode 'individual' (() trains the full net)"
      resolved = [architectures.resolve_depth(depth, config.model.arch) for depth in specs]
    else:
      resolved = architectures.depth_set(config.model.arch, specs)
  except ValueError as err:
    return f'{allowed}: {err}'
  if config.mode != 'individual' and not specs:
    return f'at least one sub-net in mode {config.mode!r}'
  return _subnet_widths_allowed(resolved, config)


def _widths(value, config) -> str | None:
  allowed = 'a tuple of width multipliers in (0, 1] that holds 1.0, each once, e.g. (0.5, 1.0)'
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
    return allowed
  if not all(_is_number(w) and 0 < w <= 1 for w in value) or 1.0 not in value:
    return allowed
  if len(set(value)) != len(value):
    return allowed
  return None


def _channel_group(value, config) -> str | None:
  if not _is_int(value) or value < 1:
    return 'an integer >= 1'
  if tuple(config.model.widths) == (1.0,):
    return None
  channels = architectures.layer_channels(config.model.arch, config.model.width)
  if any(c % value for c in channels):
    return (f'an integer that divides every layer width of {config.model.arch} '
            f'({", ".join(map(str, sorted(set(channels))))}) when model.widths narrows it')
  return None


def _subnet_widths_allowed(depths, config) -> str | None:
  widths = tuple(config.model.widths) if 'widths' in config.model else (1.0,)
  for depth in depths:
    if notation.width_of(depth) not in widths:
      return (f'sub-nets at widths of model.widths={_show(tuple(widths))}, but '
              f'{notation.format_depth(depth)} has width {notation.width_of(depth):g}')
  return None


def _noise_ranking(value, config) -> str | None:
  if not isinstance(value, bool):
    return 'True or False'
  if not value:
    return None
  if architectures.arch_spec(config.model.arch).family not in (
      'cifar_resnet', 'resnet_basic', 'resnet_bottleneck'):
    return f'False for {config.model.arch}: it ranks the inner channels of ResNet blocks'
  if tuple(config.model.widths) == (1.0,):
    return 'False unless model.widths has a width below 1.0 (nothing narrower to rank for)'
  return None


def _sandwich_n(value, config) -> str | None:
  if not _is_int(value) or value < 0:
    return 'an integer >= 0'
  k = _num_subnets(config)
  if value and (config.mode == 'individual' or value > k - 1):
    return (f'0, or at most K - 1 = {k - 1} (the sub-nets besides the smallest) in a mode '
            'with sub-nets')
  if value and any(isinstance(config.loss[w], (list, tuple)) for w in ('w', 'alpha')):
    return '0 when loss.w or loss.alpha has one weight per sub-net (a subset has fewer)'
  return None


def _width(value, config) -> str | None:
  family = architectures.arch_spec(config.model.arch).family
  if value is None:
    return None
  if not _is_int(value) or value < 1:
    return 'None (the standard width) or an integer >= 1'
  if family == 'cifar_resnet' and value % 2:
    # Option-A shortcuts zero-pad the doubled channels evenly on both sides.
    return f'None or an even integer for a {family} (its shortcuts pad channels evenly)'
  return None


def _per_subnet_weight(value, config) -> str | None:
  k = _num_subnets(config)
  scalar = _number_in(0.0)
  if isinstance(value, Sequence) and not isinstance(value, str):
    if len(value) == k and all(scalar(v, config) is None for v in value):
      return None
  elif scalar(value, config) is None:
    return None
  return f'a finite number >= 0, or a tuple of K={k} of them (one per sub-net)'


def _attention_stages(value, config) -> str | None:
  num_stages = len(architectures.arch_spec(config.model.arch).stage_sizes)
  if value is None:
    return None
  if (isinstance(value, Sequence) and not isinstance(value, str) and value
      and all(_is_int(s) and 0 <= s < num_stages for s in value)
      and len(set(value)) == len(value)):
    return None
  return f'None (every stage) or a tuple of distinct stage indices in [0, {num_stages})'


def _image_size(value, config) -> str | None:
  spec = datasets.SPECS.get(config.data.dataset)
  if value is None or spec is None:
    return None
  if not spec.resize:
    return (None if value == spec.image_size else
            f'None for {spec.name}, whose images are all {spec.image_size}px')
  low = _MIN_IMAGE_SIZE[architectures.arch_spec(config.model.arch).family]
  return None if _is_int(value) and value >= low else (
      f'None or an integer >= {low} (the total stride of {config.model.arch})')


def _warmup_epochs(value, config) -> str | None:
  return _number_in(0.0, config.train.num_epochs, high_open=False)(value, config)


def _decay_epochs(value, config) -> str | None:
  epochs = config.train.num_epochs
  if (isinstance(value, Sequence) and not isinstance(value, str)
      and all(_is_int(e) and 0 < e < epochs for e in value)
      and all(a < b for a, b in zip(value, value[1:]))):
    return None
  return f'increasing whole epochs inside the run, each in (0, {epochs})'


def _batch_size(value, config) -> str | None:
  devices = jax.device_count()
  if not _is_int(value) or value < 1:
    return 'an integer >= 1'
  return None if value % devices == 0 else f'a multiple of the {devices} devices'


RULES: dict[str, Callable[[Any, ml_collections.ConfigDict], str | None]] = {
    'seed': _int_at_least(0),
    'mode': _one_of(losses.MODES),
    'init_from': _optional_string,
    'label': _label,
    'model.arch': _one_of(tuple(architectures.ARCHS)),
    'model.subnets': _subnets,
    'model.width': _width,
    'model.widths': _widths,
    'model.channel_group': _channel_group,
    'model.noise_ranking': _noise_ranking,
    'model.dtype': _one_of(('float32', 'bfloat16')),
    'model.bn_momentum': _number_in(0.0, 1.0),
    'model.remat': _boolean,
    'loss.w': _per_subnet_weight,
    'loss.alpha': _per_subnet_weight,
    'loss.temperature': _number_in(0.0, low_open=True),
    'loss.attention_stages': _attention_stages,
    'loss.noise_penalty': _number_in(0.0),
    'data.dataset': _one_of(datasets.NAMES),
    'data.data_dir': _optional_string,
    'data.source_dir': _optional_string,
    'data.image_size': _image_size,
    'data.train_subset': _optional_int_at_least(1),
    'data.eval_subset': _optional_int_at_least(1),
    'data.validation_examples': _int_at_least(0),
    'data.num_workers': _int_at_least(0),
    'train.batch_size': _batch_size,
    'train.eval_batch_size': _int_at_least(1),
    'train.num_epochs': _int_at_least(1),
    'train.eval_every_epochs': _int_at_least(1),
    'train.test_every_eval': _boolean,
    'train.log_every_steps': _int_at_least(1),
    'train.term_gradients_every_steps': _term_gradients_every_steps,
    'train.checkpoint_every_steps': _int_at_least(1),
    'train.keep_checkpoints': _int_at_least(1),
    'train.sandwich_n': _sandwich_n,
    'optim.learning_rate': _number_in(0.0),
    'optim.reference_batch_size': _int_at_least(1),
    'optim.momentum': _number_in(0.0, 1.0),
    'optim.nesterov': _boolean,
    'optim.weight_decay': _number_in(0.0),
    'optim.schedule': _one_of(('cosine', 'step')),
    'optim.warmup_epochs': _warmup_epochs,
    'optim.decay_epochs': _decay_epochs,
    'optim.decay_factor': _number_in(0.0, low_open=True),
}
# Checked first, in this order: the rules of other fields read them.
_FIRST = ('mode', 'model.arch', 'model.width', 'model.widths', 'data.dataset',
          'train.num_epochs')


def _show(value: Any) -> str:
  return repr(value) if not isinstance(value, float) else f'{value:g}'


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first field that is unknown, missing or not allowed."""
  flat = _flatten(config)
  for name in flat:
    if name not in RULES:
      raise ConfigError(f'unknown config field {name!r}')
  for name in (*_FIRST, *(n for n in RULES if n not in _FIRST)):
    if name not in flat:
      raise ConfigError(f'config field {name!r} is missing')
    allowed = RULES[name](flat[name], config)
    if allowed is not None:
      raise ConfigError(f'{name}={_show(flat[name])}: must be {allowed}')


def depths_of(config: ml_collections.ConfigDict) -> tuple[notation.Depth, ...]:
  """The depths a run trains: full net first, then its sub-nets, largest first.

  Mode 'individual' trains one depth alone: the full net, or its one sub-net.
  """
  if config.mode == 'individual':
    specs = notation.subnet_specs(config.model.subnets)
    if specs:
      return (architectures.resolve_depth(specs[0], config.model.arch),)
    return (architectures.arch_spec(config.model.arch).stage_sizes,)
  depths = architectures.depth_set(config.model.arch, config.model.subnets)
  if all(notation.width_of(d) == 1.0 for d in depths):
    return depths
  # Along two axes "larger" is more FLOPs (the teacher-assistant chain of IPKD-TA).
  from ddnn_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from ddnn_jax.nn import flops  # pylint: disable=g-import-not-at-top
  model = model_from_config(config)
  spec = datasets.get(config.data.dataset)
  shape = (config.data.image_size or spec.image_size,) * 2 + (spec.image_shape[2],)
  cost = {d: flops.profile_subnet(model, shape, d).flops for d in depths[1:]}
  return (depths[0], *sorted(depths[1:], key=lambda d: (-cost[d], notation.format_depth(d))))


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """What the training job derives from a valid config and its data."""
  model: models.DDNN
  depths: tuple[notation.Depth, ...]
  data_dir: str
  info: pipeline.DatasetInfo
  steps_per_epoch: int
  num_steps: int
  eval_batch_size: int  # Rounded up to a multiple of the device count (padding is masked).

  @property
  def depth_names(self) -> list[str]:
    return [notation.depth_name(d) for d in self.depths]


def setup(config: ml_collections.ConfigDict) -> RunSetup:
  """Validates the config, then checks it against the data; writes nothing but a
  one-off dataset preparation."""
  validate(config)
  depths = depths_of(config)
  data_dir = pipeline.ensure_prepared(config.data.dataset, config.data.data_dir,
                                      config.data.source_dir)
  info = pipeline.get_dataset_info(config.data.dataset, data_dir, config.data.image_size)
  if config.data.validation_examples >= info.num_train:
    raise ConfigError(f'data.validation_examples={config.data.validation_examples}: must be '
                      f'below the {info.num_train} training examples')
  num_train = pipeline.num_train_examples(info, config.data.train_subset,
                                          config.data.validation_examples)
  steps_per_epoch = num_train // config.train.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f'train.batch_size={config.train.batch_size}: must not exceed the '
                      f'{num_train} training examples')
  model = model_from_config(config)
  devices = jax.device_count()
  eval_batch_size = -(-config.train.eval_batch_size // devices) * devices
  return RunSetup(model, depths, data_dir, info, steps_per_epoch,
                  steps_per_epoch * config.train.num_epochs, eval_batch_size)


def check_resume(saved: Mapping[str, Any], config: ml_collections.ConfigDict,
                 workdir: str) -> None:
  """Refuses to resume a workdir whose saved config differs in a RUN_IDENTITY field."""
  current = json.loads(config.to_json())
  for key in RUN_IDENTITY:
    try:
      old = get_field(saved, key)
    except KeyError:
      old = _BEFORE_THE_FIELD.get(key)
    new = get_field(current, key)
    if old != new:
      raise UsageError(f'workdir {workdir} holds a run with {key}={old!r}, not {new!r}: '
                       'use another --workdir (fields that may change on resume: all but '
                       f'{", ".join(RUN_IDENTITY)})')


def load_config(spec: str) -> ml_collections.ConfigDict:
  """A config file as ``--config`` takes it: 'configs/cifar10.py' or 'configs/cifar10.py:GROUP'.

  Config files import ``configs.default``: run from the repository root, as for main.
  """
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(errors.config_load_error(spec, 'no such file'))
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)  # `from configs import default`, as under `python -m`.
  module_spec = importlib.util.spec_from_file_location('_ddnn_config', path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except ValueError as err:
    raise ConfigError(errors.config_load_error(spec, str(err))) from None


def model_from_config(config) -> models.DDNN:
  """The net of a run (``config.model`` on ``config.data.dataset``): the one function
  training and every deploy tool build a run's model with."""
  return models.create_model(config.model.arch, datasets.get(config.data.dataset).num_classes,
                             width=config.model.width, dtype=jnp.dtype(config.model.dtype),
                             bn_momentum=config.model.bn_momentum, remat=config.model.remat,
                             channel_group=config.model.get('channel_group', 8),
                             noise_ranking=config.model.get('noise_ranking', False))
