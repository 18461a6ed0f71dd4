"""Alias of ``configs/cifar100.py:r56_r44_r32``: ResNet-56 with ResNet-44 and ResNet-32
(Table 1)."""

from configs import cifar100


def get_config():
  return cifar100.get_config('r56_r44_r32')
