"""flax.nnx modules built on the attn_jax primitives (imports flax; ``import attn_jax`` does not)."""

from attn_jax.layers.neighborhood import NeighborhoodAttention

__all__ = ["NeighborhoodAttention"]
