"""CIFAR-10 (TFDS) with a 6-layer ViT on 4x4 patches (an 8x8 grid of 64 tokens).

Needs the dataset prepared once as ArrayRecord files in ``$DATA`` (on a machine with network
access and ``pip install tensorflow``)::

    tfds build cifar10 --data_dir=$DATA --file_format=array_record

Command (20k steps of batch 256, ~100 epochs; about 15 min on one H100, bounded by host-side
PNG decoding: an estimate, not a measurement)::

    python -m experiments.train --config=experiments/configs/cifar10_vit.py \\
        --workdir=$WORKDIR/cifar10_vit --config.data.data_dir=$DATA

Neighborhood attention instead of dense (kernel 4x4 on the 8x8 grid)::

    python -m experiments.train --config=experiments/configs/cifar10_vit.py \\
        --workdir=$WORKDIR/cifar10_nat --config.data.data_dir=$DATA --config.model.mixer=neighborhood \\
        --config.model.mixer_fields.neighborhood.kernel_size=4
"""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.data.name = "tfds_image"
  c.data.tfds_name = "cifar10"
  c.data.data_dir = ""
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.image_size = (32, 32)
  c.data.channels = 3
  c.data.num_classes = 10
  c.data.augment = True
  c.batch_size = 256
  c.num_train_steps = 20_000
  c.log_every = 100
  c.eval_every = 2000
  c.eval_steps = 40
  c.model.kind = "vit"
  c.model.patch_size = 4
  c.model.dim = 192
  c.model.num_layers = 6
  c.model.mlp_dim = 768
  c.model.num_heads = 3
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 1000
  c.optimizer.weight_decay = 0.05
  c.checkpoint.every = 2000
  return c
