"""Alias of ``configs/imagenet.py:r50_r44_r38[,HARDWARE]``: ResNet-50 with [3,4,4,3] and
[3,3,3,3] sub-nets (Table 2), e.g. ``--config=configs/imagenet_r50.py:v3_32``."""

from configs import imagenet


def get_config(hardware: str = ''):
  return imagenet.get_config('r50_r44_r38' + (f',{hardware}' if hardware else ''))
