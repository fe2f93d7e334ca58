"""Dynamic Hierarchical Sparse Attention (DHSA; Xiong et al., "Long-Context Modeling with Dynamic
Hierarchical Sparse Attention for On-Device LLMs", NeurIPS 2025 workshop; arXiv 2510.24606).

DHSA predicts the sparsity of attention hierarchically (Sec. 3): the sequence is segmented into
variable-length chunks (boundaries from a learned predictor, Sec. 3.2); each chunk is represented
by the mean of its queries and of its keys scaled by the square root of its length
(length-normalised aggregation, Sec. 3.3); the chunk-chunk similarity ``S = Q_c K_c^T`` is
upsampled to token pairs (every pair inherits its chunks' score, Sec. 3.1) and each query keeps
the ``budget`` causal keys of highest upsampled score; attention runs on the kept pairs.

Our choices: chunks come as per-token chunk ids (nondecreasing from 0: the cumulative sum of the
predictor's boundary flags); ties in the upsampled score, i.e. inside a chunk and between chunks
of equal score, go to the more recent key, so a partially kept chunk keeps its latest tokens;
selection is per query head; no local window is forced. The ranking is not differentiated.

Fast form: every token's rank follows from chunk-level tables (the key chunks in score order
and their cumulative lengths), so the kept set is evaluated in-tile from ``O(Nc^2)`` tables, and
a traced BlockMask skips every tile without a kept pair. Its static width ``max_blocks`` is a
performance hint, not a truncation: when some query block needs more key blocks, the call
takes the branch whose width covers every block (``lax.cond``), so the result is always exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attn_jax import block_mask_traced as traced_lib
from attn_jax import masks as masks_lib
from attn_jax.mechanisms import block_topk
from attn_jax.mechanisms import dense
from attn_jax.mechanisms import sparse_common

HIGHEST = jax.lax.Precision.HIGHEST


def _check(q, k, v, chunk_ids, num_chunks, budget, block_q, fn):
  dense.check_qkv(q, k, v, fn)
  b, t = q.shape[:2]
  if k.shape[1] != t:
    raise ValueError(f"{fn}: DHSA is causal self-attention: q_len == kv_len, got {t} and {k.shape[1]}")
  if tuple(chunk_ids.shape) != (b, t) or not jnp.issubdtype(chunk_ids.dtype, jnp.integer):
    raise ValueError(f"{fn}: chunk_ids must be an integer array of shape [batch, seq] = {(b, t)}, got "
                     f"{chunk_ids.dtype}{tuple(chunk_ids.shape)}")
  num_chunks = sparse_common.check_int(fn, "num_chunks", num_chunks, 1, t, " (static maximum number of chunks)")
  budget = sparse_common.check_int(fn, "budget", budget, 1, t, " (keys kept per query, at most the length)")
  block_q = sparse_common.check_int(fn, "block_q", block_q, 1)
  try:
    ids = np.asarray(chunk_ids)
  except jax.errors.TracerArrayConversionError:
    ids = None  # traced ids cannot be inspected here: the contract above is the caller's
  if ids is not None:
    if (ids[:, 0] != 0).any() or (np.diff(ids, axis=1) < 0).any() or (np.diff(ids, axis=1) > 1).any() \
        or ids.max() >= num_chunks:
      raise ValueError(f"{fn}: chunk_ids must start at 0 and grow by 0 or 1 per token, below num_chunks="
                       f"{num_chunks}; got ids from {ids.min()} to {ids.max()}")
  return num_chunks, budget, block_q


def chunk_similarity(q, k, chunk_ids, *, num_chunks: int):
  """``[B, Hq, Nc, Nc]`` float32 ``S[cq, ck] = q_c . k_c`` with ``x_c = sum_chunk(x) / sqrt(len)``
  (the mean scaled by ``sqrt(len)``); empty chunks have zero representatives."""
  g = q.shape[2] // k.shape[2]
  onehot = jax.nn.one_hot(chunk_ids, num_chunks, dtype=jnp.float32)                        # [B, T, Nc]
  lens = onehot.sum(1)                                                                      # [B, Nc]
  norm = jax.lax.rsqrt(jnp.maximum(lens, 1.0))[:, :, None, None]
  qc = jnp.einsum("btc,bthd->bchd", onehot, q.astype(jnp.float32), precision=HIGHEST) * norm
  kc = jnp.einsum("btc,bthd->bchd", onehot, k.astype(jnp.float32), precision=HIGHEST) * norm
  kc = jnp.repeat(kc, g, axis=2)
  return jnp.einsum("bchd,behd->bhce", qc, kc, precision=HIGHEST)


def _tables(q, k, chunk_ids, num_chunks):
  """Chunk lengths/starts ``[B, Nc]`` and, per (batch, query head, query chunk, key chunk): the
  total length of the key chunks ranked before it (own chunk at full length), and whether the
  own chunk is ranked before it."""
  s = jax.lax.stop_gradient(chunk_similarity(q, k, chunk_ids, num_chunks=num_chunks))     # [B, H, Nc, Nc]
  lens = jax.nn.one_hot(chunk_ids, num_chunks, dtype=jnp.int32).sum(1)                     # [B, Nc]
  starts = jnp.cumsum(lens, axis=1) - lens
  c = jnp.arange(num_chunks)
  valid = c[None, :] <= c[:, None]                                                          # [cq, ck]
  # Rank key chunks by (score desc, chunk desc); chunks after the query chunk go last.
  neg_s = jnp.where(valid, -s, jnp.inf)
  neg_c = jnp.broadcast_to(-c, s.shape)
  pos_c = jnp.broadcast_to(c, s.shape)
  _, _, order = lax.sort((neg_s, neg_c, pos_c), dimension=-1, num_keys=2)
  len_in_order = jnp.take_along_axis(jnp.broadcast_to(lens[:, None, None, :], s.shape), order, axis=-1)
  cum = jnp.cumsum(len_in_order, axis=-1) - len_in_order
  rank = jnp.argsort(order, axis=-1)                                                        # position of each chunk
  before = jnp.take_along_axis(cum, rank, axis=-1)                                          # [B, H, cq, ck]
  own_rank = jnp.take_along_axis(rank, c[None, None, :, None], axis=-1)                     # rank of cq in row cq
  own_first = own_rank < rank
  return lens, starts, before.astype(jnp.int32), own_first


def _rank(before, own_first, len_cq, len_i, q_pos, k_pos, k_end, same_chunk):
  """Rank of key ``k_pos`` for query ``q_pos`` (broadcasting); see the module docstring."""
  b = before - jnp.where(own_first, len_cq - len_i, 0)
  last = jnp.where(same_chunk, q_pos, k_end - 1)
  return b + (last - k_pos)


def _needed_blocks(tabs, chunk_ids, budget, block_q, block_kv, num_chunks):
  """``[B, Hq, nq, nk]`` bool: key blocks holding a kept key of some query of the query block."""
  lens, starts, before, own_first = tabs
  bsz, h = before.shape[:2]
  t = chunk_ids.shape[1]
  nq, nk = -(-t // block_q), -(-t // block_kv)
  pad = nq * block_q - t
  ids = jnp.pad(chunk_ids, ((0, 0), (0, pad)), constant_values=-1).reshape(bsz, nq, block_q)
  c = jnp.arange(num_chunks)

  def one_block(args):
    i_blk, cq = args                                                                          # cq [B, bq]
    qpos = i_blk * block_q + jnp.arange(block_q)
    live = cq >= 0
    cq0 = jnp.maximum(cq, 0)
    rows = (bsz, h, block_q, num_chunks)
    bf = jnp.take_along_axis(before, jnp.broadcast_to(cq0[:, None, :, None], rows), axis=2)
    of = jnp.take_along_axis(own_first, jnp.broadcast_to(cq0[:, None, :, None], rows), axis=2)
    len_cq = jnp.take_along_axis(lens, cq0, axis=1)[:, None, :, None]                       # [B, 1, bq, 1]
    len_i = (qpos[None, :] - jnp.take_along_axis(starts, cq0, axis=1) + 1)[:, None, :, None]
    same = c[None, None, None, :] == cq0[:, None, :, None]
    b_i = bf - jnp.where(of, len_cq - len_i, 0)
    avail = jnp.where(same, len_i, lens[:, None, None, :])                                   # keys of c up to i
    keep = jnp.clip(budget - b_i, 0, avail)
    end = jnp.where(same, qpos[None, None, :, None] + 1, (starts + lens)[:, None, None, :])
    ok = live[:, None, :, None] & (c[None, None, None, :] <= cq0[:, None, :, None]) & (keep > 0)
    first_blk = jnp.where(ok, (end - keep) // block_kv, nk)
    last_blk = jnp.where(ok, (end - 1) // block_kv + 1, nk)
    marks = jnp.zeros((bsz, h, nk + 1), jnp.int32)
    bi = jnp.arange(bsz)[:, None, None, None]
    hi = jnp.arange(h)[None, :, None, None]
    marks = marks.at[bi, hi, first_blk].add(1).at[bi, hi, last_blk].add(-1)
    return jnp.cumsum(marks, axis=-1)[..., :nk] > 0

  needed = lax.map(one_block, (jnp.arange(nq), ids.transpose(1, 0, 2)))                    # [nq, B, H, nk]
  return needed.transpose(1, 2, 0, 3)


def dhsa_attention(q, k, v, chunk_ids, *, num_chunks: int, budget: int, block_q: int = 32, block_kv: int = 64,
                   max_blocks: int | None = None, scale=None):
  """DHSA: per-query budget of the keys with the highest upsampled chunk similarity.

  Args:
    q, k, v: ``[B, T, Hq, D]``, ``[B, T, Hkv, D]``, ``[B, T, Hkv, Dv]`` (causal self-attention).
    chunk_ids: ``[B, T]`` int chunk of every token, nondecreasing from 0 by steps of 0 or 1.
    num_chunks: static upper bound on the number of chunks, in ``[1, T]``.
    budget: keys kept per query, in ``[1, T]``; ``budget = T`` keeps every causal key (dense).
    block_q, block_kv: tiles of the block-skipping computation. Rows of a query block that lie
      in different chunks rank the key chunks differently and the block visits the union of
      their choices, so query blocks smaller than the chunks keep the tiles sparse; key blocks
      near the chunk length waste little on partially kept chunks.
    max_blocks: static number of key blocks per query block of the fast branch (default
      ``6 * ceil(budget / block_kv) + 8``: with chunks near the key block size, query blocks
      need 2 to 5 times the budget's blocks, the union of their chunks' choices); calls that
      need more take the full-width branch.
    scale: logit scale (default ``D ** -0.5``).

  Returns:
    ``[B, T, Hq, Dv]`` in the dtype of ``q``. Gradients flow to q, k, v through the attention.
  """
  num_chunks, budget, block_q = _check(q, k, v, chunk_ids, num_chunks, budget, block_q, "dhsa_attention")
  block_kv = sparse_common.check_int("dhsa_attention", "block_kv", block_kv, 1)
  t, hq = q.shape[1], q.shape[2]
  nk = -(-t // block_kv)
  if max_blocks is None:
    max_blocks = 6 * -(-budget // block_kv) + 8
  max_blocks = min(sparse_common.check_int("dhsa_attention", "max_blocks", max_blocks, 1), nk)
  chunk_ids = chunk_ids.astype(jnp.int32)
  tabs = _tables(q, k, chunk_ids, num_chunks)
  lens, starts, before, own_first = tabs
  needed = _needed_blocks(tabs, chunk_ids, budget, block_q, block_kv, num_chunks)
  overflow = jnp.any(needed.sum(-1) > max_blocks)
  scores = jnp.where(needed, 0.0, -jnp.inf)
  # Per-query and per-key data the tiles need: chunk, its length and the query's own-chunk prefix.
  q_chunk_len = jnp.take_along_axis(lens, chunk_ids, axis=1)
  q_len_i = jnp.arange(t)[None, :] - jnp.take_along_axis(starts, chunk_ids, axis=1) + 1
  qaux = jnp.stack([chunk_ids, q_chunk_len, q_len_i], -1)[:, :, None, :]
  qaux = jnp.broadcast_to(qaux, (q.shape[0], t, hq, 3))
  kend = jnp.take_along_axis(starts + lens, chunk_ids, axis=1)
  kaux = jnp.broadcast_to(jnp.stack([chunk_ids, kend], -1)[:, :, None, :], (k.shape[0], t, k.shape[2], 2))
  g = hq // k.shape[2]
  # Tables per (batch, kv head, query head of the group): [B, Hkv, G, 1, Nc, Nc].
  bf_t = before.reshape(before.shape[0], k.shape[2], g, 1, num_chunks, num_chunks)
  of_t = own_first.reshape(bf_t.shape)
  lookup = jax.vmap(jax.vmap(jax.vmap(jax.vmap(lambda tab, r, c: tab[r[:, None], c[None, :]],
                                                 in_axes=(0, 0, None)))))

  def transform(logits, qa, ka, q_pos, k_pos):
    cq, len_cq, len_i = qa[..., 0], qa[..., 1][..., None], qa[..., 2][..., None]          # [B,Hkv,G,1,bq]
    ck, kend_ = ka[..., 0], ka[..., 1]                                                     # [B,Hkv,G,K]
    bf = lookup(bf_t, cq, ck)                                                              # [B,Hkv,G,1,bq,K]
    of = lookup(of_t, cq, ck)
    same = cq[..., None] == ck[:, :, :, None, None, :]
    rank = _rank(bf, of, len_cq, len_i, q_pos[:, None], k_pos[:, :, :, None, None, :],
                 kend_[:, :, :, None, None, :], same)
    return logits, rank < budget

  def run(width):
    tb = traced_lib.from_scores(scores, min(width, nk), q_len=t, kv_len=t, block_q=block_q, block_kv=block_kv,
                                mask=masks_lib.causal(), keep=block_topk.SameBlock(block_kv))
    return sparse_common.block_sparse_attention(q, k, v, tb, scale=scale, transform=transform, query_aux=qaux,
                                                key_aux=kaux)

  if max_blocks >= nk:
    out = run(nk)
  else:
    out = lax.cond(overflow, lambda: run(nk), lambda: run(max_blocks))
  return out.astype(q.dtype)


def dhsa_attention_reference(q, k, v, chunk_ids, *, num_chunks: int, budget: int, scale=None):
  """The oracle: upsampled scores ``S[c(i), c(j)]``, every causal key ranked by (score, position)."""
  num_chunks, budget, _ = _check(q, k, v, chunk_ids, num_chunks, budget, 1, "dhsa_attention_reference")
  t = q.shape[1]
  s = jax.lax.stop_gradient(chunk_similarity(q, k, chunk_ids, num_chunks=num_chunks))     # [B, H, Nc, Nc]
  up = jax.vmap(lambda sb, ids: sb[:, ids][:, :, ids])(s, chunk_ids)                       # [B, H, T, T]
  j = jnp.arange(t)
  causal = j[None, :] <= j[:, None]
  # beats[b, h, i, j, j']: key j' outranks key j for query i.
  beats = (up[..., None, :] > up[..., :, None]) | ((up[..., None, :] == up[..., :, None]) & (j[None, :] > j[:, None]))
  rank = jnp.sum(beats & causal[:, None, :], axis=-1)
  kept = causal & (rank < budget)
  out = dense.attention(q, k, v, scale=scale, logits_fn=lambda x: jnp.where(kept, x, -jnp.inf))
  return out.astype(q.dtype)
