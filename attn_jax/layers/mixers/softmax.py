"""Softmax attention, the ``"softmax"`` mixer: masked self attention (full, causal, sliding
windows, sink tokens, chunks, prefix-LM, explicit masks), GQA, learned sinks, soft-capping, RoPE,
a rolling KV cache; and cross attention (CAB's non-causal and causal cross patterns), all on
``attn_jax.attention``.

Decoding runs through the same primitive. The mask of a decoding step depends on the current
position, which is traced, while ``attn_jax.attention`` takes static masks; so a step evaluates
the layer's mask predicate at (query position, each slot's stored position) in JAX and passes
the result as key segment ids (visible slots share the query's segment id). This serves every
head-independent mask, and a rolling cache, without a second attention implementation.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

import attn_jax
from attn_jax import masks as masks_lib
from attn_jax import sharding
from attn_jax.context_parallel import config as context_parallel
from attn_jax.layers import cache as cache_lib
from attn_jax.layers import registry
from attn_jax.layers import rope as rope_lib
from attn_jax.layers.mixers import common

ROPE_MODES = ("absolute", "cache")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SoftmaxConfig(registry.MixerConfig):
  """Softmax attention (shared fields: :class:`~attn_jax.layers.MixerConfig`).

  Attributes:
    window: sliding window: a causal query sees itself and the ``window - 1`` keys before it; a
      non-causal query sees ``window // 2`` keys on each side.
    num_sink_tokens: the first ``n`` keys stay visible to every query (StreamingLLM), still
      subject to causality.
    chunk_size: chunked causal attention (Llama 4): keys of the query's own chunk only.
    mask: an explicit :mod:`attn_jax.masks` mask (block-sparse layout, prefix-LM, your own
      predicate). It replaces ``causal`` / ``window`` / ``chunk_size`` / ``num_sink_tokens``.
    learned_sinks: one learned logit per head in the softmax denominator (gpt-oss).
    logits_soft_cap: Gemma-2 soft-capping of the logits.
    shard_map: wrap the attention call in ``shard_map`` over batch and heads (needed by kernels
      XLA cannot partition). None: exactly when ``implementation`` names a Pallas kernel.
    rolling_cache: decode with a cache of ``num_sink_tokens + window`` slots (StreamingLLM).
      None: whenever the mask is a causal window (with or without sinks).
    rope_in_cache: RoPE positions with a rolling cache: ``"absolute"`` (keys rotated once, at
      their original position, when inserted; the exact equivalent of the window + sink mask on
      the whole sequence) or ``"cache"`` (keys stored unrotated and rotated at their position
      *inside* the cache at every step, as StreamingLLM does, which keeps positions below
      ``num_sink_tokens + window`` however long the generation).
  """

  window: int | None = None
  num_sink_tokens: int = 0
  chunk_size: int | None = None
  mask: masks_lib.Mask | None = None
  learned_sinks: bool = False
  logits_soft_cap: float | None = None
  shard_map: bool | None = None
  rolling_cache: bool | None = None
  rope_in_cache: str = "absolute"

  def validate(self):
    super().validate()
    self.check_positive("window", "chunk_size")
    n = self.num_sink_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
      raise self.error(f"num_sink_tokens must be an int >= 0, got {n!r}")
    if self.mask is not None and not isinstance(self.mask, masks_lib.Mask):
      raise self.error(f"mask must be an attn_jax.masks.Mask or None, got {type(self.mask).__name__}")
    if self.chunk_size is not None and not self.causal:
      raise self.error("chunk_size (chunked causal attention) needs causal=True")
    if self.rope_in_cache not in ROPE_MODES:
      raise self.error(f"rope_in_cache must be one of {ROPE_MODES}, got {self.rope_in_cache!r}")
    if not isinstance(self.learned_sinks, bool):
      raise self.error(f"learned_sinks must be a bool, got {self.learned_sinks!r}")
    for name in ("shard_map", "rolling_cache"):
      if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
        raise self.error(f"{name} must be a bool or None, got {getattr(self, name)!r}")
    if self.rolling_cache and not self._window_only:
      raise self.error(
          "rolling_cache=True needs a causal sliding window (window=..., optionally num_sink_tokens) "
          "and no explicit mask or chunk_size: the cache keeps exactly the keys such a mask shows")
    cap = self.logits_soft_cap
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0):
      raise self.error(f"logits_soft_cap must be a positive float or None, got {cap!r}")
    if self.uses_shard_map and self.build_mask().depends_on_head:
      raise self.error("shard_map splits heads across devices, so the mask must not depend on the head index")

  @property
  def _window_only(self) -> bool:
    return self.mask is None and self.causal and self.window is not None and self.chunk_size is None

  @property
  def uses_shard_map(self) -> bool:
    if self.shard_map is not None:
      return self.shard_map
    return (self.implementation or "").startswith("pallas")

  @property
  def uses_rolling_cache(self) -> bool:
    return self._window_only if self.rolling_cache is None else self.rolling_cache

  def build_mask(self) -> masks_lib.Mask:
    """The self-attention mask this config describes."""
    if self.mask is not None:
      return self.mask
    parts = []
    if self.window is not None:
      if self.causal:
        parts.append(masks_lib.sliding_window(self.window - 1))
      else:
        parts.append(masks_lib.sliding_window(self.window // 2, self.window // 2))
    if self.chunk_size is not None:
      parts.append(masks_lib.chunked_causal(self.chunk_size))
    if not parts:
      parts.append(masks_lib.causal() if self.causal else masks_lib.full())
    mask = parts[0]
    for p in parts[1:]:
      mask = mask & p
    if self.num_sink_tokens:
      # Non-causal (encoder) sinks are global tokens: visible to every query.
      mask = mask | masks_lib.sink_tokens(self.num_sink_tokens, causal=self.causal)
      if self.causal:
        # A sink must not expose a future token to the first num_sink_tokens queries.
        mask = mask & masks_lib.causal()
    return mask


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

  if cp is None and config.uses_shard_map:
    out = sharding.shard_map_attention(fn, q, k, v, sinks=sinks, q_segment_ids=q_segment_ids,
                                       kv_segment_ids=kv_segment_ids)
  else:
    out = fn(q, k, v, sinks, q_segment_ids, kv_segment_ids)
  return sharding.constrain(out, common.Q_SPEC)


def _learned_sinks(config, param_dtype):
  if not config.learned_sinks:
    return None
  return nnx.Param(jnp.zeros((config.num_heads,), param_dtype), logical_axes=("heads",))


class SoftmaxAttention(nnx.Module):
  """Masked softmax self attention (mixer protocol: :mod:`attn_jax.layers.registry`)."""

  def __init__(self, config: SoftmaxConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    del layer_index, num_layers
    self.config = config
    self.mask = config.build_mask()
    self.dtype = dtype
    self.proj = common.Projections(config, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.sinks = _learned_sinks(config, param_dtype)

  def _rope(self, x, positions):
    n = self.config.rope
    if n == 0:
      return x
    axes = 1 if positions.ndim == 2 else positions.shape[-1]
    if axes != n:
      raise ValueError(f"rope={n} needs positions with {n} coordinate(s) per token, got shape {positions.shape}")
    return rope_lib.apply_rope(x, positions, theta=self.config.rope_theta)

  def _qkv(self, x):
    return self.proj.qkv(x)

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
  decoder positions live on different axes. Windows, chunks and sink tokens are self-attention
  options and do not apply.
  """

  def __init__(self, config: SoftmaxConfig, dim: int, *, rngs: nnx.Rngs, memory_dim: int | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.config = config
    if config.mask is not None:
      self.mask = config.mask
    else:
      self.mask = masks_lib.causal(offset=0) if config.causal else masks_lib.full()
    self.proj = common.Projections(config, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                   kv_dim=memory_dim)
    self.sinks = _learned_sinks(config, param_dtype)

  def _memory_kv(self, memory):
    k = sharding.constrain(self.proj.k_proj(memory), common.KV_SPEC)
    v = sharding.constrain(self.proj.v_proj(memory), common.KV_SPEC)
    return k, v

  def _attend(self, q, k, v, mask, q_seg=None, kv_seg=None):
    sinks = None if self.sinks is None else self.sinks[...]
    return self.proj.o_proj(_softmax_attention(self.config, q, k, v, mask, sinks, q_seg, kv_seg))

  def __call__(self, x, memory, *, memory_mask=None):
    """``x [B, T, C]``, ``memory [B, M, Cm]`` -> ``[B, T, C]``.

    ``memory_mask [B, M]`` bool marks real (non-padding) memory tokens.
    """
    q = sharding.constrain(self.proj.q_proj(x), common.Q_SPEC)
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
    q = sharding.constrain(self.proj.q_proj(x), common.Q_SPEC)
    ctx = masks_lib.MaskContext(1, 1)
    seen = self.mask.evaluate(jnp.asarray(position, jnp.int32), jnp.arange(m), None, ctx, jnp)
    seen = jnp.broadcast_to(seen, (b, m))
    if memory_mask is not None:
      seen = seen & memory_mask
    kv_seg = jnp.where(seen, 0, 1).astype(jnp.int32)
    return self._attend(q, cache.k, cache.v, None, jnp.zeros((b, 1), jnp.int32), kv_seg)


def _quarter(task: registry.Task) -> int:
  """The benchmark's sliding window: a quarter of the sequence, at least 4 tokens."""
  return max(4, task.seq_len // 4)


registry.register(registry.MixerEntry(
    name="softmax",
    config=SoftmaxConfig,
    layer=SoftmaxAttention,
    cross_layer=CrossAttention,
    family="softmax",
    cache=cache_lib.KVCache,
    uses_rope=True,
    description="softmax attention under any mask: full, causal, sliding window, sink tokens, "
                "chunked, prefix-LM, block-sparse, your own; GQA, learned sinks, soft-cap",
    paper="Vaswani et al. 2017, Attention is all you need (arXiv:1706.03762)",
    quality=(
        registry.QualityPreset("softmax", default=True, description="dense causal softmax attention"),
        registry.QualityPreset("sliding_window", lambda t: dict(window=_quarter(t)), default=True,
                               description="causal sliding window of seq_len / 4 tokens"),
        registry.QualityPreset("sliding_window_sinks", lambda t: dict(window=_quarter(t), num_sink_tokens=4),
                               description="sliding window of seq_len / 4 plus 4 sink tokens"),
        registry.QualityPreset("chunked", lambda t: dict(chunk_size=_quarter(t)),
                               description="chunked causal attention, chunks of seq_len / 4"),
    ),
    efficiency=(
        registry.EfficiencyPreset("flash (xla)", (("implementation", "xla"),),
                                  patterns=("noncausal_self", "causal_self", "noncausal_cross", "causal_cross"),
                                  quality="softmax"),
        # The quality suite's sliding window is a quarter of its task, without sinks.
        registry.EfficiencyPreset("window256+4sinks (xla)",
                                  (("implementation", "xla"), ("window", 256), ("num_sink_tokens", 4)),
                                  quality="sliding_window"),
    ),
))
