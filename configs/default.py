"""The offline default: CIFAR-style ResNet-20 DDNN on Fashion-MNIST, trained with EKD.

Every other config is a small override of this one. Any field can be changed from
the command line, e.g. ``--config.train.num_epochs=1 --config.mode=ddnn``. Every field
is checked before a run starts (``ddnn_jax/training/config_lib.py`` lists what each allows).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # individual | ddnn | ekd | ekd_no_ensemble | ipkd | ipkd_ta (ddnn_jax/training/losses.py).
  # 'individual' trains one depth alone: the full net if model.subnets is (), else its
  # single sub-net.
  config.mode = 'ekd'
  # A workdir whose latest parameters start this run (its optimizer state, step and BN
  # statistics are not taken): re-selected sub-nets trained on from a finished run.
  config.init_from = config_dict.placeholder(str)
  # What comparisons call this run's scheme (python -m ddnn_jax.compare); None: the mode.
  # A variant of a mode, e.g. 'ekd_w3' for mode 'ekd' with loss.w=3.
  config.label = config_dict.placeholder(str)

  config.model = ml_collections.ConfigDict()
  config.model.arch = 'resnet20'  # The full net.
  # Sub-nets: block counts per stage or named depths of the same family, e.g. ('resnet32',),
  # at a width of model.widths as 'D@W' text: ((2, 2, 2), '3-3-3@0.5').
  config.model.subnets = ((1, 1, 1), (2, 2, 2))
  config.model.width = config_dict.placeholder(int)  # First-stage channels; None: standard.
  # Width multipliers the net runs at (slimmable: the first channels of every layer); a
  # sub-net at a width is written '2-2-2@0.5'. (1.0,): depth only.
  config.model.widths = (1.0,)
  config.model.channel_group = 8  # Narrower widths run whole groups of this many channels.
  # Learn which inner channel groups of a ResNet block a narrower width keeps (trainable
  # noise ranking, ddnn_jax/nn/ranking.py) instead of the first ones; needs model.widths < 1.
  config.model.noise_ranking = False
  config.model.dtype = 'float32'  # 'bfloat16' = mixed precision (float32 parameters).
  config.model.bn_momentum = 0.9
  config.model.remat = False  # Recompute block activations in the backward pass (memory).

  config.loss = ml_collections.ConfigDict()
  # KL and attention-MSE weights: one value, or a tuple with one per sub-net (Eq. 7's w_k).
  config.loss.w = config_dict.FieldReference(1.0, field_type=object)
  # Attention maps are unit-norm over H*W, so their MSE is O(1e-3): alpha is large.
  config.loss.alpha = config_dict.FieldReference(100.0, field_type=object)
  config.loss.temperature = 1.0
  # Stages whose attention maps are distilled; None: all (the MSE is summed over them).
  config.loss.attention_stages = config_dict.placeholder(tuple)
  # Weight of the noise ranking's reward for noise (with model.noise_ranking only).
  config.loss.noise_penalty = 0.05

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'fashion_mnist'  # fashion_mnist | cifar10 | cifar100 | imagenet2012
  # tfds data_dir; None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
  config.data.data_dir = config_dict.placeholder(str)
  # Raw files prepared automatically when the dataset is missing (Debian dataset-fashion-mnist).
  config.data.source_dir = config_dict.FieldReference(
      '/usr/share/datasets/fashion-mnist', field_type=str)  # Typed: presets may set None.
  config.data.image_size = config_dict.placeholder(int)  # ImageNet crop; None: 224.
  config.data.train_subset = config_dict.placeholder(int)  # Train on the first N only.
  config.data.eval_subset = config_dict.placeholder(int)
  # A fixed, seeded slice of the train split held out from training: the 'validation'
  # split of `python -m ddnn_jax.evaluate` and `search` (the test split is for reporting).
  config.data.validation_examples = 5000
  config.data.num_workers = 0  # grain worker processes for the train pipeline.

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128  # Global, over all devices and hosts.
  config.train.eval_batch_size = 512
  config.train.num_epochs = 5  # ~16 min on 2 CPU cores (README, Results).
  config.train.eval_every_epochs = 1
  # With a validation split, evaluations during training use it and the test split is
  # evaluated at the end (it reports); True: the test split at every evaluation too.
  config.train.test_every_eval = False
  config.train.log_every_steps = 50
  # > 0: every this many steps (a multiple of log_every_steps) log each weighted loss
  # term's gradient norm (all parameters, and those every depth shares): one backward
  # pass per term there, ~6 steps' time for EKD with two sub-nets. 0: off.
  config.train.term_gradients_every_steps = 0
  config.train.checkpoint_every_steps = 500  # Also saved at every evaluation.
  config.train.keep_checkpoints = 2  # Latest ones kept, plus the best by mean eval accuracy.
  # Sandwich rule: > 0 trains, each step, the full net, the smallest sub-net and this many
  # others drawn at random (0: every depth every step).
  config.train.sandwich_n = 0

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
