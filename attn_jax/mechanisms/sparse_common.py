"""Pieces shared by the content-dependent sparse mechanisms.

* :func:`block_sparse_attention`: softmax attention over the tiles of a traced BlockMask with a
  data-dependent transform of each tile's logits (a key bias, a per-query threshold, a table
  lookup), which :func:`attn_jax.attention` has no argument for. It is the xla backend's gather
  form (same gathers, same visibility) with the transform inserted, differentiated by autodiff
  under ``jax.checkpoint`` per query block, so memory stays one query block's tiles.
* :func:`merge_lse`: combine partial attentions over disjoint key sets through their LSEs.
* :func:`check_int`: the range checks the mechanisms share.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attn_jax.softmax import common
from attn_jax.softmax import xla_sparse


def check_int(fn: str, name: str, value, lo: int, hi: int | None = None, hint: str = "") -> int:
  """ValueError naming ``name`` unless ``value`` is an int in ``[lo, hi]``."""
  ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
  if ok:
    ok = value >= lo and (hi is None or value <= hi)
  if not ok:
    rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
    raise ValueError(f"{fn}: {name} must be an int in {rng}{hint}, got {value!r}")
  return int(value)


def merge_lse(parts):
  """``[(out [..., Dv], lse [...]), ...]`` over disjoint key sets -> their joint softmax attention.

  A part with ``lse = -inf`` (no key) contributes nothing; if every part is empty the result is
  0 with ``lse = -inf``.
  """
  lses = jnp.stack([l for _, l in parts])
  m = jnp.max(lses, axis=0)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  weights = jnp.exp(lses - m_safe)                           # 0 for empty parts
  total = weights.sum(0)
  out = sum(w[..., None] * o.astype(jnp.float32) for w, (o, _) in zip(weights, parts))
  safe = jnp.where(total > 0, total, 1.0)
  return out / safe[..., None], jnp.where(total > 0, m_safe + jnp.log(safe), -jnp.inf)


def _spec(q, k, v, mask, scale):
  b, tq, hq, d = q.shape
  _, tk, hkv, _ = k.shape
  return common.Spec(mask=mask, scale=scale, logits_soft_cap=None, q_len=tq, kv_len=tk, num_q_heads=hq,
                     num_kv_heads=hkv, head_dim=d, v_head_dim=v.shape[3], has_sinks=False, has_segments=False)


def block_sparse_attention(q, k, v, block_mask, *, scale=None, transform: Callable[..., Any] | None = None,
                           query_aux=None, key_aux=None, return_lse: bool = False):
  """Attention over the tiles of ``block_mask`` with ``transform`` applied to each tile's logits.

  Args:
    q, k, v: ``[B, Tq, Hq, D]``, ``[B, Tk, Hkv, D]``, ``[B, Tk, Hkv, Dv]``.
    block_mask: a :class:`attn_jax.TracedBlockMask` for these shapes.
    scale: logit scale (default ``D ** -0.5``).
    transform: ``f(logits, q_aux, k_aux, q_pos, k_pos) -> (logits, visible)`` on a query block's
      tile: ``logits [B, Hkv, Gm, Gr, bq, K]`` (scaled, float32, ``K = W * block_kv`` gathered
      keys), ``q_aux`` the query block's slice of ``query_aux`` laid out ``[B, Hkv, Gm, Gr, bq,
      X]``, ``k_aux`` the gathered ``key_aux`` ``[B, Hkv, Gm, K, X]``, ``q_pos [bq]`` and
      ``k_pos [B, Hkv, Gm, K]`` token positions. ``visible`` (broadcastable bool or None) is
      ANDed with the block mask's visibility. Differentiable in the auxiliary arrays.
    query_aux: ``[B, Tq, Hq, X]`` or None. key_aux: ``[B, Tk, Hkv, X]`` or None.
    return_lse: also return ``lse [B, Tq, Hq]``.

  Returns:
    ``out [B, Tq, Hq, Dv]`` float32 (and the LSE); rows without a visible key are 0.
  """
  d = q.shape[3]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  spec = _spec(q, k, v, block_mask.mask, scale)
  st = xla_sparse._Static(spec, block_mask.layout, block_mask.num_batch, block_mask.num_heads, None)
  lay = st.layout
  bq = lay.block_q
  qi, kb_all, vb_all, _, _ = xla_sparse._inputs(st, q, k, v, None, None)
  rows = xla_sparse._rows_of_lists((block_mask.kv_indices, block_mask.kv_counts), st, q.shape[0])
  qa = None if query_aux is None else xla_sparse._internal_queries(query_aux, st)
  ka = None if key_aux is None else xla_sparse._internal_blocks(key_aux, st)

  @jax.checkpoint
  def q_block(i, idx, counts, qi, kb_all, vb_all, qa, ka):
    qb = lax.dynamic_slice_in_dim(qi, i * bq, bq, axis=4)
    kb, vb = xla_sparse._gather_blocks(kb_all, idx), xla_sparse._gather_blocks(vb_all, idx)
    logits, _ = xla_sparse._scores(qb, kb, st)
    vis = xla_sparse._visibility(st, i, idx, counts, None, None)
    if transform is not None:
      w = idx.shape[-1]
      kpos = (idx[..., None] * lay.block_kv + jnp.arange(lay.block_kv)).reshape(idx.shape[:3] + (w * lay.block_kv,))
      qat = None if qa is None else lax.dynamic_slice_in_dim(qa, i * bq, bq, axis=4)
      kat = None if ka is None else xla_sparse._gather_blocks(ka, idx)
      logits, extra = transform(logits, qat, kat, i * bq + jnp.arange(bq), kpos)
      if extra is not None:
        vis = vis & extra
    m = jnp.max(jnp.where(vis, logits, common.NEG_INF), axis=-1)
    m = lax.stop_gradient(m)
    p = jnp.where(vis, jnp.exp(logits - m[..., None]), 0.0)
    l = p.sum(-1)
    acc = jnp.einsum("bhmgqk,bhmkd->bhmgqd", p, vb.astype(jnp.float32), preferred_element_type=jnp.float32)
    positive = l > 0
    safe = jnp.where(positive, l, 1.0)
    return acc / safe[..., None], jnp.where(positive, m + jnp.log(safe), -jnp.inf)

  def body(args):
    i, idx, counts = args
    return q_block(i, idx, counts, qi, kb_all, vb_all, qa, ka)

  out, lse = lax.map(body, (jnp.arange(lay.num_q_blocks), *rows))
  out, lse = xla_sparse._public_queries(out, st), xla_sparse._public_queries(lse, st)
  return (out, lse) if return_lse else out
