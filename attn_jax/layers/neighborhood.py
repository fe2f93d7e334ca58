"""``NeighborhoodAttention``: a flax.nnx multi-head neighborhood-attention layer for grids."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attn_jax.neighborhood import api
from attn_jax.neighborhood import rope as rope_lib


class NeighborhoodAttention(nnx.Module):
  """Multi-head neighborhood attention over a 1-D, 2-D or 3-D token grid (NATTEN semantics).

  ``x [B, *spatial, num_features] -> [B, *spatial, num_features]``: linear Q/K/V projections,
  optional axial RoPE on Q and K, :func:`attn_jax.neighborhood_attention`, output projection.
  Optional ``context`` tokens ``[B, T, num_features]`` (e.g. text) are projected by the same K/V
  projections and appended as additional keys/values, visible to every query and not rotated.

  Args:
    num_features: model width.
    num_heads: query heads.
    kernel_size, stride, dilation, is_causal: per-axis neighborhood (int/bool or tuples), see
      :func:`attn_jax.neighborhood_attention`. The grid rank comes from the input.
    num_kv_heads: K/V heads (GQA / MQA); default ``num_heads``.
    head_dim: per-head width; default ``num_features // num_heads``.
    use_bias: biases in the Q/K/V/output projections.
    rope: apply axial RoPE (one rotary embedding per spatial axis) to Q and K; ``head_dim``
      must be divisible by ``2 * (number of spatial axes)``.
    rope_base: RoPE base.
    use_sinks: learn one attention-sink logit per head (gpt-oss), initialised to 0.
    implementation: softmax backend for the attention (None: the platform's default).
    dtype: computation dtype (None: inferred from the input and parameters).
    param_dtype: parameter dtype.
    rngs: ``nnx.Rngs`` for the initialisers.
  """

  def __init__(self, num_features: int, num_heads: int, kernel_size, *, stride=1, dilation=1,
               is_causal=False, num_kv_heads: int | None = None, head_dim: int | None = None,
               use_bias: bool = True, rope: bool = False, rope_base: float = 10000.0,
               use_sinks: bool = False, implementation: str | None = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if head_dim is None:
      if num_features % num_heads:
        raise ValueError(f"num_features ({num_features}) must be divisible by num_heads "
                         f"({num_heads}) unless head_dim is given")
      head_dim = num_features // num_heads
    for name, value in (("num_features", num_features), ("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    self.kernel_size = kernel_size
    self.stride = stride
    self.dilation = dilation
    self.is_causal = is_causal
    self.head_dim = head_dim
    self.rope = rope
    self.rope_base = rope_base
    self.implementation = implementation
    common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query = nnx.LinearGeneral(num_features, (num_heads, head_dim), **common)
    self.key = nnx.LinearGeneral(num_features, (num_kv_heads, head_dim), **common)
    self.value = nnx.LinearGeneral(num_features, (num_kv_heads, head_dim), **common)
    self.out = nnx.LinearGeneral((num_heads, head_dim), num_features, axis=(-2, -1), **common)
    self.sinks = nnx.Param(jnp.zeros((num_heads,), param_dtype)) if use_sinks else None

  def __call__(self, x, context=None):
    """``x [B, *spatial, F]`` (1 to 3 spatial axes), ``context [B, T, F]`` or None."""
    if x.ndim not in (3, 4, 5):
      raise ValueError(f"x must have shape [batch, *spatial, features] with 1 to 3 spatial axes, "
                       f"got shape {tuple(x.shape)}")
    n = x.ndim - 2
    if self.rope and self.head_dim % (2 * n):
      raise ValueError(f"rope=True needs head_dim divisible by 2 * {n} spatial axes, got "
                       f"head_dim={self.head_dim}")
    if context is not None and (context.ndim != 3 or context.shape[0] != x.shape[0]
                                or context.shape[-1] != x.shape[-1]):
      raise ValueError(f"context must have shape [batch, tokens, features] = [{x.shape[0]}, T, "
                       f"{x.shape[-1]}], got {tuple(context.shape)}")
    q, k, v = self.query(x), self.key(x), self.value(x)
    if self.rope:
      q = rope_lib.axial_rope(q, self.rope_base)
      k = rope_lib.axial_rope(k, self.rope_base)
    extra_k = extra_v = None
    if context is not None:
      extra_k, extra_v = self.key(context).astype(k.dtype), self.value(context).astype(v.dtype)
    sinks = None if self.sinks is None else self.sinks[...]
    o = api.neighborhood_attention(q, k, v, self.kernel_size, self.stride, self.dilation,
                                   self.is_causal, sinks=sinks, additional_keys=extra_k,
                                   additional_values=extra_v, implementation=self.implementation)
    return self.out(o)
