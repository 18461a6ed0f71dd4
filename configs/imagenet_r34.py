"""ImageNet, ResNet-34 full net with a ResNet-18 sub-net."""

from configs import imagenet_r50


def get_config(hardware: str = ''):
  config = imagenet_r50.get_config(hardware)
  config.model.arch = 'resnet34'
  config.model.subnets = ('resnet18',)
  return config
