"""Materialised softmax attention with an arbitrary logit transform: the oracle of the mechanisms
that change how logits are formed (temperatures, relative-position terms, routed heads).

Float32, ``Precision.HIGHEST``, ``O(Tq * Tk)`` memory per head. The mechanisms' fast forms fold
their change into the inputs of :func:`attn_jax.attention` (any backend); these references
compute the same function the obvious way, so that the two can be compared.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attn_jax import masks as masks_lib

HIGHEST = jax.lax.Precision.HIGHEST


def check_qkv(q, k, v, fn: str):
  """Shapes ``[B, Tq, Hq, D]``, ``[B, Tk, Hkv, D]``, ``[B, Tk, Hkv, Dv]`` with ``Hq % Hkv == 0``."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "ndim") or x.ndim != 4:
      shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
      raise ValueError(f"{fn}: {name} must have shape [batch, seq, heads, dim], got {shape}")
  b, _, hq, d = q.shape
  if k.shape[0] != b or v.shape[0] != b or k.shape[3] != d or v.shape[1:3] != k.shape[1:3] or hq % k.shape[2]:
    raise ValueError(f"{fn}: expected q [B, Tq, Hq, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv] with Hq a "
                     f"multiple of Hkv, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def visibility(mask, tq: int, tk: int, hq: int):
  """``[1 or Hq, Tq, Tk]`` boolean visibility of ``mask`` (None: full)."""
  mask = masks_lib.full() if mask is None else mask
  ctx = masks_lib.MaskContext(tq, tk)
  mask.validate(ctx)
  head = jnp.arange(hq)[:, None, None] if mask.depends_on_head else None
  vis = mask.evaluate(jnp.arange(tq)[None, :, None], jnp.arange(tk)[None, None, :], head, ctx, jnp)
  return jnp.broadcast_to(vis, (hq if mask.depends_on_head else 1, tq, tk))


def attention(q, k, v, *, mask=None, scale=None, logits_fn=None):
  """``softmax(logits_fn(scale * q k^T) | mask) v`` materialised in float32.

  Args:
    q, k, v: ``[B, Tq, Hq, D]``, ``[B, Tk, Hkv, D]``, ``[B, Tk, Hkv, Dv]`` (GQA by repetition).
    mask: an attn_jax mask or None.
    scale: default ``D ** -0.5``.
    logits_fn: ``[B, Hq, Tq, Tk] -> [B, Hq, Tq, Tk]`` applied before masking.

  Returns:
    ``[B, Tq, Hq, Dv]`` float32; a row with no visible key is 0.
  """
  _, tq, hq, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  kf = jnp.repeat(k.astype(jnp.float32), hq // hkv, axis=2)
  vf = jnp.repeat(v.astype(jnp.float32), hq // hkv, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kf, precision=HIGHEST) * scale
  if logits_fn is not None:
    s = logits_fn(s)
  vis = visibility(mask, tq, tk, hq)[None]
  s = jnp.where(vis, s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s, -1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  denom = p.sum(-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  return jnp.einsum("bhqk,bkhd->bqhd", p, vf, precision=HIGHEST)
