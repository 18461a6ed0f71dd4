"""Alias of ``configs/cifar10.py:r56_r44_r32``: ResNet-56 with ResNet-44 and ResNet-32 (Table 1)."""

from configs import cifar10


def get_config():
  return cifar10.get_config('r56_r44_r32')
