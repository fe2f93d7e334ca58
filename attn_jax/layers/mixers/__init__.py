"""The registered token mixers: one module per mechanism, each declaring its typed config, its
layer and its registry entry (:mod:`attn_jax.layers.registry`). Importing a module registers it.

The mechanisms below come first, in this order (that of ``mixer_names()``, ``--list`` and the
docs/models.md table); every other module of this package is imported after them, alphabetically, so a
new mechanism needs only its own file (``common.py`` holds shared pieces, not a mixer).
"""

import importlib as _importlib
import pkgutil as _pkgutil

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

for _module in sorted(m.name for m in _pkgutil.iter_modules(__path__)):
  if _module != "common":
    _importlib.import_module(f"{__name__}.{_module}")
