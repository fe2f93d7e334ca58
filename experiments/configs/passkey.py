"""Passkey retrieval (needle in a haystack) on a 2-layer LM.

Command (about 1 min on a 2-core CPU; ~97% of the passkey digits right at the end)::

    python -m experiments.train --config=experiments/configs/passkey.py --workdir=/tmp/passkey

Longer haystacks and a sliding window that cannot see the needle, e.g.::

    python -m experiments.train --config=experiments/configs/passkey.py --workdir=/tmp/passkey_swa \\
        --config.data.seq_len=512 --config.model.mixer_fields.softmax.window=128
"""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.data.name = "passkey"
  c.data.seq_len = 128
  c.data.passkey_len = 4
  c.data.num_filler = 8
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
