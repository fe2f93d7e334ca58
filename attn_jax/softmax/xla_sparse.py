"""The xla backend for a traced BlockMask: gather, attend, scatter (pure JAX, custom VJP).

The static xla backend loops over one shared list of key blocks per query block. A traced
BlockMask has its own lists per (batch row, head group), so this form gathers instead: for each
query block (``lax.map``) it gathers the ``W`` listed key/value blocks of every (batch, head)
row at once and runs one exact softmax over their ``W * block_kv`` columns, masked by the
entries' validity, the static mask, key padding and segment ids. Work per row is the static
budget ``W`` whatever the count (padding entries cost a masked tile each: the price of static
shapes); kernels loop to the count instead.

Backward (flash-style recomputation from the saved output and LSE): a scan over query blocks
recomputes the probabilities, keeps dQ of the block, and scatter-adds dK/dV of the gathered
blocks into float32 buffers carried by the scan. It walks the forward lists, so it needs no
transposed lists: the compressed-row transposition of the TracedBlockMask serves kernels that
must own their dK/dV blocks (no atomics). Memory: ``O(T * D)`` plus one query block's
``bq x W * block_kv`` tile per (batch, head).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attn_jax import block_mask_traced as traced_lib
from attn_jax import dispatch
from attn_jax.softmax import common


@dataclasses.dataclass(frozen=True)
class _Static:
  spec: common.Spec
  layout: traced_lib.Layout
  list_batch: int   # Bm
  list_heads: int   # Hm
  record_visits: Callable[..., None] | None

  @property
  def group_split(self) -> tuple[int, int]:
    """``(Gm, Gr)``: query heads of a group with distinct lists, and heads sharing each list."""
    s = self.spec
    g = s.group_size
    gm = g if (self.list_heads == s.num_q_heads and s.num_q_heads != s.num_kv_heads) else 1
    return gm, g // gm

  @property
  def has_partial(self) -> bool:
    return self.layout.static_block_mask.num_partial > 0


def attention(q, k, v, sinks, q_segment_ids, kv_segment_ids, *, spec: common.Spec, block_mask, config):
  """Same contract as :func:`attn_jax.softmax.reference.attention`, with a traced BlockMask."""
  lay = block_mask.layout
  traced_lib.check_tile_config("XlaConfig", config, lay)
  dispatch.note("traced_block_mask", block_mask)
  st = _Static(spec, lay, block_mask.num_batch, block_mask.num_heads, config.record_visits)
  lists = (block_mask.kv_indices, block_mask.kv_kinds, block_mask.kv_counts)
  return _sparse(st, q, k, v, sinks, q_segment_ids, kv_segment_ids, lists)


_pad = common.pad_axis


def _internal_queries(x, st: _Static):
  """``[B, Tq, Hq, X] -> [B, Hkv, Gm, Gr, Tq_pad, X]``."""
  s = st.spec
  gm, gr = st.group_split
  b, t, _, d = x.shape
  x = x.reshape(b, t, s.num_kv_heads, gm, gr, d).transpose(0, 2, 3, 4, 1, 5)
  return _pad(x, 4, st.layout.num_q_blocks * st.layout.block_q)


def _internal_rows(x, st: _Static, value):
  """``[B, Tq, Hq] -> [B, Hkv, Gm, Gr, Tq_pad]``."""
  s = st.spec
  gm, gr = st.group_split
  b, t, _ = x.shape
  x = x.reshape(b, t, s.num_kv_heads, gm, gr).transpose(0, 2, 3, 4, 1)
  return _pad(x, 4, st.layout.num_q_blocks * st.layout.block_q, value)


def _internal_blocks(x, st: _Static):
  """``[B, Tk, Hkv, X] -> [B, Hkv, nk, bk, X]``."""
  lay = st.layout
  b, _, h, d = x.shape
  x = _pad(x.transpose(0, 2, 1, 3), 2, lay.num_kv_blocks * lay.block_kv)
  return x.reshape(b, h, lay.num_kv_blocks, lay.block_kv, d)


def _public_queries(x, st: _Static):
  """``[nq, B, Hkv, Gm, Gr, bq, X] -> [B, Tq, Hq, X]``."""
  nq, b, hkv, gm, gr, bq = x.shape[:6]
  rest = x.shape[6:]
  x = x.transpose((1, 0, 5, 2, 3, 4) + tuple(range(6, x.ndim)))
  return x.reshape((b, nq * bq, hkv * gm * gr) + rest)[:, :st.spec.q_len]


def _rows_of_lists(lists, st: _Static, batch: int):
  """``[Bm, Hm, nq, ...]`` lists -> ``[nq, B, Hkv, Gm, ...]`` (broadcast over batch and heads)."""
  s = st.spec
  gm, _ = st.group_split
  out = []
  for a in lists:
    a = traced_lib.expand_heads(a, 1, s.num_q_heads, s.num_kv_heads)       # [Bm, Hkv|1, Gm|1, nq, ...]
    a = jnp.broadcast_to(a, (batch, s.num_kv_heads, gm) + a.shape[3:])
    out.append(jnp.moveaxis(a, 3, 0))
  return out


def _gather_blocks(blocks, idx):
  """``blocks [B, Hkv, nk, bk, X]``, ``idx [B, Hkv, Gm, W]`` -> ``[B, Hkv, Gm, W * bk, X]``."""
  g = jax.vmap(jax.vmap(lambda blk, ix: blk[ix]))(blocks, idx)               # [B, Hkv, Gm, W, bk, X]
  return g.reshape(g.shape[:3] + (-1, g.shape[-1]))


def _scatter_blocks(buffer, idx, values):
  """Adds ``values [B, Hkv, Gm, W * bk, X]`` into ``buffer [B, Hkv, nk, bk, X]`` at ``idx``."""
  bk = buffer.shape[3]
  values = values.reshape(values.shape[:2] + (-1, bk, values.shape[-1]))     # [B, Hkv, Gm * W, bk, X]
  flat = idx.reshape(idx.shape[:2] + (-1,))
  return jax.vmap(jax.vmap(lambda buf, ix, val: buf.at[ix].add(val)))(buffer, flat, values)


def _emit(record, phase, i, idx, kinds, counts, list_batch, list_heads):
  idx, kinds, counts = np.asarray(idx), np.asarray(kinds), np.asarray(counts)
  for b in range(idx.shape[0]):
    for h in range(idx.shape[1]):
      for t in range(int(counts[b, h])):
        record(phase, b if list_batch > 1 else -1, h if list_heads > 1 else -1, int(i), int(idx[b, h, t]),
               bool(kinds[b, h, t] == traced_lib.PARTIAL))


def _record(st: _Static, phase, i, raw_lists):
  """``record_visits`` for the valid entries of row ``i`` of the un-broadcast lists ``[Bm, Hm, nq, W]``."""
  if st.record_visits is None:
    return
  idx, kinds, counts = (lax.dynamic_index_in_dim(a, i, axis=2, keepdims=False) for a in raw_lists)
  jax.debug.callback(functools.partial(_emit, st.record_visits, phase, list_batch=st.list_batch,
                                       list_heads=st.list_heads), i, idx, kinds, counts)


def _visibility(st: _Static, i, idx, counts, q_seg_tile, kv_seg):
  """Boolean visibility broadcastable to ``[B, Hkv, Gm, Gr, bq, W * bk]``."""
  s, lay = st.spec, st.layout
  bq, bk = lay.block_q, lay.block_kv
  w = idx.shape[-1]
  live = jnp.arange(w) < counts[..., None]                                   # [B, Hkv, Gm, W]
  kpos = (idx[..., None] * bk + jnp.arange(bk)).reshape(idx.shape[:3] + (w * bk,))
  live = jnp.repeat(live, bk, axis=-1) & (kpos < s.kv_len)                   # [B, Hkv, Gm, K]
  vis = live[:, :, :, None, None, :]
  if st.has_partial:
    qpos = (i * bq + jnp.arange(bq))[:, None]
    pred = s.mask.evaluate(qpos, kpos[..., None, :], None, s.mask_context, jnp)  # [B, Hkv, Gm, bq, K]
    vis = vis & pred[:, :, :, None]
  if s.has_segments:
    kseg = jax.vmap(lambda seg, pos: seg[pos])(kv_seg, kpos)                 # [B, Hkv, Gm, K]
    vis = vis & (q_seg_tile[:, None, None, None, :, None] == kseg[:, :, :, None, None, :])
  return vis


def _scores(qb, kb, st: _Static):
  raw = jnp.einsum("bhmgqd,bhmkd->bhmgqk", qb, kb, preferred_element_type=jnp.float32) * st.spec.scale
  return common.soft_cap_with_tanh(raw, st.spec.logits_soft_cap)


def _inputs(st: _Static, q, k, v, q_seg, kv_seg):
  lay = st.layout
  qi = _internal_queries(q, st)
  kb, vb = _internal_blocks(k, st), _internal_blocks(v, st)
  if st.spec.has_segments:
    q_seg = _pad(q_seg, 1, qi.shape[4], -1)
    kv_seg = _pad(kv_seg, 1, lay.num_kv_blocks * lay.block_kv, -2)
  return qi, kb, vb, q_seg, kv_seg


def _forward(st: _Static, q, k, v, sinks, q_seg, kv_seg, lists):
  s, lay = st.spec, st.layout
  bq = lay.block_q
  qi, kb_all, vb_all, q_seg, kv_seg = _inputs(st, q, k, v, q_seg, kv_seg)
  rows = _rows_of_lists(lists, st, q.shape[0])
  gm, gr = st.group_split
  sink = None
  if s.has_sinks:
    sink = sinks.astype(jnp.float32).reshape(s.num_kv_heads, gm, gr)[None, :, :, :, None]

  def q_block(args):
    i, idx, kinds, counts = args
    _record(st, "fwd", i, lists)
    qb = lax.dynamic_slice_in_dim(qi, i * bq, bq, axis=4)
    kb, vb = _gather_blocks(kb_all, idx), _gather_blocks(vb_all, idx)
    q_seg_tile = lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1) if s.has_segments else None
    logits, _ = _scores(qb, kb, st)
    vis = _visibility(st, i, idx, counts, q_seg_tile, kv_seg)
    m = jnp.max(jnp.where(vis, logits, common.NEG_INF), axis=-1)
    if sink is not None:
      m = jnp.maximum(m, sink)
    p = jnp.where(vis, jnp.exp(logits - m[..., None]), 0.0)
    l = p.sum(-1)
    if sink is not None:
      l = l + jnp.exp(sink - m)
    acc = jnp.einsum("bhmgqk,bhmkd->bhmgqd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
    positive = l > 0
    safe = jnp.where(positive, l, 1.0)
    return (acc / safe[..., None]).astype(q.dtype), jnp.where(positive, m + jnp.log(safe), -jnp.inf)

  out, lse = lax.map(q_block, (jnp.arange(lay.num_q_blocks), *rows))
  return _public_queries(out, st), _public_queries(lse, st)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse(st: _Static, q, k, v, sinks, q_seg, kv_seg, lists):
  return _forward(st, q, k, v, sinks, q_seg, kv_seg, lists)


def _sparse_fwd(st, q, k, v, sinks, q_seg, kv_seg, lists):
  out, lse = _forward(st, q, k, v, sinks, q_seg, kv_seg, lists)
  return (out, lse), (q, k, v, sinks, q_seg, kv_seg, lists, out, lse)


def _sparse_bwd(st: _Static, residuals, cotangents):
  q, k, v, sinks, q_seg, kv_seg, lists, out, lse = residuals
  d_out, d_lse = cotangents
  s, lay = st.spec, st.layout
  bq = lay.block_q
  # delta_i = dO_i . O_i - dLSE_i, as in the static xla backend.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse
  d_sinks = None
  if s.has_sinks:
    p_sink = jnp.exp(sinks.astype(jnp.float32)[None, None, :] - lse)
    d_sinks = (-(p_sink * delta).sum((0, 1))).astype(sinks.dtype)
  qi, kb_all, vb_all, q_seg, kv_seg = _inputs(st, q, k, v, q_seg, kv_seg)
  doi = _internal_queries(d_out.astype(q.dtype), st)
  # Rows that must contribute nothing (padding, no visible key) get lse = +inf, so p = 0 exactly.
  lse_i = _internal_rows(jnp.where(jnp.isfinite(lse), lse, jnp.inf), st, jnp.inf)
  delta_i = _internal_rows(delta, st, 0.0)
  rows = _rows_of_lists(lists, st, q.shape[0])

  def q_block(carry, args):
    dk_buf, dv_buf = carry
    i, idx, kinds, counts = args
    _record(st, "bwd", i, lists)
    qb = lax.dynamic_slice_in_dim(qi, i * bq, bq, axis=4)
    dob = lax.dynamic_slice_in_dim(doi, i * bq, bq, axis=4)
    lse_b = lax.dynamic_slice_in_dim(lse_i, i * bq, bq, axis=4)
    delta_b = lax.dynamic_slice_in_dim(delta_i, i * bq, bq, axis=4)
    kb, vb = _gather_blocks(kb_all, idx), _gather_blocks(vb_all, idx)
    q_seg_tile = lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1) if s.has_segments else None
    logits, th = _scores(qb, kb, st)
    vis = _visibility(st, i, idx, counts, q_seg_tile, kv_seg)
    p = jnp.where(vis, jnp.exp(logits - lse_b[..., None]), 0.0)
    dv = jnp.einsum("bhmgqk,bhmgqd->bhmkd", p.astype(d_out.dtype), dob, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bhmgqd,bhmkd->bhmgqk", dob, vb, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_b[..., None])
    if th is not None:
      ds = ds * (1.0 - th * th)
    ds = ds * s.scale
    dq = jnp.einsum("bhmgqk,bhmkd->bhmgqd", ds.astype(k.dtype), kb, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bhmgqk,bhmgqd->bhmkd", ds.astype(q.dtype), qb, preferred_element_type=jnp.float32)
    return (_scatter_blocks(dk_buf, idx, dk), _scatter_blocks(dv_buf, idx, dv)), dq

  b = q.shape[0]
  zeros = lambda d: jnp.zeros((b, s.num_kv_heads, lay.num_kv_blocks, lay.block_kv, d), jnp.float32)  # noqa: E731
  (dk, dv), dq = lax.scan(q_block, (zeros(s.head_dim), zeros(s.v_head_dim)),
                          (jnp.arange(lay.num_q_blocks), *rows))
  dq = _public_queries(dq, st).astype(q.dtype)

  def keys_public(x, like):
    bb, h, nk, bk, d = x.shape
    return x.reshape(bb, h, nk * bk, d).transpose(0, 2, 1, 3)[:, :s.kv_len].astype(like.dtype)

  return dq, keys_public(dk, k), keys_public(dv, v), d_sinks, None, None, None


_sparse.defvjp(_sparse_fwd, _sparse_bwd)
