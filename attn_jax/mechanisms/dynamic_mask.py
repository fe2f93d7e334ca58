"""Dynamic Mask Attention (DMA; Shi et al., "Trainable Dynamic Mask Sparse Attention", 2025).

DMA (Sec. 3.1, content-aware mask) derives a bias for every key from the values:
``delta_j = A_h * softplus(W v_j)`` per K/V head (``W`` maps the concatenated value heads of a
token to one number per head, ``A_h`` is learned; the released code uses this form, noting that
the paper's ``exp(A * softplus(.))`` is replaced by it for numerical stability). Each query keeps
the ``window`` keys with the largest bias among the keys its causal mask allows (Sec. 3.2), and
attends to them with the bias added to the scaled logits: ``softmax(q k^T / sqrt(d) + delta)``
over the kept keys. The bias is trained through the logits; the top-``window`` choice is not
differentiated (the reference code detaches it).

Our choices: ties in the bias are broken toward the more recent key, so that with ``A = 0`` (the
released initialisation) DMA is exactly sliding-window attention of ``window`` keys; blocks are
skipped through a traced BlockMask (Sec. 3.3, position-aware sparse computation).

Block structure. The ``window``-th largest bias among keys ``<= p`` can only grow with ``p``, so
the keys a query keeps before its own block are all kept by the first row of that block: the
rows of a query block together need the blocks of at most ``window`` keys plus their own
block(s). The BlockMask width ``min(num_kv_blocks, window + own blocks)`` (one own block when
the query blocks align with the key blocks, two otherwise) is therefore exact, never a truncation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attn_jax import block_mask_traced as traced_lib
from attn_jax import masks as masks_lib
from attn_jax.mechanisms import block_topk
from attn_jax.mechanisms import dense
from attn_jax.mechanisms import sparse_common


def dynamic_mask_bias(v, dt_weight, a):
  """DMA's key bias ``delta = A_h * softplus(concat_h(v) @ W)[h]``.

  Args:
    v: values ``[B, T, Hkv, Dv]``.
    dt_weight: ``[Hkv * Dv, Hkv]``.
    a: ``[Hkv]``.

  Returns:
    ``[B, T, Hkv]`` float32.
  """
  b, t, h, dv = v.shape
  if dt_weight.shape != (h * dv, h) or a.shape != (h,):
    raise ValueError(f"dynamic_mask_bias: expected dt_weight [{h * dv}, {h}] and a [{h}], got "
                     f"{tuple(dt_weight.shape)} and {tuple(a.shape)}")
  dt = jnp.einsum("btf,fh->bth", v.reshape(b, t, h * dv).astype(jnp.float32), dt_weight.astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST)
  return a.astype(jnp.float32) * jax.nn.softplus(dt)


def _check(q, k, v, bias, window, block_size, fn):
  dense.check_qkv(q, k, v, fn)
  b, tq = q.shape[:2]
  tk, hkv = k.shape[1], k.shape[2]
  if tq > tk:
    raise ValueError(f"{fn}: q_len ({tq}) must not exceed kv_len ({tk}) (queries are the last kv positions)")
  if tuple(bias.shape) != (b, tk, hkv):
    raise ValueError(f"{fn}: bias must have shape [batch, kv_len, kv_heads] = {(b, tk, hkv)}, got {tuple(bias.shape)}")
  window = sparse_common.check_int(fn, "window", window, 1, tk, " (keys kept per query, at most kv_len)")
  block_size = sparse_common.check_int(fn, "block_size", block_size, 1)
  return window, block_size


def _beats(v1, p1, v2, p2):
  """``(v1, p1) > (v2, p2)`` in lexicographic order (larger bias, then the later position)."""
  return (v1 > v2) | ((v1 == v2) & (p1 > p2))


def _thresholds(bias, window: int, block: int):
  """Per key position p: the ``window``-th largest ``(bias, position)`` among keys ``<= p``.

  Returns ``(value, position)`` arrays ``[B, Hkv, Tk]``; ``(-inf, -1)`` where fewer than ``window``
  keys exist. A scan over key blocks carries the prefix's top ``window`` in decreasing order;
  inside a block, every candidate's rank in each row's candidate set is a count of the candidates
  that beat it (comparisons and cumulative sums, ``O(block * (window + block))``, no sort), and a
  row's threshold is its candidate of rank ``window - 1``.
  """
  b, t, h = bias.shape
  n = -(-t // block)
  pad = n * block - t
  w = window
  vals = jnp.pad(bias.transpose(0, 2, 1), ((0, 0), (0, 0), (0, pad)), constant_values=-jnp.inf)
  pos = jnp.broadcast_to(jnp.arange(n * block, dtype=jnp.int32), vals.shape)
  pos = jnp.where(pos < t, pos, -1)
  vals = vals.reshape(b, h, n, block).transpose(2, 0, 1, 3)
  pos = pos.reshape(b, h, n, block).transpose(2, 0, 1, 3)
  upto = jnp.arange(block)[:, None] >= jnp.arange(block)[None, :]             # [row r, element s]: s <= r

  def step(carry, blk):
    cv, cp = carry                                                            # [B, H, w], decreasing
    bv, bp = blk                                                              # [B, H, block]
    # x_beats_c[s, j]: block element s beats carry element j; cumulated over s up to row r.
    x_beats_c = _beats(bv[..., :, None], bp[..., :, None], cv[..., None, :], cp[..., None, :])
    cnt_xc = jnp.cumsum(x_beats_c.astype(jnp.int32), axis=-2)                 # [B, H, r, w]
    rank_c = jnp.arange(w) + cnt_xc
    c_beats_x = _beats(cv[..., None, :], cp[..., None, :], bv[..., :, None], bp[..., :, None]).sum(-1)
    x_beats_x = _beats(bv[..., :, None], bp[..., :, None], bv[..., None, :], bp[..., None, :])  # [s', s]
    cnt_xx = jnp.cumsum(x_beats_x.astype(jnp.int32), axis=-2)                 # [B, H, r, s]
    rank_x = c_beats_x[..., None, :] + cnt_xx
    hit_c = rank_c == w - 1
    hit_x = (rank_x == w - 1) & upto
    tv = jnp.maximum(jnp.max(jnp.where(hit_c, cv[..., None, :], -jnp.inf), -1),
                     jnp.max(jnp.where(hit_x, bv[..., None, :], -jnp.inf), -1))
    tp = jnp.maximum(jnp.max(jnp.where(hit_c, cp[..., None, :], -1), -1),
                     jnp.max(jnp.where(hit_x, bp[..., None, :], -1), -1))
    # The new carry: the union's elements of rank < w, placed at their rank.
    ranks = jnp.concatenate([rank_c[..., -1, :], rank_x[..., -1, :]], -1)     # [B, H, w + block]
    slot = jnp.where(ranks < w, ranks, w)
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    nv = jnp.full((b, h, w + 1), -jnp.inf).at[bi, hi, slot].max(jnp.concatenate([cv, bv], -1))
    np_ = jnp.full((b, h, w + 1), -1, jnp.int32).at[bi, hi, slot].max(jnp.concatenate([cp, bp], -1))
    return (nv[..., :w], np_[..., :w]), (tv, tp)

  init = (jnp.full((b, h, w), -jnp.inf), jnp.full((b, h, w), -1, jnp.int32))
  _, (tv, tp) = lax.scan(step, init, (vals, pos))
  tv = tv.transpose(1, 2, 0, 3).reshape(b, h, n * block)[..., :t]
  tp = tp.transpose(1, 2, 0, 3).reshape(b, h, n * block)[..., :t]
  return tv, tp


def _kept(key_val, key_pos, thr_val, thr_pos):
  """A key is kept iff ``(bias, position) >= threshold`` in lexicographic order."""
  return (key_val > thr_val) | ((key_val == thr_val) & (key_pos >= thr_pos))


def dynamic_mask_block_mask(bias, *, q_len: int, window: int, block_size: int) -> traced_lib.TracedBlockMask:
  """The traced BlockMask of :func:`dynamic_mask_attention` (one selection per batch row and K/V head)."""
  b, tk, h = bias.shape
  sb = jax.lax.stop_gradient(bias.astype(jnp.float32))
  tv, tp = _thresholds(sb, window, block_size)
  nq, nk = -(-q_len // block_size), -(-tk // block_size)
  offset = tk - q_len
  # The first row of query block I sits at key position p0; a key block J holding a kept key of
  # p0 has its (bias, position) maximum at or above p0's threshold.
  p0 = jnp.minimum(jnp.arange(nq) * block_size + offset, tk - 1)
  t0v, t0p = tv[..., p0], tp[..., p0]                                         # [B, H, nq]
  kpos = jnp.arange(nk * block_size)
  padded = jnp.pad(sb.transpose(0, 2, 1), ((0, 0), (0, 0), (0, nk * block_size - tk)), constant_values=-jnp.inf)
  blocks = padded.reshape(b, h, nk, block_size)
  bmax = blocks.max(-1)                                                       # [B, H, nk]
  # Position of the block maximum: the latest key attaining it (ties go to recent keys).
  at_max = blocks == bmax[..., None]
  bpos = jnp.max(jnp.where(at_max, kpos.reshape(nk, block_size), -1), axis=-1)
  needed = _kept(bmax[:, :, None, :], bpos[:, :, None, :], t0v[..., None], t0p[..., None])
  needed = needed & (jnp.arange(nk)[None, :] * block_size <= p0[:, None])
  scores = jnp.where(needed, 0.0, -jnp.inf)
  return traced_lib.from_scores(scores, min(window, nk), q_len=q_len, kv_len=tk, block_q=block_size,
                                block_kv=block_size, mask=masks_lib.causal(), keep=block_topk.SameBlock(block_size))


def dynamic_mask_attention(q, k, v, bias, *, window: int, block_size: int = 64, scale=None):
  """DMA: each query keeps the ``window`` causal keys of largest ``bias`` and adds the bias to them.

  Args:
    q, k, v: ``[B, Tq, Hq, D]``, ``[B, Tk, Hkv, D]``, ``[B, Tk, Hkv, Dv]``; ``Tq <= Tk``, queries
      aligned with the last ``Tq`` key positions (bottom-right causal).
    bias: ``[B, Tk, Hkv]`` per-key bias (e.g. :func:`dynamic_mask_bias`). Differentiable.
    window: keys kept per query (DMA's ``keep_window_size``), in ``[1, Tk]``; ``window = Tk``
      keeps every causal key: dense causal attention plus the bias.
    block_size: tile size of the block-skipping computation (not a semantic parameter).
    scale: logit scale (default ``D ** -0.5``).

  Returns:
    ``[B, Tq, Hq, Dv]`` in the dtype of ``q``.
  """
  window, block_size = _check(q, k, v, bias, window, block_size, "dynamic_mask_attention")
  tq, tk = q.shape[1], k.shape[1]
  tb = dynamic_mask_block_mask(bias, q_len=tq, window=window, block_size=block_size)
  tv, tp = _thresholds(jax.lax.stop_gradient(bias.astype(jnp.float32)), window, block_size)
  offset = tk - tq
  g = q.shape[2] // k.shape[2]
  # Thresholds of each query's position, per query head (shared across a GQA group).
  qthr = jnp.stack([tv[..., offset:], tp[..., offset:].astype(jnp.float32)], -1)      # [B, Hkv, Tq, 2]
  qthr = jnp.repeat(qthr.transpose(0, 2, 1, 3), g, axis=2)                             # [B, Tq, Hq, 2]
  kaux = jnp.stack([bias.astype(jnp.float32), jax.lax.stop_gradient(bias.astype(jnp.float32))], -1)

  def transform(logits, qa, ka, q_pos, k_pos):
    thr_v, thr_p = qa[..., 0][..., None], qa[..., 1][..., None]                         # [B,Hkv,Gm,Gr,bq,1]
    key_bias, key_sel = ka[..., 0][:, :, :, None, None, :], ka[..., 1][:, :, :, None, None, :]
    kpos = k_pos[:, :, :, None, None, :].astype(jnp.float32)
    return logits + key_bias, _kept(key_sel, kpos, thr_v, thr_p)

  out = sparse_common.block_sparse_attention(q, k, v, tb, scale=scale, transform=transform, query_aux=qthr,
                                             key_aux=kaux)
  return out.astype(q.dtype)


def dynamic_mask_attention_reference(q, k, v, bias, *, window: int, block_size: int = 64, scale=None):
  """The oracle: ranks every causal key of every query by ``(bias, position)``, materialised."""
  window, _ = _check(q, k, v, bias, window, block_size, "dynamic_mask_attention_reference")
  tq, hq = q.shape[1], q.shape[2]
  tk, hkv = k.shape[1], k.shape[2]
  p = jnp.arange(tq) + (tk - tq)
  j = jnp.arange(tk)
  causal = j[None, :] <= p[:, None]                                                    # [Tq, Tk]
  sel = jax.lax.stop_gradient(bias.astype(jnp.float32)).transpose(0, 2, 1)            # [B, Hkv, Tk]
  # rank[i, j] = number of causal keys j' of query i that beat key j: larger bias, or equal bias
  # and a later position.
  beats = (sel[..., None, :] > sel[..., :, None]) | ((sel[..., None, :] == sel[..., :, None]) & (j[None, :] > j[:, None]))
  rank = jnp.einsum("bhjk,qk->bhqj", beats.astype(jnp.float32), causal.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
  kept = causal & (rank < window)                                                      # [B, Hkv, Tq, Tk]
  kept = jnp.repeat(kept, hq // hkv, axis=1)
  key_bias = jnp.repeat(bias.astype(jnp.float32).transpose(0, 2, 1), hq // hkv, axis=1)[:, :, None, :]
  out = dense.attention(q, k, v, scale=scale, logits_fn=lambda s: jnp.where(kept, s + key_bias, -jnp.inf))
  return out.astype(q.dtype)
