"""CIFAR-10, VGG-16 (BN) with VGG-13 and VGG-11 sub-nets (both of the paper's VGG groups,
trained at once)."""

from configs import cifar10


def get_config():
  config = cifar10.get_config('vgg16_vgg13')
  config.model.subnets = ('vgg13', 'vgg11')
  return config
