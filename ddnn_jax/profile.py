r"""Params and FLOPs (multiply-adds of one image) of each depth of a DDNN.

  python -m ddnn_jax.profile resnet50 --subnets 3-4-4-3,3-3-3-3 --image 224
  python -m ddnn_jax.profile --config configs/imagenet.py:r50_r26

Counted on the traced model (``ddnn_jax.flops``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ddnn_jax import cli, config_lib, datasets, flops, models


def main(argv: Sequence[str] | None = None) -> None:
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
  print(flops.format_profile_table(arch, [flops.profile_subnet(model, shape, d)
                                          for d in depths]))


if __name__ == '__main__':
  cli.run(main)
