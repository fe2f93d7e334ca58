"""Recycled Attention, the ``"recycled"`` mixer: a decoding method. Training and prefill are exact
causal softmax attention (``attn_jax.attention``; ``implementation=`` picks the backend); decoding
alternates a full step (the token attends to the whole cache and remembers, per K/V head, the
``top_k`` keys it attended to most) with ``stride - 1`` steps that attend only to those recycled
keys and to the tokens generated since the full step. The cache is kept whole, so the next full
step may choose other keys. The decoding loop equals
:func:`attn_jax.mechanisms.recycled_attention` (its oracle) on the layer's projections.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

import attn_jax
from attn_jax import masks as masks_lib
from attn_jax.layers import cache as cache_lib
from attn_jax.layers import registry
from attn_jax.layers.mixers import common

HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecycledConfig(registry.MixerConfig):
  """Recycled Attention (causal; shared fields: :class:`~attn_jax.layers.MixerConfig`).

  Attributes:
    stride: decoding steps from one full step to the next (1: every step is full: dense decoding).
    top_k: keys recycled per K/V head after a full step (at most the cache length).
  """

  stride: int = 16
  top_k: int = 256

  def validate(self):
    super().validate()
    self.check_causal_only()
    self.check_positive("stride", "top_k", allow_none=False)


@dataclasses.dataclass(frozen=True)
class RecycledCache:
  """``kv`` (the whole KV cache), ``chosen [B, Hkv, top_k]`` (slots recycled by the last full step)
  and ``full_position`` (int32 scalar position of that step; -1 before the first)."""

  kv: cache_lib.KVCache
  chosen: jax.Array
  full_position: jax.Array


jax.tree_util.register_dataclass(RecycledCache, data_fields=["kv", "chosen", "full_position"], meta_fields=[])


def _take(x, idx):
  """``x [B, S, Hkv, X]``, ``idx [B, Hkv, K]`` -> ``[B, Hkv, K, X]``."""
  return jax.vmap(jax.vmap(lambda a, i: a[i], in_axes=(1, 0)))(x, idx)


class RecycledAttention(common.SparseAttention):
  """Exact causal attention in training and prefill; recycled decoding (mixer protocol)."""

  def attend(self, q, k, v, **unused):
    return attn_jax.attention(q, k, v, mask=masks_lib.causal(), implementation=self.config.implementation)

  def init_cache(self, batch: int, max_len: int, dtype) -> RecycledCache:
    c = self.config
    common.check_fits(c, "top_k", c.top_k, max_len, "the cache length max_len")
    d = self.proj.q_proj.kernel[...].shape[-1]
    return RecycledCache(cache_lib.KVCache.create(batch, max_len, c.kv_heads, d, d, dtype),
                         jnp.zeros((batch, c.kv_heads, c.top_k), jnp.int32), jnp.int32(-1))

  def prefill(self, x, cache: RecycledCache, **unused):
    b, t = x.shape[:2]
    q, k, v = self.project(x, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
    return self.output(self.attend(q, k, v)), dataclasses.replace(cache, kv=cache.kv.fill(k, v).constrained())

  def decode(self, x, cache: RecycledCache, *, position, **unused):
    """A full step when none happened yet or ``stride`` steps have passed since the last; a
    recycled step otherwise. ``x [B, 1, C]`` -> ``([B, 1, C], cache)``."""
    c = self.config
    b = x.shape[0]
    position = jnp.asarray(position, jnp.int32)
    q, k, v = self.project(x, jnp.full((b, 1), position, jnp.int32))
    kv = cache.kv.append(k, v, position).constrained()
    s, hkv = kv.capacity, kv.k.shape[2]
    hq, d = q.shape[2], q.shape[3]
    g = hq // hkv
    qg = q[:, 0].astype(jnp.float32).reshape(b, hkv, g, d)
    scale = 1.0 / math.sqrt(d)
    kf, vf = kv.k.astype(jnp.float32), kv.v.astype(jnp.float32)

    def full(_):
      vis = (kv.positions >= 0) & (kv.positions <= position)                                # [S]
      logits = jnp.einsum("bhgd,bshd->bhgs", qg, kf, precision=HIGHEST) * scale
      p = jax.nn.softmax(jnp.where(vis, logits, -jnp.inf), axis=-1)
      out = jnp.einsum("bhgs,bshd->bhgd", p, vf, precision=HIGHEST)
      # Ties go to the lower slot, the earlier key (slot = position in this cache).
      _, chosen = lax.top_k(p.sum(2), c.top_k)
      return out, chosen.astype(jnp.int32), position

    def recycled(_):
      recent = position - c.stride + 1 + jnp.arange(c.stride)                              # [stride]
      idx = jnp.concatenate([cache.chosen, jnp.broadcast_to(recent, (b, hkv, c.stride))], -1)
      live = jnp.concatenate([cache.chosen <= cache.full_position,
                              jnp.broadcast_to((recent > cache.full_position) & (recent >= 0), (b, hkv, c.stride))], -1)
      safe = jnp.clip(idx, 0, s - 1)
      logits = jnp.einsum("bhgd,bhkd->bhgk", qg, _take(kf, safe), precision=HIGHEST) * scale
      p = jax.nn.softmax(jnp.where(live[:, :, None], logits, -jnp.inf), axis=-1)
      out = jnp.einsum("bhgk,bhkd->bhgd", p, _take(vf, safe), precision=HIGHEST)
      return out, cache.chosen, cache.full_position

    is_full = (cache.full_position < 0) | (position - cache.full_position >= c.stride)
    out, chosen, full_position = lax.cond(is_full, full, recycled, None)
    y = self.output(out.reshape(b, 1, hq, -1))
    return y, RecycledCache(kv, chosen, jnp.asarray(full_position, jnp.int32))


registry.register(registry.MixerEntry(
    name="recycled",
    config=RecycledConfig,
    layer=RecycledAttention,
    family="softmax",
    cache=RecycledCache,
    uses_rope=True,
    description="Recycled Attention (decoding): a full step every stride steps keeps its top_k keys per K/V "
                "head, the steps between attend to them + the tokens since; exact causal in training",
    paper="Xu et al. 2024, Recycled attention: efficient inference for long-context language models",
    quality=(registry.QualityPreset(
        "recycled", lambda t: dict(stride=4, top_k=max(4, t.seq_len // 4)),
        description="trains as dense causal attention; decoding recycles seq_len / 4 keys, stride 4"),),
    efficiency=(registry.EfficiencyPreset(
        "recycled (xla)", (("implementation", "xla"),), patterns=("causal_self",), default=False,
        quality="recycled"),),
))
