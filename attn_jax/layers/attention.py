"""Softmax attention layers: masked self attention (any mask, GQA, learned sinks, RoPE, rolling
KV cache) and cross attention (non-causal and causal cross patterns), on ``attn_jax.attention``.

Decoding runs through the same primitive. The mask of a decoding step depends on the current
position, which is traced, while ``attn_jax.attention`` takes static masks; so a step evaluates
the layer's mask predicate at (query position, each slot's stored position) in JAX and passes
the result as key segment ids (visible slots share the query's segment id). This serves every
head-independent mask, and a rolling cache, without a second attention implementation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import attn_jax
from attn_jax import masks as masks_lib
from attn_jax import sharding
from attn_jax.context_parallel import config as context_parallel
from attn_jax.layers import cache as cache_lib
from attn_jax.layers import config as config_lib
from attn_jax.layers import nn
from attn_jax.layers import rope as rope_lib

_Q = ("batch", "seq", "act_heads", None)
_KV = ("batch", "seq", "act_kv_heads", None)


def _uses_shard_map(config: config_lib.AttentionConfig) -> bool:
  if config.shard_map is not None:
    return config.shard_map
  return (config.implementation or "").startswith("pallas")


def _softmax_attention(config, q, k, v, mask, sinks, q_segment_ids, kv_segment_ids):
  """``attn_jax.attention`` with the config's options, inside shard_map when the config asks.

  When the active sharding rules split ``seq`` over a mesh axis (and the lengths divide), the
  call is context parallel: the primitive shards the sequence (and batch / heads) itself.
  """
  cp = context_parallel.from_active_rules(q.shape[1], k.shape[1], num_heads=q.shape[2],
                                          num_kv_heads=k.shape[2], batch=q.shape[0])

  def fn(q, k, v, sinks, q_seg, kv_seg):
    return attn_jax.attention(q, k, v, mask=mask, sinks=sinks, logits_soft_cap=config.logits_soft_cap,
                              q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                              implementation=config.implementation, context_parallel=cp)

  if cp is None and _uses_shard_map(config):
    out = sharding.shard_map_attention(fn, q, k, v, sinks=sinks, q_segment_ids=q_segment_ids,
                                       kv_segment_ids=kv_segment_ids)
  else:
    out = fn(q, k, v, sinks, q_segment_ids, kv_segment_ids)
  return sharding.constrain(out, _Q)


class Projections(nnx.Module):
  """Q, K, V and output projections for ``num_heads`` query and ``kv_heads`` key/value heads."""

  def __init__(self, config, dim, *, rngs, dtype, param_dtype, kv_dim=None):
    hq, hkv, d = config.num_heads, config.kv_heads, config.head_dim_for(dim)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    kv_dim = dim if kv_dim is None else kv_dim
    self.q_proj = nn.Dense(dim, (hq, d), in_axes=("embed",), out_axes=("heads", "head_dim"), **kw)
    self.k_proj = nn.Dense(kv_dim, (hkv, d), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), **kw)
    self.v_proj = nn.Dense(kv_dim, (hkv, d), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), **kw)
    self.o_proj = nn.Dense((hq, d), dim, in_axes=("heads", "head_dim"), out_axes=("embed",), **kw)


class SoftmaxAttention(nnx.Module):
  """Masked softmax self attention: the ``"softmax"`` mechanism.

  Args:
    config: an :class:`~attn_jax.layers.config.AttentionConfig`.
    dim: model width.
  """

  def __init__(self, config: config_lib.AttentionConfig, dim: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.config = config
    self.mask = config.build_mask()
    self.dtype = dtype
    self.proj = Projections(config, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if config.learned_sinks:
      self.sinks = nnx.Param(jnp.zeros((config.num_heads,), param_dtype), logical_axes=("heads",))
    else:
      self.sinks = None

  def _rope(self, x, positions):
    n = self.config.rope
    if n == 0:
      return x
    axes = 1 if positions.ndim == 2 else positions.shape[-1]
    if axes != n:
      raise ValueError(f"rope={n} needs positions with {n} coordinate(s) per token, got shape {positions.shape}")
    return rope_lib.apply_rope(x, positions, theta=self.config.rope_theta)

  def _qkv(self, x):
    q = sharding.constrain(self.proj.q_proj(x), _Q)
    k = sharding.constrain(self.proj.k_proj(x), _KV)
    v = sharding.constrain(self.proj.v_proj(x), _KV)
    return q, k, v

  def _attend(self, q, k, v, mask, q_segment_ids=None, kv_segment_ids=None):
    sinks = None if self.sinks is None else self.sinks[...]
    out = _softmax_attention(self.config, q, k, v, mask, sinks, q_segment_ids, kv_segment_ids)
    return self.proj.o_proj(out)

  def __call__(self, x, *, positions, segment_ids=None, **unused):
    """``x [B, T, C]``, ``positions [B, T]`` (or ``[B, T, n]`` for n-D RoPE) -> ``[B, T, C]``.

    ``segment_ids [B, T]`` restricts attention to equal ids (packed documents).
    """
    q, k, v = self._qkv(x)
    q, k = self._rope(q, positions), self._rope(k, positions)
    return self._attend(q, k, v, self.mask, segment_ids, segment_ids)

  def init_cache(self, batch: int, max_len: int, dtype) -> cache_lib.KVCache:
    """An empty cache for sequences of up to ``max_len`` tokens (``n + w`` slots if rolling)."""
    c = self.config
    if self.mask.depends_on_head:
      raise ValueError(f"decoding supports head-independent masks only, got mask {self.mask!r}")
    if c.rope > 1:
      raise ValueError(f"decoding needs 1D positions, got rope={c.rope}")
    d = self.proj.q_proj.kernel[...].shape[-1]
    if c.uses_rolling_cache:
      return cache_lib.KVCache.create(batch, 0, c.kv_heads, d, d, dtype,
                                      num_sinks=c.num_sink_tokens, window=c.window)
    self.mask.validate(masks_lib.MaskContext(max_len, max_len))
    return cache_lib.KVCache.create(batch, max_len, c.kv_heads, d, d, dtype)

  def _rotate_stored(self) -> bool:
    """Whether keys are stored unrotated and rotated by in-cache position (StreamingLLM)."""
    return self.config.uses_rolling_cache and self.config.rope_in_cache == "cache" and self.config.rope > 0

  def prefill(self, x, cache: cache_lib.KVCache, **unused):
    """Runs the prompt ``x [B, T, C]`` (positions ``0 .. T-1``) and stores its keys in ``cache``."""
    b, t = x.shape[:2]
    if self._rotate_stored() and t > cache.capacity:
      raise ValueError(
          f"rope_in_cache='cache' prefills at most num_sink_tokens + window = {cache.capacity} tokens "
          f"(longer prompts would need per-query cache positions); got a prompt of length {t}")
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q, k_raw, v = self._qkv(x)
    q, k = self._rope(q, positions), self._rope(k_raw, positions)
    y = self._attend(q, k, v, self.mask)
    return y, cache.fill(k_raw if self._rotate_stored() else k, v).constrained()

  def decode(self, x, cache: cache_lib.KVCache, *, position, **unused):
    """One step: ``x [B, 1, C]`` at absolute ``position`` (traced int) -> ``([B, 1, C], cache)``."""
    b = x.shape[0]
    position = jnp.asarray(position, jnp.int32)
    q, k, v = self._qkv(x)
    pos = jnp.full((b, 1), position, jnp.int32)
    if self._rotate_stored():
      cache = cache.append(k, v, position).constrained()
      ranks = cache.in_cache_positions(position)
      keys = self._rope(cache.k, jnp.broadcast_to(ranks, (b, cache.capacity)))
      q = self._rope(q, jnp.minimum(pos, cache.capacity - 1))
    else:
      cache = cache.append(self._rope(k, pos), v, position).constrained()
      keys = cache.k
      q = self._rope(q, pos)
    visible = cache.visible(position, self.mask)
    kv_seg = jnp.broadcast_to(jnp.where(visible, 0, 1).astype(jnp.int32), (b, cache.capacity))
    q_seg = jnp.zeros((b, 1), jnp.int32)
    return self._attend(q, keys, cache.v, None, q_seg, kv_seg), cache


class CrossAttention(nnx.Module):
  """Cross attention from decoder states to an encoder memory (the CAB cross patterns).

  Non-causal cross (``config.causal=False``): every query sees the whole memory. Causal cross
  (``config.causal=True``): decoder position ``i`` sees memory positions ``j <= i``, i.e.
  ``masks.causal(offset=0)``; the offset is explicit because the default bottom-right alignment
  depends on the decoder's final length, unknown while decoding. ``config.mask`` overrides both
  (a causal-type mask with ``offset=None`` trains but cannot decode). No RoPE: memory and
  decoder positions live on different axes.
  """

  def __init__(self, config: config_lib.AttentionConfig, dim: int, *, rngs: nnx.Rngs,
               memory_dim: int | None = None, dtype=jnp.float32, param_dtype=jnp.float32):
    self.config = config
    if config.mask is not None:
      self.mask = config.mask
    else:
      self.mask = masks_lib.causal(offset=0) if config.causal else masks_lib.full()
    self.proj = Projections(config, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                             kv_dim=memory_dim)
    if config.learned_sinks:
      self.sinks = nnx.Param(jnp.zeros((config.num_heads,), param_dtype), logical_axes=("heads",))
    else:
      self.sinks = None

  def _memory_kv(self, memory):
    k = sharding.constrain(self.proj.k_proj(memory), _KV)
    v = sharding.constrain(self.proj.v_proj(memory), _KV)
    return k, v

  def _attend(self, q, k, v, mask, q_seg=None, kv_seg=None):
    sinks = None if self.sinks is None else self.sinks[...]
    return self.proj.o_proj(_softmax_attention(self.config, q, k, v, mask, sinks, q_seg, kv_seg))

  def __call__(self, x, memory, *, memory_mask=None):
    """``x [B, T, C]``, ``memory [B, M, Cm]`` -> ``[B, T, C]``.

    ``memory_mask [B, M]`` bool marks real (non-padding) memory tokens.
    """
    q = sharding.constrain(self.proj.q_proj(x), _Q)
    k, v = self._memory_kv(memory)
    q_seg = kv_seg = None
    if memory_mask is not None:
      q_seg = jnp.zeros(x.shape[:2], jnp.int32)
      kv_seg = jnp.where(memory_mask, 0, 1).astype(jnp.int32)
    return self._attend(q, k, v, self.mask, q_seg, kv_seg)

  def init_cache(self, memory) -> cache_lib.CrossKVCache:
    """Projects the memory once for decoding."""
    if self.mask.depends_on_head:
      raise ValueError(f"decoding supports head-independent masks only, got mask {self.mask!r}")
    k, v = self._memory_kv(memory)
    return cache_lib.CrossKVCache(k, v)

  def decode(self, x, cache: cache_lib.CrossKVCache, *, position, memory_mask=None):
    """``x [B, 1, C]`` at decoder ``position`` -> ``[B, 1, C]``."""
    b, m = cache.k.shape[:2]
    q = sharding.constrain(self.proj.q_proj(x), _Q)
    ctx = masks_lib.MaskContext(1, 1)
    seen = self.mask.evaluate(jnp.asarray(position, jnp.int32), jnp.arange(m), None, ctx, jnp)
    seen = jnp.broadcast_to(seen, (b, m))
    if memory_mask is not None:
      seen = seen & memory_mask
    kv_seg = jnp.where(seen, 0, 1).astype(jnp.int32)
    return self._attend(q, cache.k, cache.v, None, jnp.zeros((b, 1), jnp.int32), kv_seg)
