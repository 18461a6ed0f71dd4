r"""Params and FLOPs (multiply-adds of one image) of each depth of a DDNN.

  python -m ddnn_jax.profile resnet50 --depths 3-4-4-3,3-3-3-3 --image 224
  python -m ddnn_jax.profile --config configs/imagenet.py:r50_r26
  python -m ddnn_jax.profile mobilenet_v1            # every width: 0.25, 0.5, 0.75, 1.0

Counted on the traced model (``ddnn_jax.nn.flops``), the same with oneDNN's convolutions on
or off. Writes the table to ``--out`` (Markdown) when given, and prints it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ddnn_jax import cli
from ddnn_jax.core import file_io
from ddnn_jax.data import datasets
from ddnn_jax.nn import architectures, flops, models, notation
from ddnn_jax.training import config_lib


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(
      prog='python -m ddnn_jax.profile', doc=__doc__, aliases={'--subnets': '--depths'},
      example='python -m ddnn_jax.profile resnet50 --depths 3-4-4-3,3-3-3-3')
  parser.add_argument('arch', nargs='?', help=f'full net: {", ".join(architectures.ARCHS)}')
  parser.add_argument('--config', help='a config file (FILE.py[:GROUP]): its net, sub-nets, '
                      'input size and classes')
  parser.add_argument('--depths', default='',
                      help='sub-nets beside the full net, comma-separated: names or '
                      'dash-separated block counts (default: none)')
  parser.add_argument('--image', type=int, default=0, help='input size (default 32; 224 ImageNet)')
  parser.add_argument('--channels', type=int, default=3, help='input channels')
  parser.add_argument('--classes', type=int, default=0, help='default 10; 1000 for ImageNet')
  parser.add_argument('--widths', default=None,
                      help='every depth also at these width multipliers, e.g. 0.5,1.0 '
                      '(default: 0.25,0.5,0.75,1.0 for MobileNets, else 1.0; with --config its '
                      'depth set as it is)')
  parser.add_argument('--channel_group', type=int, default=8,
                      help='narrower widths run whole groups of this many channels')
  parser.add_argument('--out', help='also write the table to this Markdown file')
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
      imagenet = architectures.arch_spec(arch).family.startswith('resnet_')
      depths = architectures.depth_set(arch, notation.parse_depths(args.depths))
      size = args.image or (224 if imagenet else 32)
      shape, classes = (size, size, args.channels), args.classes or (1000 if imagenet else 10)
      width = None
  except ValueError as err:
    parser.error(str(err))
  if args.widths is not None:
    try:
      widths = tuple(float(w) for w in args.widths.split(','))
    except ValueError:
      parser.error(f'--widths {args.widths!r}: numbers in (0, 1] joined by commas')
  elif args.config:
    widths = (1.0,)  # The config's depth set, each at its own width.
  else:
    mobilenet = 'mobilenet' in architectures.arch_spec(arch).family
    widths = (0.25, 0.5, 0.75, 1.0) if mobilenet else (1.0,)
  if not all(0 < w <= 1 for w in widths):
    parser.error(f'--widths {args.widths!r}: numbers in (0, 1] joined by commas')
  group = config.model.get('channel_group', 8) if args.config else args.channel_group
  model = models.create_model(arch, classes, width=width, channel_group=group)
  subnets = [d if notation.width_of(d) != 1.0 else notation.subnet(d, w)
             for w in sorted(widths, reverse=True) for d in depths
             if notation.width_of(d) == 1.0 or w == 1.0]
  rows = [flops.profile_subnet(model, shape, d) for d in subnets]
  table = flops.format_profile_table(arch, rows)
  if args.out:
    file_io.atomic_write(args.out, (table + '\n').encode())
  print(table)
  if args.out:
    print(f'wrote {args.out}')


if __name__ == '__main__':
  cli.run(main)
