"""flax.nnx modules built on the attn_jax primitives (imports flax; ``import attn_jax`` does not)."""

from attn_jax.layers.linear import AarenAttention
from attn_jax.layers.linear import BasedAttention
from attn_jax.layers.linear import JRTPrefixAttention
from attn_jax.layers.linear import LightNetAttention
from attn_jax.layers.linear import LightningAttention
from attn_jax.layers.linear import MultiScaleRetention

__all__ = [
    "AarenAttention",
    "BasedAttention",
    "JRTPrefixAttention",
    "LightNetAttention",
    "LightningAttention",
    "MultiScaleRetention",
]
