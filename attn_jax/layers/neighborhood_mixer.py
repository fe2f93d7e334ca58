"""Neighborhood attention mixer (the ``"neighborhood"`` mechanism) on
``attn_jax.neighborhood_attention``.

Tokens arrive flattened, ``[B, T, C]`` with ``T = prod(grid)`` in row-major order (as a ViT's
patches or a sequence), and are viewed as the grid ``[B, *grid, H, D]`` for the primitive,
whose NATTEN semantics (window shifted inward at borders, stride, dilation, causal per axis)
are issue 4's. Per-axis RoPE is applied to the flattened queries and keys before the reshape.

The primitive is looked up on ``attn_jax`` at call time (``PRIMITIVE``), so a build without it
fails at construction (see :mod:`attn_jax.layers.mechanisms`).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

import attn_jax
from attn_jax import sharding
from attn_jax.layers import attention
from attn_jax.layers import config as config_lib
from attn_jax.layers import rope as rope_lib

PRIMITIVE = "neighborhood_attention"


class NeighborhoodMixer(nnx.Module):
  """The model zoo's neighborhood-attention mixer over a 1D/2D/3D token grid.

  For a standalone layer that takes the grid directly (with axial RoPE, sinks and context
  tokens) see :class:`attn_jax.layers.NeighborhoodAttention`.
  """

  def __init__(self, config: config_lib.AttentionConfig, dim: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.config = config
    self.proj = attention.Projections(config, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, *, positions, grid=None, segment_ids=None, **unused):
    """``x [B, T, C]`` on ``grid`` (a shape with ``prod(grid) == T``; default ``(T,)``)."""
    c = self.config
    if segment_ids is not None:
      raise ValueError("mechanism 'neighborhood' does not take segment_ids (a grid is one document)")
    b, t = x.shape[:2]
    grid = (t,) if grid is None else tuple(grid)
    if math.prod(grid) != t:
      raise ValueError(f"grid {grid} does not hold the {t} tokens of x")
    spec = ("batch", "seq", "act_heads", None)
    q = sharding.constrain(self.proj.q_proj(x), spec)
    k = sharding.constrain(self.proj.k_proj(x), spec)
    v = sharding.constrain(self.proj.v_proj(x), spec)
    if c.rope:
      q = rope_lib.apply_rope(q, positions, theta=c.rope_theta)
      k = rope_lib.apply_rope(k, positions, theta=c.rope_theta)
    shape = (b,) + grid + q.shape[2:]
    fn = getattr(attn_jax, PRIMITIVE)
    out = fn(q.reshape(shape), k.reshape(shape), v.reshape(shape), c.kernel_size, c.stride,
             c.dilation, c.causal, implementation=c.implementation)
    return self.proj.o_proj(out.reshape(q.shape))

  def init_cache(self, batch: int, max_len: int, dtype):
    raise ValueError(
        "mechanism 'neighborhood' has no decoding cache: use mechanism='softmax' with window=... "
        "for causal 1D local attention")
