"""Selective copying (Mamba's synthetic task) on a 2-layer LM.

Command (about 30 s on a 2-core CPU; ~77% of the tokens copied after 500 steps)::

    python -m experiments.train --config=experiments/configs/selective_copy.py --workdir=/tmp/scopy
"""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.data.name = "selective_copy"
  c.data.vocab_size = 16
  c.data.seq_len = 64
  c.data.num_tokens = 8
  c.batch_size = 32
  c.num_train_steps = 500
  c.log_every = 50
  c.model.dim = 64
  c.model.mlp_dim = 128
  c.model.num_heads = 2
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 50
  c.checkpoint.every = 250
  return c
