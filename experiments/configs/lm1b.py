"""Byte-level language modelling on LM1B (TFDS) with a 24M-parameter decoder.

Needs the dataset prepared once as ArrayRecord files in ``$DATA`` (on a machine with network
access and ``pip install tensorflow``)::

    tfds build lm1b --data_dir=$DATA --file_format=array_record

Command (50k steps of 64 x 512 bytes; about 30 min on one H100 or a TPU v5e-8: an estimate from
the model's FLOPs at 30 % utilisation, not a measurement)::

    python -m experiments.train --config=experiments/configs/lm1b.py --workdir=$WORKDIR/lm1b \\
        --config.data.data_dir=$DATA

Swap the mechanism with ``--config.model.mixer=based`` (any name of ``python -m
experiments.benchmark --list``; its fields with ``--config.model.mixer_fields.based.window=128``); on a pod, ``launch/tpu_pod.sh`` runs the same command on every
worker. A CPU smoke test (about 20 s; tiny model, 20 steps)::

    python -m experiments.train --config=experiments/configs/lm1b.py --workdir=/tmp/lm1b_smoke \\
        --config.data.data_dir=$DATA --config.data.seq_len=64 --config.batch_size=8 \\
        --config.model.dim=64 --config.model.num_layers=2 --config.model.mlp_dim=128 \\
        --config.model.num_heads=2 --config.model.num_kv_heads=1 --config.num_train_steps=20 \\
        --config.log_every=5 --config.model.dtype=float32 --config.optimizer.warmup_steps=2
"""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.data.name = "tfds_lm"
  c.data.tfds_name = "lm1b"
  c.data.data_dir = ""              # "": TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR)
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.seq_len = 512
  c.data.docs_per_row = 4           # lm1b sentences average ~130 bytes
  c.data.text_key = "text"
  c.batch_size = 64
  c.num_train_steps = 50_000
  c.log_every = 100
  c.eval_every = 5000
  c.eval_steps = 50
  c.model.dim = 512
  c.model.num_layers = 8
  c.model.mlp_dim = 1408
  c.model.num_heads = 8
  c.model.num_kv_heads = 4
  c.model.dtype = "bfloat16"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 2000
  c.checkpoint.every = 2000
  c.checkpoint.keep = 3
  return c
