"""What ddnn_jax knows about each dataset, in one table.

``pipeline`` reads and augments the datasets, ``preparation`` writes them offline,
``ddnn_jax.training.config_lib`` validates configs against them; all three take their
facts from here.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # Native (H, W, C); ImageNet: the default crop.
  eval_split: str  # The split reported as "test" (ImageNet has no labelled test split).
  mean: tuple[float, ...]  # Per channel, of pixel values in [0, 1], over the train split.
  std: tuple[float, ...]
  pad: int  # Train augmentation: zero-pad by this and random-crop back.
  # Variable-size images: random-resized crop (train), resize + centre crop (eval).
  resize: bool = False
  preparable: bool = False  # `python -m ddnn_jax.prepare` writes it from the original files.
  extra_labels: tuple[tuple[str, int], ...] = ()  # Other label features and their classes.

  @property
  def image_size(self) -> int:
    return self.image_shape[0]

  def normalization(self) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift), float32 per channel: a pixel p in [0, 255] is fed as p * scale - shift
    (mean 0 and std 1 over the train split)."""
    std = np.asarray(self.std, np.float32)
    return 1 / (255 * std), np.asarray(self.mean, np.float32) / std


SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec('fashion_mnist', 10, (28, 28, 1), 'test', (0.2860,), (0.3530,), pad=2,
                preparable=True),
    DatasetSpec('cifar10', 10, (32, 32, 3), 'test', (0.4914, 0.4822, 0.4465),
                (0.2470, 0.2435, 0.2616), pad=4, preparable=True),
    DatasetSpec('cifar100', 100, (32, 32, 3), 'test', (0.5071, 0.4865, 0.4409),
                (0.2673, 0.2564, 0.2762), pad=4, preparable=True,
                extra_labels=(('coarse_label', 20),)),
    DatasetSpec('imagenet2012', 1000, (224, 224, 3), 'validation', (0.485, 0.456, 0.406),
                (0.229, 0.224, 0.225), pad=0, resize=True),
)}
NAMES: tuple[str, ...] = tuple(SPECS)
PREPARABLE: tuple[str, ...] = tuple(name for name, spec in SPECS.items() if spec.preparable)


def get(name: str) -> DatasetSpec:
  """The spec of ``name``; ValueError naming the known datasets otherwise."""
  if name not in SPECS:
    raise ValueError(f"unknown dataset '{name}'; choose one of {', '.join(NAMES)}")
  return SPECS[name]
