"""CIFAR-10, ResNet-20 with sub-nets [2,2,2] and [1,1,1] (not a group of the paper: the
offline default's depth set, on CIFAR-10)."""

from configs import cifar10


def get_config():
  config = cifar10.get_config('r20_r16')
  config.model.subnets = ((2, 2, 2), (1, 1, 1))
  return config
