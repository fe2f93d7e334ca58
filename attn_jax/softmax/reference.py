"""The oracle: softmax attention with materialised float32 scores.

O(q_len * kv_len) memory. Every other backend is tested against this one. Gradients come from
JAX autodiff and are NaN-free on fully masked rows (double-``where`` around the normaliser).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn_jax import block_mask_traced
from attn_jax.softmax import common


def attention(q, k, v, sinks, q_segment_ids, kv_segment_ids, block_mask=None, *, spec: common.Spec,
              config=None):
  """Reference attention.

  Args:
    q: ``[B, Tq, Hq, D]``; k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]``.
    sinks: ``[Hq]`` or None. q_segment_ids / kv_segment_ids: ``[B, Tq]`` / ``[B, Tk]`` or None.
    block_mask: a :class:`attn_jax.block_mask_traced.TracedBlockMask` or None; its selection is
      materialised token by token.

  Returns:
    ``(out [B, Tq, Hq, Dv] in q.dtype, lse [B, Tq, Hq] float32)``. ``lse`` includes the sink
    logit; a row that sees no key (and has no sink) has ``lse = -inf`` and output 0.
  """
  if config is not None:
    raise ValueError(f"the reference backend takes no config, got {config!r}")
  b, tq, hq, d = q.shape
  hkv, g = spec.num_kv_heads, spec.group_size
  hi = jax.lax.Precision.HIGHEST
  qf = q.astype(jnp.float32).reshape(b, tq, hkv, g, d)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, k.astype(jnp.float32), precision=hi) * spec.scale
  s = common.soft_cap(s, spec.logits_soft_cap)

  q_idx = jnp.arange(tq)[:, None]
  kv_idx = jnp.arange(spec.kv_len)[None, :]
  head = None
  if spec.mask.depends_on_head:
    head = (jnp.arange(hkv)[:, None] * g + jnp.arange(g)[None, :])[:, :, None, None]
  visible = common.tile_visibility(spec, q_idx, kv_idx, head)
  if spec.has_segments:
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, Tq, Tk]
    visible = visible & same[:, None, None]
  if block_mask is not None:
    selected = block_mask_traced.expand_heads(block_mask.token_visibility(), 1, hq, hkv)
    visible = visible & selected  # [Bm, Hkv|1, G|1, Tq, Tk]
  visible = jnp.broadcast_to(visible, s.shape)

  # Masking before exp (not after) matters for the gradient: a masked logit far above the row
  # maximum would overflow exp, and where's zero cotangent times inf is NaN.
  s = jnp.where(visible, s, -jnp.inf)
  m = jnp.max(s, axis=-1)  # [B, Hkv, G, Tq]
  if spec.has_sinks:
    sink = sinks.astype(jnp.float32).reshape(hkv, g)[None, :, :, None]
    m = jnp.maximum(m, sink)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.exp(s - m[..., None])
  denom = p.sum(-1)
  if spec.has_sinks:
    denom = denom + jnp.exp(sink - m)
  positive = denom > 0
  safe = jnp.where(positive, denom, 1.0)
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p / safe[..., None], v.astype(jnp.float32), precision=hi)
  lse = jnp.where(positive, m + jnp.log(safe), -jnp.inf)
  o = o.reshape(b, tq, hq, spec.v_head_dim).astype(q.dtype)
  lse = lse.transpose(0, 3, 1, 2).reshape(b, tq, hq)
  return o, lse
