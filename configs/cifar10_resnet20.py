"""CIFAR-10, ResNet-20 full net with sub-nets [1,1,1] and [2,2,2]."""

from configs import cifar10_resnet56


def get_config():
  config = cifar10_resnet56.get_config()
  config.model.arch = 'resnet20'
  config.model.subnets = ((2, 2, 2), (1, 1, 1))
  return config
