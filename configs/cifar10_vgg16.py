"""CIFAR-10, VGG-16 (BN) full net with VGG-13 and VGG-11 sub-nets."""

from configs import cifar10_resnet56


def get_config():
  config = cifar10_resnet56.get_config()
  config.model.arch = 'vgg16'
  config.model.subnets = ('vgg13', 'vgg11')
  config.optim.learning_rate = 0.05
  return config
