"""The evidence study's regime: ResNet-20 EKD on 20,000 Fashion-MNIST images, 30 epochs.

  python -m ddnn_jax.study --preset fmnist20k --hours 6     # the study (docs/studies/fmnist20k)
  python -m ddnn_jax.main --config configs/fmnist20k.py --workdir /tmp/fmnist20k   # one run

Small enough to train many seeds on a CPU, large enough that the depths differ: 20,000
training images (``data.train_subset``), 5,000 held out for validation (every choice is
made on those), ResNet-20 (width 16) with sub-nets 2-2-2 and 1-1-1; the rest is the
default config. Runs log every loss term, and every 200 steps each term's gradient
norm (the diagnosis).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.arch = 'resnet20'
  config.model.width = 16
  config.model.subnets = ((2, 2, 2), (1, 1, 1))
  config.data.train_subset = 20_000
  config.data.validation_examples = 5_000
  config.train.num_epochs = 30
  config.train.term_gradients_every_steps = 200  # ~3% of the run's time.
  return config
