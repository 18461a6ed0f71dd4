"""ImageNet presets, one per group of the paper's Table 2: ``configs/imagenet.py:GROUP[,HARDWARE]``.

  python -m ddnn_jax.main --config=configs/imagenet.py:r50_r26,v4_32 --workdir gs://B/r50_r26

90 epochs of SGD, 5 warm-up epochs then cosine decay, LR 0.1 per 256 images, weight
decay 1e-4, bfloat16 compute. A hardware preset sets the global batch (the LR follows).
Sub-net names count layers: R26 = [2,2,2,2] bottleneck blocks (3 per block, plus 2).
"""

from configs import default

# Group -> (full net, sub-nets).
GROUPS = {
    'r34_r18': ('resnet34', ('resnet18',)),
    'r50_r26': ('resnet50', ((2, 2, 2, 2),)),
    'r50_r32': ('resnet50', ((2, 3, 3, 2),)),
    'r50_r41': ('resnet50', ((3, 4, 4, 2),)),
    'r50_r44_r38': ('resnet50', ((3, 4, 4, 3), (3, 3, 3, 3))),
}
# Global batch per hardware preset (fits a ResNet-50 DDNN with 3 depths in bf16).
HARDWARE = {
    'gpu8': 1024,  # 8 x A100/H100 80GB: 128 per GPU.
    'v4_8': 1024,  # TPU v4-8 (4 chips).
    'v4_32': 4096,
    'v3_32': 2048,  # TPU v3-32 (32 cores).
}


def get_config(arg: str = 'r50_r44_r38'):
  group, _, hardware = arg.partition(',')
  if group not in GROUPS:
    raise ValueError(f'unknown group {group!r}; known groups: {", ".join(GROUPS)}')
  if hardware and hardware not in HARDWARE:
    raise ValueError(f'unknown hardware preset {hardware!r}; choose one of {", ".join(HARDWARE)}')
  config = default.get_config()
  config.model.arch, config.model.subnets = GROUPS[group]
  config.model.dtype = 'bfloat16'
  config.data.dataset = 'imagenet2012'
  config.data.source_dir = None
  config.data.validation_examples = 0  # ImageNet's own validation set is the test split.
  config.data.num_workers = 16
  config.train.batch_size = HARDWARE[hardware] if hardware else 1024
  config.train.eval_batch_size = 1000
  config.train.num_epochs = 90
  config.train.log_every_steps = 100
  config.train.checkpoint_every_steps = 2000
  config.optim.learning_rate = 0.1
  config.optim.reference_batch_size = 256
  config.optim.weight_decay = 1e-4
  config.optim.schedule = 'cosine'
  config.optim.warmup_epochs = 5.0
  return config
