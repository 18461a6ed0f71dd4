"""CIFAR-10 presets, one per group of the paper's Table 1: ``configs/cifar10.py:GROUP``
(and ``mbv1_slim``, the IPKD-TA setting of slimmable MobileNet-V1).

  python -m ddnn_jax.main --config=configs/cifar10.py:r56_r44 --workdir /tmp/r56_r44

200 epochs of SGD (Nesterov 0.9), batch 128, LR 0.1 (VGG: 0.05) divided by 10 at
epochs 100 and 150, weight decay 5e-4, pad-4 crop + flip. Prepare the data first:
``python -m ddnn_jax.prepare cifar10 --from DIR``.
"""

from configs import default

# Group -> (full net, sub-nets). K = 1 unless two sub-nets are given.
GROUPS = {
    'r20_r16': ('resnet20', ((2, 2, 2),)),  # ResNet-16: two blocks per stage.
    'r32_r20': ('resnet32', ('resnet20',)),
    'r44_r32': ('resnet44', ('resnet32',)),
    'r56_r44': ('resnet56', ('resnet44',)),
    'r56_r44_r32': ('resnet56', ('resnet44', 'resnet32')),
    'vgg16_vgg11': ('vgg16', ('vgg11',)),
    'vgg16_vgg13': ('vgg16', ('vgg13',)),
    # Not a group of the paper: the IPKD-TA setting, slimmable MobileNet-V1 at four widths
    # (the full depth at 0.75, 0.5 and 0.25 as sub-nets), each taught by the next wider.
    'mbv1_slim': ('mobilenet_v1', ('1-2-2-6-2@0.75', '1-2-2-6-2@0.5', '1-2-2-6-2@0.25')),
}
WIDTHS = {'mbv1_slim': (0.25, 0.5, 0.75, 1.0)}
MODES = {'mbv1_slim': 'ipkd_ta'}


def get_config(group: str = 'r56_r44_r32'):
  if group not in GROUPS:
    raise ValueError(f'unknown group {group!r}; known groups: {", ".join(GROUPS)}')
  config = default.get_config()
  config.model.arch, config.model.subnets = GROUPS[group]
  config.model.widths = WIDTHS.get(group, (1.0,))
  config.mode = MODES.get(group, config.mode)
  config.data.dataset = 'cifar10'
  config.data.source_dir = None  # Prepared by `python -m ddnn_jax.prepare cifar10 --from DIR`.
  config.data.validation_examples = 0  # The paper trains on all 50,000 images.
  config.train.batch_size = 128
  config.train.num_epochs = 200
  config.optim.learning_rate = 0.05 if config.model.arch.startswith('vgg') else 0.1
  config.optim.weight_decay = 5e-4
  config.optim.schedule = 'step'
  config.optim.decay_epochs = (100, 150)
  return config
