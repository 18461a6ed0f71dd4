"""Alias of ``configs/imagenet.py:r34_r18[,HARDWARE]``: ResNet-34 with a ResNet-18 sub-net."""

from configs import imagenet


def get_config(hardware: str = ''):
  return imagenet.get_config('r34_r18' + (f',{hardware}' if hardware else ''))
