"""Pieces several mixers share: head projections with logical axes, the sharding specs of
per-head activations, one softmax decoding step over a :class:`~attn_jax.layers.cache.KVCache`,
and the frame of the content-dependent sparse mixers (:class:`SparseAttention`)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

import attn_jax
from attn_jax import sharding
from attn_jax.layers import nn
from attn_jax.layers import rope as rope_lib

Q_SPEC = ("batch", "seq", "act_heads", None)
KV_SPEC = ("batch", "seq", "act_kv_heads", None)


class Projections(nnx.Module):
  """Q, K, V and output projections for ``num_heads`` query and ``kv_heads`` key/value heads.

  ``q_proj [dim, Hq, D]``, ``k_proj`` / ``v_proj [kv_dim, Hkv, D]``, ``o_proj [Hq, D, dim]``;
  ``qk_dim`` (default ``D``) sets the query/key width and ``v_dim`` the value width separately.
  """

  def __init__(self, config, dim, *, rngs, dtype, param_dtype, kv_dim=None, qk_dim=None, v_dim=None):
    hq, hkv, d = config.num_heads, config.kv_heads, config.head_dim_for(dim)
    qk_dim, v_dim = qk_dim or d, v_dim or d
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    kv_dim = dim if kv_dim is None else kv_dim
    self.q_proj = nn.Dense(dim, (hq, qk_dim), in_axes=("embed",), out_axes=("heads", "head_dim"), **kw)
    self.k_proj = nn.Dense(kv_dim, (hkv, qk_dim), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), **kw)
    self.v_proj = nn.Dense(kv_dim, (hkv, v_dim), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), **kw)
    self.o_proj = nn.Dense((hq, v_dim), dim, in_axes=("heads", "head_dim"), out_axes=("embed",), **kw)

  def qkv(self, x):
    """``x [B, T, C]`` -> ``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]``, sharding-constrained."""
    q = sharding.constrain(self.q_proj(x), Q_SPEC)
    k = sharding.constrain(self.k_proj(x), KV_SPEC)
    v = sharding.constrain(self.v_proj(x), KV_SPEC)
    return q, k, v


def heads(dense, x, spec=Q_SPEC):
  """A per-head projection ``x [B, T, C] -> [B, T, H, D]`` under the activation sharding rules."""
  return sharding.constrain(dense(x), spec)


def attend_cache(q, keys, cache, position, mask, *, sinks=None, logits_soft_cap=None, implementation=None):
  """Softmax attention of one query step ``q [B, 1, Hq, D]`` over the slots of ``cache``.

  The mask of a decoding step depends on the traced ``position``, while ``attn_jax.attention``
  takes static masks, so the mask predicate is evaluated at (position, each slot's stored
  position) and passed as key segment ids (visible slots share the query's id 0). ``keys`` are
  the cache's keys, or a re-rotated copy of them.

  Returns:
    ``[B, 1, Hq, Dv]``.
  """
  b = q.shape[0]
  visible = cache.visible(position, mask)
  kv_seg = jnp.broadcast_to(jnp.where(visible, 0, 1).astype(jnp.int32), (b, cache.capacity))
  q_seg = jnp.zeros((b, 1), jnp.int32)
  return attn_jax.attention(q, keys, cache.v, sinks=sinks, logits_soft_cap=logits_soft_cap,
                            q_segment_ids=q_seg, kv_segment_ids=kv_seg, implementation=implementation)


def no_segments(name: str, segment_ids) -> None:
  """For mixers that cannot keep packed documents apart."""
  if segment_ids is not None:
    raise ValueError(f"mixer {name!r} does not support segment_ids (packed documents); pass None")


def rope_1d(config, x, positions):
  """RoPE of ``x [B, T, H, D]`` at ``positions [B, T]`` (a batch of 1 broadcasts) when
  ``config.rope`` is 1; the content-dependent sparse mixers are sequence mixers only."""
  if config.rope == 0:
    return x
  if config.rope != 1 or positions.ndim != 2:
    raise ValueError(f"mixer {config.mixer!r} supports rope=0 or 1 with positions [B, T], got rope={config.rope} "
                     f"and positions of shape {positions.shape}")
  return rope_lib.apply_rope(x, positions, theta=config.rope_theta)


def check_fits(config, name: str, value: int, limit: int, what: str) -> None:
  """ValueError naming the field unless ``value <= limit`` (a budget larger than the sequence)."""
  if value > limit:
    raise config.error(f"{name}={value} must be at most {what} = {limit}")


class SparseAttention(nnx.Module):
  """The frame of the content-dependent sparse mixers: Q/K/V projections, 1-D RoPE, the
  mechanism's attention ``attend(q, k, v, x=x, positions=positions, **inputs) -> [B, T, Hq, Dv]``
  (subclasses), the output projection. ``NO_DECODE``: why the mechanism has no decoding form
  (``init_cache`` raises NotImplementedError with it), or None when the subclass decodes."""

  NO_DECODE: str | None = None

  def __init__(self, config, dim, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32, layer_index: int = 0,
               num_layers: int = 1):
    del num_layers
    self.config = config
    self.dtype = dtype
    self.layer_index = layer_index
    self.proj = Projections(config, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def project(self, x, positions):
    """``x [B, T, C]`` -> rotated ``q [B, T, Hq, D]``, ``k [B, T, Hkv, D]`` and ``v``."""
    q, k, v = self.proj.qkv(x)
    return rope_1d(self.config, q, positions), rope_1d(self.config, k, positions), v

  def attend(self, q, k, v, **context):
    raise NotImplementedError

  def output(self, out):
    return self.proj.o_proj(sharding.constrain(out.astype(self.dtype), Q_SPEC))

  def __call__(self, x, *, positions, segment_ids=None, **inputs):
    """``x [B, T, C]``, ``positions [B, T]`` -> ``[B, T, C]`` (no packed documents)."""
    no_segments(self.config.mixer, segment_ids)
    q, k, v = self.project(x, positions)
    return self.output(self.attend(q, k, v, x=x, positions=positions, **inputs))

  def init_cache(self, batch: int, max_len: int, dtype):
    raise NotImplementedError(f"mixer {self.config.mixer!r} does not decode: {self.NO_DECODE}")
