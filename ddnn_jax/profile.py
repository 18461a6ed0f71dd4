"""Parameters and FLOPs (multiply-adds) of each sub-net, measured on the model itself.

FLOPs are counted the way the DDNN/ResNet papers count them: multiply-adds of the
convolutions and the classifier in one forward pass of one image. They are read off
the traced model (every ``nn.Conv``/``nn.Dense`` call is intercepted under
``jax.eval_shape``), so nothing here is a hand-maintained formula.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddnn_jax import cli, config_lib, datasets, models


@dataclasses.dataclass(frozen=True)
class SubnetProfile:
  depth: models.Depth
  params: int  # Trainable parameters the sub-net uses (BN scale/bias included, statistics not).
  flops: int  # Multiply-adds of one forward pass of one image.


def _count_macs(fn, *args) -> int:
  """Multiply-adds of every ``nn.Conv``/``nn.Dense`` call made while tracing ``fn(*args)``."""
  macs = 0

  def interceptor(next_fun, args, kwargs, context):
    nonlocal macs
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__':
      module = context.module
      if isinstance(module, nn.Conv):
        kernel = math.prod(module.kernel_size)
        in_features = args[0].shape[-1] // module.feature_group_count
        macs += math.prod(out.shape[1:]) * kernel * in_features
      elif isinstance(module, nn.Dense):
        macs += math.prod(out.shape[1:]) * args[0].shape[-1]
    return out

  with nn.intercept_methods(interceptor):
    jax.eval_shape(fn, *args)
  return macs


def count_params(params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


def profile_subnet(model: models.DDNN, input_shape: Sequence[int],
                   depth: Sequence[int] | None = None) -> SubnetProfile:
  """Params and FLOPs of ``model`` at ``depth`` (None: the full net) for one HWC image."""
  depth = model.stage_sizes if depth is None else models.check_depth(depth, model.stage_sizes,
                                                                     model.arch)
  image = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, depth=depth, train=False), image)
  flops = _count_macs(lambda v, x: model.apply(v, x, depth=depth, train=False), variables, image)
  return SubnetProfile(depth=depth, params=count_params(variables['params']), flops=flops)


def shared_trunk_flops(model: models.DDNN, input_shape: Sequence[int],
                       depths: Sequence[models.Depth]) -> int:
  """Multiply-adds of one image through all ``depths`` at once, shared prefixes counted once.

  What a training step's forward pass costs (``DDNN.train_forward``); compare with the
  sum of the depths' own FLOPs.
  """
  image = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)

  def variables(depth=None):
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, depth=depth, train=False),
                          image)

  params = variables()['params']
  stats = [variables(d)['batch_stats'] for d in depths]
  return _count_macs(
      lambda p, s, x: model.apply({'params': p}, x, tuple(depths), s,
                                  method=models.DDNN.train_forward, mutable=['batch_stats']),
      params, stats, image)


def format_profile_table(arch: str, profiles: Sequence[SubnetProfile]) -> str:
  """A Markdown table of the sub-nets' sizes, full net first."""
  lines = [f'| {arch} depth | blocks | Params (M) | FLOPs (M) |', '|---|---|---|---|']
  for p in profiles:
    lines.append(f'| {models.format_depth(p.depth)} | {sum(p.depth)} | '
                 f'{p.params / 1e6:.3f} | {p.flops / 1e6:.1f} |')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  """``python -m ddnn_jax.profile resnet50 --subnets 3-4-4-3,3-3-3-3 --image 224``, or
  ``python -m ddnn_jax.profile --config configs/imagenet.py:r50_r26``."""
  parser = cli.ArgumentParser(prog='python -m ddnn_jax.profile',
                              description='Params and FLOPs of each depth of a DDNN.')
  parser.add_argument('arch', nargs='?', help=f'full net: {", ".join(models.ARCHS)}')
  parser.add_argument('--config', help='a config file (FILE.py[:GROUP]): its net, sub-nets, '
                      'input size and classes')
  parser.add_argument('--subnets', default='',
                      help='comma-separated depths: names or dash-separated block counts')
  parser.add_argument('--image', type=int, default=0, help='input size (default 32; 224 ImageNet)')
  parser.add_argument('--channels', type=int, default=3)
  parser.add_argument('--classes', type=int, default=0, help='default 10; 1000 for ImageNet')
  args = parser.parse_args(argv)
  if (args.arch is None) == (args.config is None):
    parser.error('give a full net (e.g. resnet50) or --config, not both')
  try:
    if args.config:
      config = config_lib.load_config(args.config)
      config_lib.validate(config)
      spec = datasets.get(config.data.dataset)
      arch, depths = config.model.arch, config_lib.depths_of(config)
      size = config.data.image_size or spec.image_size
      shape, classes = (size, size, spec.image_shape[2]), spec.num_classes
      width = config.model.width
    else:
      arch = args.arch
      imagenet = models.arch_spec(arch).family.startswith('resnet_')
      depths = models.depth_set(arch, models.parse_depths(args.subnets))
      size = args.image or (224 if imagenet else 32)
      shape, classes = (size, size, args.channels), args.classes or (1000 if imagenet else 10)
      width = None
  except ValueError as err:
    parser.error(str(err))
  model = models.create_model(arch, classes, width=width)
  print(format_profile_table(arch, [profile_subnet(model, shape, d) for d in depths]))


if __name__ == '__main__':
  cli.run(main)
