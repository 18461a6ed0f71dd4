"""ImageNet, ResNet-50 full net with [3,4,4,3] and [3,3,3,3] sub-nets (Table 2 of the paper).

90 epochs of SGD, 5 warm-up epochs then cosine decay, LR 0.1 per 256 images,
bfloat16 compute. Hardware presets set the global batch, e.g.
``--config=configs/imagenet_r50.py:v3_32``; the LR follows the batch.
"""

from configs import default

# Global batch per preset (fits ResNet-50 DDNN with 3 depths in bf16).
HARDWARE = {
    'gpu8': 1024,  # 8 x A100/H100 80GB: 128 per GPU.
    'v4_8': 1024,  # TPU v4-8 (4 chips).
    'v4_32': 4096,
    'v3_32': 2048,  # TPU v3-32 (32 cores).
}


def get_config(hardware: str = ''):
  config = default.get_config()
  config.model.arch = 'resnet50'
  config.model.subnets = ((3, 4, 4, 3), (3, 3, 3, 3))
  config.model.dtype = 'bfloat16'
  config.data.dataset = 'imagenet2012'
  config.data.source_dir = ''
  config.data.image_size = 224
  config.data.num_workers = 16
  if hardware and hardware not in HARDWARE:
    raise ValueError(f'unknown hardware preset {hardware!r}; choose one of {", ".join(HARDWARE)}')
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
