"""The offline default: CIFAR-style ResNet-20 DDNN on Fashion-MNIST, trained with EKD.

Every other config is a small override of this one. Any field can be changed from
the command line, e.g. ``--config.train.num_epochs=1 --config.mode=ddnn``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # individual | ddnn | ekd | ipkd | ipkd_ta (see ddnn_jax/losses.py). 'individual' trains
  # one depth alone: the full net if model.subnets is (), else its single sub-net.
  config.mode = 'ekd'

  config.model = ml_collections.ConfigDict()
  config.model.arch = 'resnet20'  # The full net.
  # Sub-nets: block counts per stage or named depths of the same family, e.g. ('resnet32',).
  config.model.subnets = ((1, 1, 1), (2, 2, 2))
  config.model.width = 0  # Channels of the first stage; 0 = the family's standard width.
  config.model.dtype = 'float32'  # 'bfloat16' = mixed precision (float32 parameters).
  config.model.bn_momentum = 0.9

  config.loss = ml_collections.ConfigDict()
  config.loss.w = 1.0  # KL distillation weight.
  # Attention maps are unit-norm over H*W, so their MSE is O(1e-3): alpha is large.
  config.loss.alpha = 100.0
  config.loss.temperature = 1.0

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'fashion_mnist'  # fashion_mnist | cifar10 | cifar100 | imagenet2012
  config.data.data_dir = ''  # tfds data_dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets.
  # Raw files prepared automatically when the dataset is missing (Debian dataset-fashion-mnist).
  config.data.source_dir = '/usr/share/datasets/fashion-mnist'
  config.data.image_size = 0  # ImageNet crop size; 0 = the dataset's own size.
  config.data.train_subset = 0  # >0: train on the first N examples only (short runs).
  config.data.eval_subset = 0
  config.data.num_workers = 0  # grain worker processes for the train pipeline.

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128  # Global, over all devices and hosts.
  config.train.eval_batch_size = 512
  config.train.num_epochs = 30
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 500  # Also saved at the end of every epoch.
  config.train.keep_checkpoints = 2  # Latest ones kept, plus the best by mean eval accuracy.

  config.optim = ml_collections.ConfigDict()
  # Peak LR = learning_rate * batch_size / reference_batch_size (linear scaling rule).
  config.optim.learning_rate = 0.1
  config.optim.reference_batch_size = 128
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 5e-4  # On conv/dense kernels.
  config.optim.schedule = 'cosine'  # cosine | step
  config.optim.warmup_epochs = 0.0
  # step schedule: epochs at which the LR is multiplied by decay_factor.
  config.optim.decay_epochs = ()
  config.optim.decay_factor = 0.1
  return config
