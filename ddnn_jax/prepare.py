r"""Prepares a dataset offline into a tfds ArrayRecord data_dir (no TensorFlow, no network).

  python -m ddnn_jax.prepare fashion_mnist --from /usr/share/datasets/fashion-mnist
  python -m ddnn_jax.prepare cifar10 --from ~/Downloads --data_dir /data/tfds

Reads the original archives from a local folder and writes the dataset (name, version,
features) that stock tfds would (``ddnn_jax.data.preparation``). Writes
``DATA_DIR/<name>/<version>/`` (ArrayRecord shards and the dataset info).
"""

from __future__ import annotations

from collections.abc import Sequence

from ddnn_jax import cli
from ddnn_jax.data import datasets, preparation


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog='python -m ddnn_jax.prepare', doc=__doc__,
                              example='python -m ddnn_jax.prepare cifar10 --from ~/Downloads')
  parser.add_argument('name', choices=datasets.PREPARABLE)
  parser.add_argument('--from', dest='source_dir', required=True,
                      help='folder with the original archives or files')
  parser.add_argument('--data_dir', default=preparation.default_data_dir(),
                      help='tfds data_dir to write into (default: %(default)s)')
  args = parser.parse_args(argv)
  path = preparation.prepare(args.name, args.source_dir, args.data_dir)
  print(f'{args.name} is prepared in {path}')


if __name__ == '__main__':
  cli.run(main)
