"""HyperAttention (Han et al., "HyperAttention: Long-context Attention in Near-Linear Time", ICLR 2024).

Non-causal (Alg. 2-3): queries and keys are hashed by angular LSH with ``r`` random hyperplanes
(sortLSH, Sec. 3); each side is sorted by its bucket's rank in the Gray-code (Hamming) order, so
that neighbouring buckets differ in one bit; exact attention is computed only on the diagonal
blocks of the sorted order (the heavy entries). ``m`` key columns sampled uniformly (with
replacement) estimate the rest of every row: their logits get ``+ log(n_k / m)``, samples that
fall in the query's own sorted block are dropped (already counted), and the two parts merge
through their log-sum-exps. Causal (Sec. 4, Alg. 4): split in halves; the top-left and
bottom-right halves recurse causally, the bottom-left block is non-causal HyperAttention; at or
below ``min_seq_len`` queries, attention is exact.

Our choices: one hash (``r`` hyperplanes shared by q and k) per call; samples are drawn per
(batch, query head) and per recursion node from ``key``; with cross lengths the key blocks have
``n_k / (n_q / block_size)`` keys. The outputs are an approximation of softmax attention whose
exact pattern is materialised by :func:`hyper_attention_reference` (a weighted softmax: weight 1
on the sorted diagonal blocks, ``count * n_k / m`` on sampled columns, 0 elsewhere) for the same
hashes and samples. Gradients flow to q, k, v through both parts; hashing and sampling are not
differentiated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attn_jax import masks as masks_lib
from attn_jax.mechanisms import dense
from attn_jax.mechanisms import sparse_common
from attn_jax.softmax import api as softmax_api

HIGHEST = jax.lax.Precision.HIGHEST


def lsh_codes(x, projections):
  """Bucket ranks ``[B, T, H]`` int32: the sign pattern of ``x @ projections`` in Gray-code order."""
  r = projections.shape[1]
  bits = (jnp.einsum("bthd,dr->bthr", x.astype(jnp.float32), projections.astype(jnp.float32), precision=HIGHEST) > 0)
  code = (bits.astype(jnp.int32) << jnp.arange(r, dtype=jnp.int32)).sum(-1)
  # The rank of a Gray code g is the prefix XOR g ^ (g >> 1) ^ (g >> 2) ^ ...
  rank = code
  shift = 1
  while shift < r:
    rank = rank ^ (rank >> shift)
    shift *= 2
  return jax.lax.stop_gradient(rank)


def _node_plan(cq, ck, rng, block_size: int, sample_size: int):
  """Sorted-block ids of queries / keys and the sampled key columns of one non-causal node.

  Returns ``q_block [B, nq, Hq]``, ``k_block [B, nk, Hkv]`` (the block of each token in its side's
  sorted order) and ``samples [B, m, Hq]`` key indices.
  """
  b, nq, hq = cq.shape
  nk = ck.shape[1]
  nb = nq // block_size
  kb = nk // nb
  # argsort of argsort: each token's slot in the stable sort by bucket rank.
  slot_q = jnp.argsort(jnp.argsort(cq, axis=1, stable=True), axis=1, stable=True)
  slot_k = jnp.argsort(jnp.argsort(ck, axis=1, stable=True), axis=1, stable=True)
  samples = jax.random.randint(rng, (b, sample_size, hq), 0, nk)
  return slot_q // block_size, slot_k // kb, samples


def _check(q, k, v, projections, block_size, sample_size, causal, min_seq_len, fn):
  dense.check_qkv(q, k, v, fn)
  tq, tk, d = q.shape[1], k.shape[1], q.shape[3]
  if projections.ndim != 2 or projections.shape[0] != d or not 1 <= projections.shape[1] <= 30:
    raise ValueError(f"{fn}: projections must have shape [head_dim={d}, r] with 1 <= r <= 30, got "
                     f"{tuple(projections.shape)}")
  block_size = sparse_common.check_int(fn, "block_size", block_size, 1, tq, " (queries per sorted block)")
  sample_size = sparse_common.check_int(fn, "sample_size", sample_size, 0, tk, " (sampled key columns)")
  min_seq_len = sparse_common.check_int(fn, "min_seq_len", min_seq_len, 1)
  if causal:
    if tq != tk:
      raise ValueError(f"{fn}: causal HyperAttention needs q_len == kv_len, got {tq} and {tk}")
    n = tq
    while n > min_seq_len:
      if n % 2 or (n // 2) % block_size:
        raise ValueError(f"{fn}: block_size={block_size} must divide every half of the causal recursion above "
                         f"min_seq_len={min_seq_len} (length {tq}: half {n // 2} of node {n})")
      n //= 2
  elif tq > min_seq_len and (tq % block_size or tk % (tq // block_size)):
    raise ValueError(f"{fn}: block_size={block_size} must divide q_len={tq}, and the number of blocks "
                     f"{tq // block_size} must divide kv_len={tk}")
  return block_size, sample_size, min_seq_len


def _exact(q, k, v, causal, scale, implementation):
  out, lse = softmax_api.attention(q, k, v, mask=masks_lib.causal() if causal else None, scale=scale,
                                   return_lse=True, implementation=implementation)
  return out.astype(jnp.float32), lse


def _noncausal(q, k, v, cq, ck, rng, st):
  block_size, sample_size, min_seq_len, scale, impl = st
  b, nq, hq, d = q.shape
  nk, hkv = k.shape[1], k.shape[2]
  if nq <= min_seq_len:
    return _exact(q, k, v, False, scale, impl)
  g = hq // hkv
  nb = nq // block_size
  kb = nk // nb
  q_block, k_block, samples = _node_plan(cq, ck, rng, block_size, sample_size)
  # Sorted order of each side, then exact attention on the diagonal blocks.
  perm_q = jnp.argsort(cq, axis=1, stable=True)
  perm_k = jnp.argsort(ck, axis=1, stable=True)
  qs = jnp.take_along_axis(q, perm_q[..., None], axis=1).reshape(b, nb, block_size, hkv, g, d)
  ks = jnp.take_along_axis(k, perm_k[..., None], axis=1).reshape(b, nb, kb, hkv, d)
  vs = jnp.take_along_axis(v, perm_k[..., None], axis=1).reshape(b, nb, kb, hkv, v.shape[3])
  s = jnp.einsum("bnqhgd,bnkhd->bnhgqk", qs, ks, preferred_element_type=jnp.float32) * scale
  m = jax.lax.stop_gradient(s.max(-1))
  p = jnp.exp(s - m[..., None])
  l = p.sum(-1)
  o = jnp.einsum("bnhgqk,bnkhd->bnqhgd", p, vs.astype(jnp.float32), precision=HIGHEST) / jnp.moveaxis(l, -1, 2)[..., None]
  lse = jnp.moveaxis(m + jnp.log(l), -1, 2).reshape(b, nq, hq)
  inv_q = jnp.argsort(perm_q, axis=1)
  o = jnp.take_along_axis(o.reshape(b, nq, hq, -1), inv_q[..., None], axis=1)
  lse = jnp.take_along_axis(lse, inv_q, axis=1)
  if sample_size == 0:
    return o, lse
  head_kv = jnp.arange(hq) // g
  k_h, v_h = k[:, :, head_kv], v[:, :, head_kv]                                       # [B, nk, Hq, .]
  ksamp = jnp.take_along_axis(k_h, samples[..., None], axis=1)                        # [B, m, Hq, D]
  vsamp = jnp.take_along_axis(v_h, samples[..., None], axis=1)
  samp_block = jnp.take_along_axis(k_block[:, :, head_kv], samples, axis=1)           # [B, m, Hq]
  s2 = jnp.einsum("bqhd,bmhd->bhqm", q, ksamp, preferred_element_type=jnp.float32) * scale
  s2 = s2 + math.log(nk / sample_size)
  fresh = q_block.transpose(0, 2, 1)[..., :, None] != samp_block.transpose(0, 2, 1)[..., None, :]
  s2 = jnp.where(fresh, s2, -jnp.inf)
  m2 = jax.lax.stop_gradient(jnp.max(s2, -1))
  m2 = jnp.where(jnp.isfinite(m2), m2, 0.0)
  p2 = jnp.exp(s2 - m2[..., None])
  l2 = p2.sum(-1)
  safe = jnp.where(l2 > 0, l2, 1.0)
  o2 = jnp.einsum("bhqm,bmhd->bqhd", p2, vsamp.astype(jnp.float32), precision=HIGHEST) / safe.transpose(0, 2, 1)[..., None]
  lse2 = jnp.where(l2 > 0, m2 + jnp.log(safe), -jnp.inf).transpose(0, 2, 1)
  return sparse_common.merge_lse([(o, lse), (o2, lse2)])


def _causal(q, k, v, cq, ck, rng, st):
  n = q.shape[1]
  if n <= st[2]:
    return _exact(q, k, v, True, st[3], st[4])
  h = n // 2
  r1, r2, r3 = jax.random.split(rng, 3)
  o1, l1 = _causal(q[:, :h], k[:, :h], v[:, :h], cq[:, :h], ck[:, :h], r1, st)
  below = _noncausal(q[:, h:], k[:, :h], v[:, :h], cq[:, h:], ck[:, :h], r2, st)
  diag = _causal(q[:, h:], k[:, h:], v[:, h:], cq[:, h:], ck[:, h:], r3, st)
  o2, l2 = sparse_common.merge_lse([below, diag])
  return jnp.concatenate([o1, o2], axis=1), jnp.concatenate([l1, l2], axis=1)


def hyper_attention(q, k, v, projections, key, *, block_size: int | None = None, sample_size: int | None = None,
                    causal: bool = True, min_seq_len: int | None = None, scale=None, implementation=None,
                    return_lse: bool = False):
  """HyperAttention: sorted-LSH diagonal blocks plus uniformly sampled columns, merged by LSE.

  Args:
    q, k, v: ``[B, Tq, Hq, D]``, ``[B, Tk, Hkv, D]``, ``[B, Tk, Hkv, Dv]``.
    projections: ``[D, r]`` hyperplanes of the angular LSH (e.g. ``jax.random.normal``), ``r <= 30``.
    key: PRNG key of the column samples.
    block_size: queries per sorted block (it must divide every node the recursion cuts); default
      ``min(256, Tq)``.
    sample_size: sampled key columns ``m`` per (batch, head, node), in ``[0, Tk]``; default
      ``min(256, Tk)``.
    causal: causal recursion (``Tq == Tk``) or one non-causal node.
    min_seq_len: nodes of at most this many queries are computed exactly (default
      ``4 * block_size``); ``min_seq_len >= Tq`` gives exact attention.
    scale: logit scale (default ``D ** -0.5``).
    implementation: backend of the exact parts (:func:`attn_jax.attention`).
    return_lse: also return the (approximate) log-sum-exp ``[B, Tq, Hq]``.

  Returns:
    ``[B, Tq, Hq, Dv]`` in the dtype of ``q``.
  """
  block_size = min(256, q.shape[1]) if block_size is None else block_size
  sample_size = min(256, k.shape[1]) if sample_size is None else sample_size
  min_seq_len = 4 * block_size if min_seq_len is None else min_seq_len
  block_size, sample_size, min_seq_len = _check(q, k, v, projections, block_size, sample_size, causal,
                                                min_seq_len, "hyper_attention")
  scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
  st = (block_size, sample_size, min_seq_len, scale, implementation)
  cq, ck = lsh_codes(q, projections), lsh_codes(k, projections)
  out, lse = (_causal if causal else _noncausal)(q, k, v, cq, ck, key, st)
  out = out.astype(q.dtype)
  return (out, lse) if return_lse else out


def _log_weights(cq, ck, rng, st, causal, tq, tk):
  """``[B, Hq, tq, tk]`` log-weights of the pattern (``-inf``: not attended)."""
  block_size, sample_size, min_seq_len = st[:3]
  b, _, hq = cq.shape
  hkv = ck.shape[2]
  if tq <= min_seq_len:
    vis = jnp.tril(jnp.ones((tq, tk), bool)) if causal else jnp.ones((tq, tk), bool)
    return jnp.broadcast_to(jnp.where(vis, 0.0, -jnp.inf), (b, hq, tq, tk))
  if causal:
    h = tq // 2
    r1, r2, r3 = jax.random.split(rng, 3)
    top = _log_weights(cq[:, :h], ck[:, :h], r1, st, True, h, h)
    below = _log_weights(cq[:, h:], ck[:, :h], r2, st, False, h, h)
    diag = _log_weights(cq[:, h:], ck[:, h:], r3, st, True, h, h)
    upper = jnp.concatenate([top, jnp.full(top.shape, -jnp.inf)], axis=-1)
    return jnp.concatenate([upper, jnp.concatenate([below, diag], axis=-1)], axis=-2)
  q_block, k_block, samples = _node_plan(cq, ck, rng, block_size, sample_size)
  head_kv = jnp.arange(hq) // (hq // hkv)
  same = q_block.transpose(0, 2, 1)[..., :, None] == k_block[:, :, head_kv].transpose(0, 2, 1)[..., None, :]
  # Sampled columns outside the query's block: count how often each key was drawn.
  counts = jax.nn.one_hot(samples.transpose(0, 2, 1), tk, dtype=jnp.float32).sum(-2)   # [B, Hq, tk]
  sampled_w = jnp.where(same, 0.0, counts[:, :, None, :] * (tk / max(sample_size, 1)))
  w = jnp.where(same, 1.0, sampled_w)
  return jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)


def hyper_attention_reference(q, k, v, projections, key, *, block_size: int | None = None,
                              sample_size: int | None = None,
                              causal: bool = True, min_seq_len: int | None = None, scale=None):
  """The oracle: the weighted softmax of the same hashes and samples, materialised ``[Tq, Tk]``."""
  block_size = min(256, q.shape[1]) if block_size is None else block_size
  sample_size = min(256, k.shape[1]) if sample_size is None else sample_size
  min_seq_len = 4 * block_size if min_seq_len is None else min_seq_len
  block_size, sample_size, min_seq_len = _check(q, k, v, projections, block_size, sample_size, causal,
                                                min_seq_len, "hyper_attention_reference")
  cq, ck = lsh_codes(q, projections), lsh_codes(k, projections)
  lw = _log_weights(cq, ck, key, (block_size, sample_size, min_seq_len), causal, q.shape[1], k.shape[1])
  out = dense.attention(q, k, v, scale=scale, logits_fn=lambda s: s + lw)
  return out.astype(q.dtype)
