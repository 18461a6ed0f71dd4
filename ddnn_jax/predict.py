r"""Classifies image files with a trained run, at a chosen depth or within a latency budget.

  python -m ddnn_jax.predict --workdir W --images a.png b.jpg ... \
      [--depth D | --latency_ms X | --cascade W/cascade/chosen.json]

Images are converted to the dataset's channels and input size; the top 5 classes and
their probabilities are printed per image, with the depth used. Writes the same to
``--out`` (CSV) when given; nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ddnn_jax import cli
from ddnn_jax.core import errors, file_io
from ddnn_jax.deploy import dynamic, early_exit, trained_run
from ddnn_jax.nn import notation


def read_image(path: str, shape: tuple[int, int, int]) -> np.ndarray:
  """An image file as pixels [H, W, C] in [0, 255], resized (bilinear) to ``shape``."""
  if not os.path.isfile(path):
    raise errors.UsageError(f'{path} is not a file')
  try:
    with Image.open(path) as image:
      image = image.convert('L' if shape[2] == 1 else 'RGB')
      if image.size != (shape[1], shape[0]):
        image = image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
      pixels = np.asarray(image, np.float32)
  except (UnidentifiedImageError, OSError) as err:
    raise errors.UsageError(f'{path} is not a readable image ({err})') from None
  return pixels.reshape(shape)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog='python -m ddnn_jax.predict', doc=__doc__,
                              example='python -m ddnn_jax.predict --workdir /tmp/ddnn --images shoe.png --depth 2-2-2')
  cli.add_run_flags(parser)
  parser.add_argument('--images', nargs='+', required=True, help='PNG or JPEG files')
  choice = parser.add_mutually_exclusive_group()
  choice.add_argument('--depth', help='depth to run, e.g. 2-2-2 (default: the full net)')
  choice.add_argument('--latency_ms', type=cli.positive_float,
                      help='run the most accurate depth within this batch-1 latency')
  choice.add_argument('--cascade', metavar='CHOSEN_JSON',
                      help='run a confidence cascade (python -m ddnn_jax.cascade): each image '
                      'stops at the first depth confident enough')
  parser.add_argument('--top', type=cli.positive_int, default=5, help='classes shown per image')
  parser.add_argument('--out', help='also write the predictions to this CSV file')
  args = parser.parse_args(argv)
  if args.out and os.path.isdir(args.out):
    raise errors.UsageError(f'--out {args.out} is a directory')

  # Every image (and the cascade file) is read before the (slower) model: a bad one fails
  # at once.
  config = trained_run.load_config(args.workdir)
  shape = trained_run.input_shape(config)
  pixels = np.stack([read_image(path, shape) for path in args.images])
  cascade = None
  if args.cascade:
    cascade = early_exit.read_chosen(args.cascade, arch=config.model.arch)
    model = dynamic.DynamicModel.load(args.workdir, list(cascade.depths), step=args.step)
    prediction = model.predict(pixels, cascade=cascade)
  elif args.latency_ms is not None:
    # Chosen from the evaluated accuracies and latencies, then only that depth is loaded.
    model = dynamic.DynamicModel.load(args.workdir, 'evaluated', step=args.step)
    prediction = model.predict(pixels, depth=model.choose(args.latency_ms))
  else:
    model = dynamic.DynamicModel.load(args.workdir, [args.depth] if args.depth else 'trained',
                                      step=args.step)
    prediction = model.predict(pixels, depth=model.depths[0] if args.depth else None)
  names = model.class_names
  depths = prediction.exit_depths or (prediction.depth,) * len(args.images)
  if cascade:
    print(f'cascade {" -> ".join(map(notation.format_depth, cascade.depths))}, thresholds '
          f'{", ".join(f"{t:g}" for t in cascade.thresholds)} ({cascade.score})')
  else:
    print(f'depth {notation.format_depth(prediction.depth)}'
          + (f' (most accurate within {args.latency_ms:g} ms)' if args.latency_ms else ''))
  rows = []
  for path, top, depth in zip(args.images, prediction.top(args.top), depths, strict=True):
    shown = ', '.join(f'{names[c]} {p:.1%}' for c, p in top)
    print(f'{path}: {shown}' + (f' (depth {notation.format_depth(depth)})' if cascade else ''))
    rows.append({'image': path, 'depth': notation.format_depth(depth),
                 **{f'top{i + 1}': names[c] for i, (c, _) in enumerate(top)},
                 **{f'p{i + 1}': f'{p:.6f}' for i, (_, p) in enumerate(top)}})
  if args.out:
    file_io.atomic_write(args.out, file_io.csv_text(rows, list(rows[0])).encode())


if __name__ == '__main__':
  cli.run(main)
