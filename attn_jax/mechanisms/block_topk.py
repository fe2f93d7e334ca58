"""Block top-k selection attention (MoBA; the selection branch of NSA) on a traced BlockMask.

MoBA ("Mixture of Block Attention for long-context LLMs", Sec. 2.2) splits the keys into blocks,
scores each block for a query by the inner product with the block's mean-pooled key, keeps the
top-k blocks, always keeps the query's own block (under the causal mask), and runs exact softmax
attention over the kept keys. NSA ("Native Sparse Attention", Sec. 3.3.2) selects the same way
and shares one selection across the query heads of a GQA group, so that each K/V block is loaded
once per group. This module does both in block form: one selection per (batch, query block, K/V
head), which is what a BlockMask expresses and what kernels can skip on.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax import block_mask_traced as traced_lib
from attn_jax import masks as masks_lib
from attn_jax.mechanisms import dense
from attn_jax.softmax import api as softmax_api


@dataclasses.dataclass(frozen=True)
class SameBlock(masks_lib.Mask):
  """Query ``i`` and key ``j`` lie in the same block of ``block`` key positions.

  The query sits at key position ``i + offset`` (``offset=None``: ``kv_len - q_len``, the
  bottom-right alignment of :func:`attn_jax.masks.causal`). Used as ``keep=`` to select each query
  block's own (diagonal) key block.
  """

  block: int
  offset: int | None = None

  def _offset(self, ctx):
    return ctx.default_offset if self.offset is None else self.offset

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    o, b = self._offset(ctx), self.block
    # Shift both sides by a multiple of the block so that the dividends are non-negative.
    shift = b * (-(-max(0, -o) // b))
    return (masks_lib.div_nonneg(q_idx + (o + shift), b, xp) == masks_lib.div_nonneg(kv_idx + shift, b, xp))

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    o, b = self._offset(ctx), self.block
    qb_lo, qb_hi = np.floor_divide(q_lo + o, b), np.floor_divide(q_hi + o, b)
    kb_lo, kb_hi = np.floor_divide(k_lo, b), np.floor_divide(k_hi, b)
    may = (np.maximum(qb_lo, kb_lo) <= np.minimum(qb_hi, kb_hi))
    must = (qb_lo == qb_hi) & (kb_lo == kb_hi) & (qb_lo == kb_lo)
    return may, must

  def __repr__(self):
    return f"same_block({self.block}, offset={self.offset})"


def _check(q, k, v, block_size, top_k, fn):
  dense.check_qkv(q, k, v, fn)
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"{fn}: block_size must be a positive int, got {block_size!r}")
  nk = -(-k.shape[1] // block_size)
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= nk:
    raise ValueError(f"{fn}: top_k must be an int in [0, num_kv_blocks={nk}] (kv_len {k.shape[1]} / block_size "
                     f"{block_size}), got {top_k!r}")
  return int(block_size), int(top_k)


def _pooled(x, block, length):
  """Mean over the valid positions of each block: ``[B, T, H, D] -> [B, n, H, D]`` float32."""
  b, t, h, d = x.shape
  n = -(-t // block)
  pad = n * block - t
  xf = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, block, h, d)
  counts = jnp.minimum(block, length - jnp.arange(n) * block).astype(jnp.float32)
  return xf.sum(2) / counts[None, :, None, None]


def block_scores(q, k, *, block_size: int):
  """``[B, Hkv, nq, nk]`` float32 scores: group- and block-pooled queries times block-pooled keys.

  ``score[b, h, i, j] = mean(q over query block i and the query heads of group h) .
  mean(k_h over key block j)``, which equals the mean over those queries of ``q . kbar_j``.
  """
  b, tq, hq, d = q.shape
  hkv = k.shape[2]
  qbar = _pooled(q, block_size, tq).reshape(b, -1, hkv, hq // hkv, d).mean(3)  # [B, nq, Hkv, D]
  kbar = _pooled(k, block_size, k.shape[1])                                     # [B, nk, Hkv, D]
  return jnp.einsum("bihd,bjhd->bhij", qbar, kbar, precision=jax.lax.Precision.HIGHEST)


def topk_block_mask(q, k, *, block_size: int, top_k: int, causal: bool = True) -> traced_lib.TracedBlockMask:
  """The traced BlockMask of :func:`topk_block_attention` (one selection per batch row and K/V head).

  Args:
    q: ``[B, Tq, Hq, D]``; k: ``[B, Tk, Hkv, D]``.
    block_size: query and key block size in tokens (the tiles of the attention backends).
    top_k: key blocks chosen per query block from the scores, in ``[0, nk]``; with ``causal`` the
      query block's own key block is kept on top of them.
    causal: combine with ``masks.causal()`` (bottom-right aligned).
  """
  block_size, top_k = _check(q, k, k, block_size, top_k, "topk_block_mask")
  scores = jax.lax.stop_gradient(block_scores(q, k, block_size=block_size))
  mask = masks_lib.causal() if causal else None
  keep = SameBlock(block_size) if causal else None
  return traced_lib.from_scores(scores, top_k, q_len=q.shape[1], kv_len=k.shape[1], block_q=block_size,
                                block_kv=block_size, mask=mask, keep=keep)


def topk_block_attention(q, k, v, *, block_size: int, top_k: int, causal: bool = True, scale=None,
                         implementation=None, config=None):
  """Block top-k sparse attention: each query block attends to its own block and its ``top_k``
  best-scoring key blocks.

  Keys are mean-pooled per block of ``block_size``; a query block scores key block ``j`` by its
  pooled queries (averaged over the query heads of a GQA group: one selection per K/V head, as
  in NSA) times the pooled keys of ``j``; it keeps the ``top_k`` highest among the blocks the
  causal mask allows, plus its own block, and runs exact softmax attention over them (causal
  inside the own block). With ``top_k >= num_kv_blocks - 1`` (causal) or ``top_k = num_kv_blocks``
  every allowed block is kept and the result equals dense attention exactly.

  Gradients flow to ``q``, ``k``, ``v`` through the attention over the kept keys; the selection
  (a top-k of pooled scores, integer block indices) is not differentiated, as in MoBA and NSA.

  Args:
    q, k, v: ``[B, Tq, Hq, D]``, ``[B, Tk, Hkv, D]``, ``[B, Tk, Hkv, Dv]``.
    block_size: block size in tokens; need not divide the lengths (the last block is partial).
      The Pallas GPU kernel needs a power of two >= 16; otherwise dispatch moves on to xla.
    top_k: an int in ``[0, ceil(Tk / block_size)]``.
    causal: causal (bottom-right aligned) or not; without it no block is kept by default.
    scale, implementation, config: as in :func:`attn_jax.attention`.

  Returns:
    ``[B, Tq, Hq, Dv]`` in the dtype of ``q``.
  """
  tb = topk_block_mask(q, k, block_size=block_size, top_k=top_k, causal=causal)
  return softmax_api.attention(q, k, v, block_mask=tb, scale=scale, implementation=implementation, config=config)


def topk_block_attention_reference(q, k, v, *, block_size: int, top_k: int, causal: bool = True, scale=None):
  """The oracle: the same selection by a stable sort of dense scores, materialised token by token."""
  block_size, top_k = _check(q, k, v, block_size, top_k, "topk_block_attention_reference")
  b, tq, hq, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  nq, nk = -(-tq // block_size), -(-tk // block_size)
  scores = jax.lax.stop_gradient(block_scores(q, k, block_size=block_size))    # [B, Hkv, nq, nk]
  # Key block j is eligible for query block i when the causal mask leaves a visible pair; the own
  # block is the one holding the query block's (bottom-right aligned) positions.
  qpos = jnp.arange(tq) + (tk - tq)
  qi, kj = jnp.arange(tq) // block_size, jnp.arange(tk) // block_size
  onehot_q = jax.nn.one_hot(qi, nq, dtype=jnp.int32)                            # [Tq, nq]
  onehot_k = jax.nn.one_hot(kj, nk, dtype=jnp.int32)                            # [Tk, nk]
  token_ok = (jnp.arange(tk)[None, :] <= qpos[:, None]) if causal else jnp.ones((tq, tk), bool)
  eligible = (onehot_q.T @ token_ok.astype(jnp.int32) @ onehot_k) > 0           # [nq, nk]
  own = (onehot_q.T @ (qpos[:, None] // block_size == kj[None, :]).astype(jnp.int32) @ onehot_k) > 0
  own = own & eligible if causal else jnp.zeros_like(own)
  candidate = eligible & ~own
  order = jnp.argsort(jnp.where(candidate, -scores, jnp.inf), axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)
  chosen = (candidate & (rank < top_k)) | own                                   # [B, Hkv, nq, nk]
  vis = chosen[:, :, qi][:, :, :, kj] & token_ok                                # [B, Hkv, Tq, Tk]
  vis = jnp.repeat(vis, hq // hkv, axis=1)
  out = dense.attention(q, k, v, scale=scale, logits_fn=lambda s: jnp.where(vis, s, -jnp.inf))
  return out.astype(q.dtype)

