"""Defaults shared by every config (not a runnable experiment by itself).

Every field can be overridden on the command line, e.g.::

    python -m experiments.train --config=experiments/configs/mqar.py --workdir=/tmp/run \\
        --config.model.dim=128 --config.model.mixer=softmax \\
        --config.model.mixer_fields.softmax.window=16 --config.num_train_steps=2000

``config.model.mixer`` names a mechanism of the mixer registry (``python -m experiments.benchmark
--list``), or several joined by commas for a hybrid cycled over the layers; each mechanism's own
fields live under ``config.model.mixer_fields.<name>`` (see :mod:`experiments.builders`).
"""

import ml_collections

from experiments import builders


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 32                 # global batch, split over the mesh's data x fsdp axes
  c.num_train_steps = 1000
  c.log_every = 50
  c.eval_every = 0                  # 0: evaluate at the end only
  c.eval_steps = 8                  # eval batches (capped by the eval split's size)

  # Data: a synthetic task (mqar, passkey, selective_copy; remaining fields are the task's) or
  # tfds_lm / tfds_image (see experiments/data/tfds_sources.py).
  c.data = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.kind = "lm"               # lm | vit
  c.model.mixer = "softmax"         # mixer registry name(s): "based", "short_conv,softmax", ...
  c.model.mixer_fields = builders.mixer_fields_config()  # <name>.<field>: None = the mixer's default
  c.model.dim = 64
  c.model.num_layers = 2
  c.model.mlp_dim = 128
  c.model.num_heads = 1
  c.model.num_kv_heads = 0          # 0: = num_heads
  c.model.head_dim = 0              # 0: dim // num_heads
  c.model.rope = -1                 # -1: 1-D RoPE for LMs, 2-D for ViTs; 0: none
  c.model.implementation = ""       # the mixers' backend; "": the platform's default
  c.model.patch_size = 4            # ViT only
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.schedule = "cosine"   # cosine | linear | constant
  c.optimizer.end_lr_ratio = 0.1
  c.optimizer.weight_decay = 0.1
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip_norm = 1.0  # 0: no clipping

  # Mesh axes (sharding.make_mesh); one may be -1: whatever the device count leaves.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.sequence = 1
  c.mesh.tensor = 1

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 500          # steps; 0: no checkpoints
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  # Fault injection, for testing the trainer's guards; leave at the defaults.
  c.debug = ml_collections.ConfigDict()
  c.debug.nonfinite_at_step = -1    # make the loss and gradients NaN at this step
  c.debug.sleep_per_step = 0.0      # seconds; slows a run down so a test can interrupt it
  return c
