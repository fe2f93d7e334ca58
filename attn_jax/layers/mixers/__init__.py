"""The registered token mixers: one module per mechanism, each declaring its typed config, its
layer and its registry entry (:mod:`attn_jax.layers.registry`). Importing a module registers it;
the order below is the registry's (``mixer_names()``, ``--list``, the README table)."""

from attn_jax.layers.mixers import softmax
from attn_jax.layers.mixers import neighborhood
from attn_jax.layers.mixers import short_conv
from attn_jax.layers.mixers import linear
from attn_jax.layers.mixers import lightning
from attn_jax.layers.mixers import based
from attn_jax.layers.mixers import jrt
from attn_jax.layers.mixers import retnet
from attn_jax.layers.mixers import lightnet
from attn_jax.layers.mixers import aaren
from attn_jax.layers.mixers import gla
