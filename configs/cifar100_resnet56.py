"""CIFAR-100, ResNet-56 full net with ResNet-44 and ResNet-32 sub-nets."""

from configs import cifar10_resnet56


def get_config():
  config = cifar10_resnet56.get_config()
  config.data.dataset = 'cifar100'
  return config
