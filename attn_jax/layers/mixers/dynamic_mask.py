"""Dynamic Mask Attention, the ``"dynamic_mask"`` mixer: a key bias computed from the values
selects, per query, the ``window`` causal keys of largest bias, which are attended to with the
bias added to their logits (:func:`attn_jax.mechanisms.dynamic_mask_attention`; empty tiles are
skipped through a traced BlockMask).

Decoding is exact: a query's kept keys depend only on the keys up to it, so one step ranks the
cache's keys by (bias, position), keeps the ``window`` best and attends to them with their bias,
which is the training forward's row for that position. The cache is a plain
:class:`~attn_jax.layers.cache.KVCache`; the bias is recomputed from its values each step.

Initialisation (our choice): the released code starts the bias scale ``A`` at 0 (a sliding
window at step 0, and no gradient into the bias projection until ``A`` moves); we start it at
``a_init`` (1.0 by default) so that the selection depends on the content from the first step.
``a_init=0.0`` gives the released initialisation.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax import mechanisms
from attn_jax.layers import cache as cache_lib
from attn_jax.layers import registry
from attn_jax.layers.mixers import common


@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicMaskConfig(registry.MixerConfig):
  """Dynamic Mask Attention (causal; shared fields: :class:`~attn_jax.layers.MixerConfig`).

  Attributes:
    window: keys kept per query (DMA's ``keep_window_size``); capped at the sequence length.
    block_size: tile size of the block-skipping computation (not semantic).
    a_init: initial bias scale ``A`` of every K/V head.
  """

  window: int = 256
  block_size: int = 64
  a_init: float = 1.0

  def validate(self):
    super().validate()
    self.check_causal_only()
    self.check_positive("window", "block_size", allow_none=False)
    if isinstance(self.a_init, bool) or not isinstance(self.a_init, (int, float)):
      raise self.error(f"a_init must be a float, got {self.a_init!r}")


class DynamicMaskAttention(common.SparseAttention):
  """Projections, RoPE, DMA's key bias and its top-``window`` attention (mixer protocol)."""

  def __init__(self, config: DynamicMaskConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    super().__init__(config, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype, layer_index=layer_index,
                     num_layers=num_layers)
    hkv, dv = config.kv_heads, config.head_dim_for(dim)
    w = jax.random.normal(rngs.params(), (hkv * dv, hkv), param_dtype) / math.sqrt(hkv * dv)
    self.dt_weight = nnx.Param(w, logical_axes=(None, "kv_heads"))
    self.a = nnx.Param(jnp.full((hkv,), config.a_init, param_dtype), logical_axes=("kv_heads",))

  def bias(self, v):
    """``[B, T, Hkv]`` float32 key bias of the values ``v [B, T, Hkv, Dv]``."""
    return mechanisms.dynamic_mask_bias(v, self.dt_weight[...], self.a[...])

  def attend(self, q, k, v, **unused):
    c = self.config
    return mechanisms.dynamic_mask_attention(q, k, v, self.bias(v), window=min(c.window, k.shape[1]),
                                             block_size=c.block_size)

  def init_cache(self, batch: int, max_len: int, dtype) -> cache_lib.KVCache:
    d = self.proj.q_proj.kernel[...].shape[-1]
    return cache_lib.KVCache.create(batch, max_len, self.config.kv_heads, d, d, dtype)

  def prefill(self, x, cache: cache_lib.KVCache, **unused):
    b, t = x.shape[:2]
    q, k, v = self.project(x, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
    return self.output(self.attend(q, k, v)), cache.fill(k, v).constrained()

  def decode(self, x, cache: cache_lib.KVCache, *, position, **unused):
    """One step over the cache: the ``window`` visible keys of largest (bias, position)."""
    b = x.shape[0]
    position = jnp.asarray(position, jnp.int32)
    q, k, v = self.project(x, jnp.full((b, 1), position, jnp.int32))
    cache = cache.append(k, v, position).constrained()
    s, hkv = cache.capacity, cache.k.shape[2]
    hq, d = q.shape[2], q.shape[3]
    g = hq // hkv
    window = min(self.config.window, s)
    visible = (cache.positions >= 0) & (cache.positions <= position)                       # [S]
    bias = jnp.where(visible[None, :, None], self.bias(cache.v), -jnp.inf)                 # [B, S, Hkv]
    # lax.top_k prefers the lower index among equal values; reversing the slots (slot = position
    # in a non-rolling cache) makes ties go to the more recent key, as in the training forward.
    vals, rev = jax.lax.top_k(bias[:, ::-1].transpose(0, 2, 1), window)                   # [B, Hkv, W]
    idx = s - 1 - rev
    take = jax.vmap(jax.vmap(lambda a, i: a[i], in_axes=(1, 0)))                          # per (b, h)
    ks = take(cache.k.astype(jnp.float32), idx)                                           # [B, Hkv, W, D]
    vs = take(cache.v.astype(jnp.float32), idx)
    qg = q[:, 0].astype(jnp.float32).reshape(b, hkv, g, d)
    logits = jnp.einsum("bhgd,bhwd->bhgw", qg, ks, precision=jax.lax.Precision.HIGHEST) / math.sqrt(d)
    logits = jnp.where((vals > -jnp.inf)[:, :, None], logits + vals[:, :, None], -jnp.inf)
    out = jnp.einsum("bhgw,bhwd->bhgd", jax.nn.softmax(logits, -1), vs, precision=jax.lax.Precision.HIGHEST)
    return self.output(out.reshape(b, 1, hq, -1)), cache


registry.register(registry.MixerEntry(
    name="dynamic_mask",
    config=DynamicMaskConfig,
    layer=DynamicMaskAttention,
    family=None,
    cache=cache_lib.KVCache,
    uses_rope=True,
    description="Dynamic Mask Attention: a value-derived key bias picks the top-window causal keys per query "
                "and is added to their logits; empty tiles skipped; exact decoding",
    paper="Shi et al. 2025, Trainable dynamic mask sparse attention",
    quality=(registry.QualityPreset(
        "dynamic_mask", lambda t: dict(window=max(4, t.seq_len // 4), block_size=max(4, t.seq_len // 16)),
        description="top seq_len / 4 keys per query by the value-derived bias"),),
    efficiency=(registry.EfficiencyPreset(
        "dynamic_mask256", (("window", 256), ("block_size", 64)), patterns=("causal_self",), default=False,
        quality="dynamic_mask"),),
))
