r"""Exports one depth of a trained run, or a cascade of depths, as self-contained artifacts.

  python -m ddnn_jax.export --workdir W --depth 2-2-2 --out DIR [--step N|best|latest] [--force]
  python -m ddnn_jax.export --workdir W --cascade W/cascade/chosen.json --out DIR

Writes DIR (``--out``), which holds
  model.jax       ``jax.export`` serialized StableHLO of (variables, pixels) -> logits, with a
                  symbolic batch dimension; the dataset's normalisation is inside;
  variables.npz   only the parameters and BatchNorm statistics this depth uses
                  (recalibrated if the run did not train it), flat 'params/...' keys;
  metadata.json   depth, input shape and normalisation, class names, params, FLOPs,
                  accuracy, jax version.
A cascade is written as one such artifact per stage (``DIR/stage<k>/``) and
``DIR/cascade.json`` (depths, thresholds, temperatures, score, how stages connect);
``CASCADE_LOADER`` runs it. Loading either needs exactly ``REQUIREMENTS`` (``LOADER`` below, also in the README): jax
(which brings jaxlib, numpy, ml_dtypes, opt_einsum and scipy) and flatbuffers, which
``jax.export`` deserialisation imports; nothing of ddnn_jax, flax or orbax (tested).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence

from ddnn_jax import cli
from ddnn_jax.core import errors
from ddnn_jax.deploy import artifacts, bn_calibration, early_exit, trained_run
from ddnn_jax.nn import notation


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog='python -m ddnn_jax.export', doc=__doc__,
                              example='python -m ddnn_jax.export --workdir /tmp/ddnn --depth 2-2-2 --out /tmp/r14')
  cli.add_run_flags(parser)
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument('--depth', help='the depth to export, e.g. 2-2-2 or resnet32')
  what.add_argument('--cascade', metavar='CHOSEN_JSON',
                    help='a cascade of python -m ddnn_jax.cascade: every stage and its thresholds')
  parser.add_argument('--out', required=True, help='directory to write (new or empty)')
  parser.add_argument('--force', action='store_true', help='replace a non-empty --out')
  parser.add_argument('--calib_examples', type=cli.positive_int,
                      default=bn_calibration.DEFAULT_CALIB_EXAMPLES,
                      help='training images to recalibrate BN of a depth the run did not train')
  args = parser.parse_args(argv)
  out = os.path.abspath(args.out)
  if os.path.exists(out) and not os.path.isdir(out):
    raise errors.UsageError(f'--out {out} exists and is not a directory')
  if os.path.isdir(out) and os.listdir(out) and not args.force:
    raise errors.UsageError(f'--out {out} exists and is not empty (use --force to replace '
                            'it)')
  chosen = None
  if args.cascade:
    chosen = early_exit.read_chosen(args.cascade,
                                    arch=trained_run.load_config(args.workdir).model.arch)
    with open(args.cascade, encoding='utf-8') as f:
      chosen_json = json.load(f)
  run = trained_run.load_run(args.workdir, args.step)
  if chosen is None:
    depth = run.resolve(args.depth)
    stats, recalibrated = bn_calibration.stats_for(run, depth, args.calib_examples)
  # Written next to --out and renamed into place: never a half-written artifact.
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix='.export-', dir=parent)
  os.chmod(staging, 0o755)  # mkdtemp makes it private.
  try:
    if chosen is not None:
      message = artifacts.write_cascade(run, chosen, chosen_json, args.calib_examples, staging, out)
      loader = artifacts.CASCADE_LOADER
    else:
      serialized, variables = artifacts.export_depth(run, depth, stats)
      metadata = artifacts.depth_metadata(run, depth, recalibrated,
                                          artifacts.LOADER.format(out=out))
      artifacts.write_artifact(staging, serialized, variables, metadata)
      message = (f'exported {notation.format_depth(depth)} ({metadata["params"]:,} params, '
                 f'{metadata["flops"] / 1e6:.2f}M FLOPs, BN {metadata["batch_norm"]}) to {out}')
      loader = artifacts.LOADER
    if os.path.isdir(out):
      shutil.rmtree(out)
    os.rename(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  sizes = {os.path.relpath(os.path.join(d, f), out): os.path.getsize(os.path.join(d, f))
           for d, _, files in os.walk(out) for f in files}
  print(message + ': ' + ', '.join(f'{name} {n / 1024:.1f} KiB' for name, n in sorted(
      sizes.items())))
  print(f'load it with {" and ".join(artifacts.requirements()["pip"])} installed (nothing of '
        'ddnn_jax):\n' + loader.format(out=out))


if __name__ == '__main__':
  cli.run(main)