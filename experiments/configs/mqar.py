"""MQAR (multi-query associative recall, Zoology's setting) on a 2-layer LM: one cell of the
benchmark's quality suite.

Command (about 40 s on a 2-core CPU; reaches ~99% recall accuracy with softmax attention)::

    python -m experiments.train --config=experiments/configs/mqar.py --workdir=/tmp/mqar

Other mechanisms and widths, e.g. a sliding window of 16 tokens at width 128, or Based::

    python -m experiments.train --config=experiments/configs/mqar.py --workdir=/tmp/mqar_swa \\
        --config.model.mixer_fields.softmax.window=16 --config.model.dim=128 \\
        --config.optimizer.learning_rate=3e-3
    python -m experiments.train --config=experiments/configs/mqar.py --workdir=/tmp/mqar_based \\
        --config.model.mixer=based --config.model.mixer_fields.based.window=8

Zoology's harder setting (vocabulary 8192, 512 tokens, 64 pairs; about 20 min on one H100
for 20k steps, estimated)::

    python -m experiments.train --config=experiments/configs/mqar.py --workdir=/tmp/mqar512 \\
        --config.data.vocab_size=8192 --config.data.seq_len=512 --config.data.num_kv_pairs=64 \\
        --config.model.dim=256 --config.batch_size=256 --config.num_train_steps=20000
"""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.data.name = "mqar"
  c.data.vocab_size = 128
  c.data.seq_len = 64
  c.data.num_kv_pairs = 8
  c.data.power_a = 0.01
  c.batch_size = 32
  c.num_train_steps = 400
  c.log_every = 50
  c.eval_steps = 8
  c.model.dim = 64
  c.model.mlp_dim = 128
  c.model.num_layers = 2
  c.model.num_heads = 1
  c.optimizer.learning_rate = 1e-2
  c.optimizer.warmup_steps = 40
  c.checkpoint.every = 100
  return c
