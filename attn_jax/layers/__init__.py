"""flax.nnx layers built on the attn_jax primitives (imports flax; ``import attn_jax`` does not).

The token mixer of every model-zoo layer is a config value (:class:`AttentionConfig`), resolved
through the registry in :mod:`attn_jax.layers.mechanisms`. Standalone layers of the named
mechanisms (neighborhood attention, Lightning, Based, RetNet, ...) can be used on their own.
"""

from attn_jax.layers import attention
from attn_jax.layers import block
from attn_jax.layers import cache
from attn_jax.layers import config
from attn_jax.layers import conv
from attn_jax.layers import linear
from attn_jax.layers import linear_mixer
from attn_jax.layers import mechanisms
from attn_jax.layers import neighborhood
from attn_jax.layers import neighborhood_mixer
from attn_jax.layers import nn
from attn_jax.layers import partitioning
from attn_jax.layers import rope
from attn_jax.layers.attention import CrossAttention, SoftmaxAttention
from attn_jax.layers.block import Block, expand_schedule
from attn_jax.layers.cache import ConvCache, CrossKVCache, KVCache, RecurrentCache
from attn_jax.layers.config import AttentionConfig
from attn_jax.layers.conv import ShortConv
from attn_jax.layers.linear import (AarenAttention, BasedAttention, JRTPrefixAttention,
                                    LightNetAttention, LightningAttention, MultiScaleRetention)
from attn_jax.layers.linear_mixer import LinearMixer
from attn_jax.layers.mechanisms import Mechanism, UnsupportedConfigError
from attn_jax.layers.neighborhood import NeighborhoodAttention
from attn_jax.layers.neighborhood_mixer import NeighborhoodMixer
from attn_jax.layers.nn import Dense, Embed, RMSNorm, SwiGLU
from attn_jax.layers.rope import apply_rope, grid_positions

__all__ = [
    "AarenAttention",
    "AttentionConfig",
    "BasedAttention",
    "Block",
    "ConvCache",
    "CrossAttention",
    "CrossKVCache",
    "Dense",
    "Embed",
    "JRTPrefixAttention",
    "KVCache",
    "LightNetAttention",
    "LightningAttention",
    "LinearMixer",
    "Mechanism",
    "MultiScaleRetention",
    "NeighborhoodAttention",
    "NeighborhoodMixer",
    "RMSNorm",
    "RecurrentCache",
    "ShortConv",
    "SoftmaxAttention",
    "SwiGLU",
    "UnsupportedConfigError",
    "apply_rope",
    "expand_schedule",
    "grid_positions",
    "mechanisms",
]
