"""Parameters and FLOPs (multiply-adds) of each sub-net, measured on the model itself.

The library behind ``python -m ddnn_jax.profile`` and every results table.

FLOPs are counted the way the DDNN/ResNet papers count them: multiply-adds of the
convolutions and the classifier in one forward pass of one image. They are read off
the traced model (every ``nn.Conv``/``nn.Dense`` call is intercepted under
``jax.eval_shape``, with XLA's convolutions so that oneDNN's fused inference calls are
counted too), so nothing here is a hand-maintained formula.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddnn_jax.cpu import onednn
from ddnn_jax.nn import models, notation


@dataclasses.dataclass(frozen=True)
class SubnetProfile:
  depth: notation.Depth
  params: int  # Trainable parameters the sub-net uses (BN scale/bias included, statistics not).
  flops: int  # Multiply-adds of one forward pass of one image.


def _count_macs(fn, *args) -> int:
  """Multiply-adds of every ``nn.Conv``/``nn.Dense`` call made while tracing ``fn(*args)``."""
  return sum(_macs_by_module(fn, *args).values())


def _macs_by_module(fn, *args) -> dict[str, int]:
  """Multiply-adds of ``fn(*args)`` by top-level module of the net (in call order)."""
  macs: dict[str, int] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__':
      module = context.module
      if isinstance(module, nn.Conv):
        kernel = math.prod(module.kernel_size)
        # Grouped convs here are depthwise (one input channel per output), also when a
        # narrower width runs fewer of their groups.
        depthwise = module.feature_group_count > 1
        in_features = 1 if depthwise else args[0].shape[-1]
        count = math.prod(out.shape[1:]) * kernel * in_features
      elif isinstance(module, nn.Dense):
        count = math.prod(out.shape[1:]) * args[0].shape[-1]
      else:
        return out
      top = module.path[0] if module.path else module.name
      macs[top] = macs.get(top, 0) + count
    return out

  # Traced with XLA's convolutions: inference with oneDNN folds BatchNorm into one call
  # per convolution that no nn.Conv makes, and the arithmetic is the same either way.
  with onednn.disabled(), nn.intercept_methods(interceptor):
    jax.eval_shape(fn, *args)
  return macs


def module_flops(model: models.DDNN, input_shape: Sequence[int], depth: notation.Depth
                 ) -> dict[str, int]:
  """Multiply-adds of one image per top-level module ``depth`` runs (stem, blocks, head):
  what a cascade stage saves when it continues another depth's shared leading modules."""
  image = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  variables = models.variable_shapes(model, input_shape, depth)
  return _macs_by_module(lambda v, x: model.apply(v, x, depth=depth, train=False), variables,
                         image)


def count_params(params) -> int:
  """Parameters a deployed net uses (not the noise ranking's logits, which train only)."""
  return sum(math.prod(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(params)
             if not str(getattr(path[-1], 'key', '')).startswith('noise_logit'))


def profile_subnet(model: models.DDNN, input_shape: Sequence[int],
                   depth: Sequence[int] | None = None) -> SubnetProfile:
  """Params and FLOPs of ``model`` at ``depth`` (None: the full net) for one HWC image."""
  depth = model.stage_sizes if depth is None else notation.check_depth(depth, model.stage_sizes,
                                                                       model.arch)
  image = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  variables = models.variable_shapes(model, input_shape, depth)
  flops = _count_macs(lambda v, x: model.apply(v, x, depth=depth, train=False), variables, image)
  return SubnetProfile(depth=depth, params=count_params(variables['params']), flops=flops)


def shared_trunk_flops(model: models.DDNN, input_shape: Sequence[int],
                       depths: Sequence[notation.Depth]) -> int:
  """Multiply-adds of one image through all ``depths`` at once, shared prefixes counted once.

  What a training step's forward pass costs (``DDNN.train_forward``); compare with the
  sum of the depths' own FLOPs.
  """
  image = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  params = models.variable_shapes(model, input_shape)['params']
  stats = [models.variable_shapes(model, input_shape, d)['batch_stats'] for d in depths]
  return _count_macs(
      lambda p, s, x: model.apply({'params': p}, x, tuple(depths), s,
                                  method=models.DDNN.train_forward, mutable=['batch_stats']),
      params, stats, image)


def format_profile_table(arch: str, profiles: Sequence[SubnetProfile]) -> str:
  """A Markdown table of the sub-nets' sizes, full net first."""
  lines = [f'| {arch} depth | blocks | Params (M) | FLOPs (M) |', '|---|---|---|---|']
  # (A depth at a width below 1 is written D@W.)
  for p in profiles:
    lines.append(f'| {notation.format_depth(p.depth)} | {sum(p.depth)} | '
                 f'{p.params / 1e6:.3f} | {p.flops / 1e6:.1f} |')
  return '\n'.join(lines)
