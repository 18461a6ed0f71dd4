"""CIFAR-10, ResNet-56 full net with ResNet-44 and ResNet-32 sub-nets (Table 1 of the paper)."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.arch = 'resnet56'
  config.model.subnets = ('resnet44', 'resnet32')
  config.data.dataset = 'cifar10'
  config.data.source_dir = ''  # Prepare first: python -m ddnn_jax.prepare cifar10 --from DIR
  config.train.batch_size = 128
  config.train.num_epochs = 200
  config.optim.learning_rate = 0.1
  config.optim.weight_decay = 5e-4
  config.optim.schedule = 'step'
  config.optim.decay_epochs = (100, 150)
  return config
