"""attn_jax: efficient attention mechanisms as pure JAX functions with reference and fast backends.

Public API::

    import attn_jax
    from attn_jax import masks

    out = attn_jax.attention(q, k, v, mask=masks.causal())
"""

from attn_jax import block_mask
from attn_jax import dispatch
from attn_jax import masks
from attn_jax import neighborhood
from attn_jax import sharding
from attn_jax.block_mask import BlockMask, make_block_mask
from attn_jax.neighborhood.api import NeighborhoodConfig, neighborhood_attention
from attn_jax.neighborhood.mask import NeighborhoodMask
from attn_jax.softmax.api import attention
from attn_jax.softmax.pallas import PallasGpuConfig, PallasTpuConfig
from attn_jax.softmax.xla import XlaConfig

__version__ = "0.1.0"

__all__ = [
    "attention",
    "masks",
    "block_mask",
    "dispatch",
    "sharding",
    "BlockMask",
    "make_block_mask",
    "XlaConfig",
    "PallasTpuConfig",
    "PallasGpuConfig",
    "neighborhood",
    "neighborhood_attention",
    "NeighborhoodMask",
    "NeighborhoodConfig",
]
