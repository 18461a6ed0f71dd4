"""CIFAR-100 presets, one per group of the paper's Table 1: ``configs/cifar100.py:GROUP``.

The groups and schedule of ``configs/cifar10.py``, on CIFAR-100.
"""

from configs import cifar10

GROUPS = cifar10.GROUPS


def get_config(group: str = 'r56_r44_r32'):
  config = cifar10.get_config(group)
  config.data.dataset = 'cifar100'
  return config
