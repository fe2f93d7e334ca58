"""attn_jax: efficient attention mechanisms as pure JAX functions with reference and fast backends.

Public API::

    import attn_jax
    from attn_jax import masks

    out = attn_jax.attention(q, k, v, mask=masks.causal())
"""

from attn_jax import block_mask
from attn_jax import block_mask_traced
from attn_jax import context_parallel
from attn_jax import dispatch
from attn_jax import inspect
from attn_jax import masks
from attn_jax import mechanisms
from attn_jax import neighborhood
from attn_jax import sharding
from attn_jax.block_mask import BlockMask, make_block_mask
from attn_jax.block_mask_traced import TracedBlockMask
from attn_jax.context_parallel.config import ContextParallel
from attn_jax.diagnostics import Explanation, explain
from attn_jax.linear import feature_maps as linear_feature_maps
from attn_jax.mechanisms.block_topk import topk_block_attention
from attn_jax.linear.api import linear_attention, linear_attention_step
from attn_jax.linear.pallas import PallasGpuConfig as LinearPallasGpuConfig
from attn_jax.linear.pallas import PallasTpuConfig as LinearPallasTpuConfig
from attn_jax.linear.xla import XlaConfig as LinearXlaConfig
from attn_jax.neighborhood.api import NeighborhoodConfig, neighborhood_attention
from attn_jax.neighborhood.mask import NeighborhoodMask
from attn_jax.softmax.api import attention
from attn_jax.softmax.cudnn import CudnnConfig
from attn_jax.softmax.pallas import PallasGpuConfig, PallasGpuLaunch, PallasTpuConfig
from attn_jax.softmax.xla import XlaConfig

__version__ = "0.1.0"

__all__ = [
    "attention",
    "explain",
    "Explanation",
    "masks",
    "block_mask",
    "dispatch",
    "inspect",
    "sharding",
    "BlockMask",
    "make_block_mask",
    "context_parallel",
    "ContextParallel",
    "XlaConfig",
    "PallasTpuConfig",
    "PallasGpuConfig",
    "CudnnConfig",
    "PallasGpuLaunch",
    "neighborhood",
    "neighborhood_attention",
    "NeighborhoodMask",
    "NeighborhoodConfig",
    "mechanisms",
    "sharding",
    "linear_attention",
    "linear_attention_step",
    "linear_feature_maps",
    "LinearXlaConfig",
    "LinearPallasTpuConfig",
    "LinearPallasGpuConfig",
    "block_mask_traced",
    "TracedBlockMask",
    "topk_block_attention",
]
