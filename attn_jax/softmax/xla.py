"""Memory-efficient softmax attention in pure JAX, driven by the BlockMask.

Forward: for each query block (``lax.map``), a loop over exactly the non-empty key blocks of its
BlockMask row keeps an online softmax (running max ``m``, normaliser ``l``, accumulator) in
float32. Backward (custom VJP, flash-style recomputation): one scan over key blocks, each looping
over its non-empty query blocks from the transposed lists, accumulating dK/dV locally and dQ into
a float32 buffer carried through the scan. Only the output and the LSE are saved, so memory is
O(seq * block), not O(seq^2).

GQA/MQA: queries are viewed as ``[B, Hkv, G, T, D]`` and contracted against ``[B, Hkv, T, D]``
keys, so K/V are never repeated. The mask predicate is evaluated only on PARTIAL tiles (a
``lax.cond`` on the tile kind); FULL tiles only apply segment ids when given.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attn_jax import block_mask as block_mask_lib
from attn_jax import dispatch
from attn_jax.softmax import common
from attn_jax.softmax import xla_sparse

_DEFAULT_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class XlaConfig:
  """Tunables of the xla backend.

  Attributes:
    block_q, block_kv: tile sizes. ``None`` picks ``min(512, length rounded up to 8)``. Memory
      grows with ``batch * heads * block_q * block_kv``; fewer, larger tiles run faster.
    record_visits: debugging aid, with the signature of the Pallas configs' hook:
      ``f(phase, batch, head, q_block, kv_block, evaluated_mask)`` is called (through
      ``jax.debug.callback``) for every tile the forward (``phase="fwd"``) and backward
      (``"bwd"``) loops visit, with ``evaluated_mask`` True when the predicate was evaluated on
      it. A tile of this backend spans every batch row and head, so ``batch = head = -1``. Tests
      use it to check that exactly the BlockMask's non-empty tiles are visited.
  """

  block_q: int | None = None
  block_kv: int | None = None
  record_visits: Callable[..., None] | None = None

  backend: ClassVar[str] = "xla"

  def __post_init__(self):
    for name in ("block_q", "block_kv"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"XlaConfig.{name} must be a positive int or None, got {value!r}")


def _block(requested: int | None, length: int) -> int:
  return requested if requested is not None else min(_DEFAULT_BLOCK, dispatch.round_up(length, 8))


@dataclasses.dataclass(frozen=True)
class _Static:
  spec: common.Spec
  block_q: int
  block_kv: int
  record_visits: Callable[..., None] | None

  @property
  def block_mask(self) -> block_mask_lib.BlockMask:
    s = self.spec
    bm = block_mask_lib.make_block_mask(s.mask, s.q_len, s.kv_len, self.block_q, self.block_kv,
                                        s.num_q_heads)
    return bm.union_over_heads()


def attention(q, k, v, sinks, q_segment_ids, kv_segment_ids, block_mask=None, *, spec: common.Spec,
              config=None):
  """xla backend: same contract as :func:`attn_jax.softmax.reference.attention`."""
  config = config or XlaConfig()
  if not isinstance(config, XlaConfig):
    raise ValueError(f"config must be an XlaConfig for implementation='xla', got {type(config).__name__}")
  if block_mask is not None:
    # A traced BlockMask has lists per (batch, head group): the gather form serves it.
    return xla_sparse.attention(q, k, v, sinks, q_segment_ids, kv_segment_ids, spec=spec,
                                block_mask=block_mask, config=config)
  static = _Static(spec, _block(config.block_q, spec.q_len), _block(config.block_kv, spec.kv_len),
                   config.record_visits)
  dispatch.note("block_mask", static.block_mask)
  return _flash(static, q, k, v, sinks, q_segment_ids, kv_segment_ids)


_pad_axis = common.pad_axis


def _queries_internal(x, st: _Static):
  """``[B, Tq, Hq, X] -> [B, Hkv, G, Tq_pad, X]``."""
  s = st.spec
  b, t, _, d = x.shape
  x = x.reshape(b, t, s.num_kv_heads, s.group_size, d).transpose(0, 2, 3, 1, 4)
  return _pad_axis(x, 3, dispatch.round_up(t, st.block_q))


def _rows_internal(x, st: _Static, value):
  """``[B, Tq, Hq] -> [B, Hkv, G, Tq_pad]``."""
  s = st.spec
  b, t, _ = x.shape
  x = x.reshape(b, t, s.num_kv_heads, s.group_size).transpose(0, 2, 3, 1)
  return _pad_axis(x, 3, dispatch.round_up(t, st.block_q), value)


def _keys_internal(x, st: _Static):
  """``[B, Tk, Hkv, X] -> [B, Hkv, Tk_pad, X]``."""
  return _pad_axis(x.transpose(0, 2, 1, 3), 2, dispatch.round_up(x.shape[1], st.block_kv))


def _queries_public(x, st: _Static):
  """``[..., B, Hkv, G, bq, X]`` stacked over query blocks ``-> [B, Tq, Hq, X]``."""
  s = st.spec
  nq, b, hkv, g, bq = x.shape[:5]
  rest = x.shape[5:]
  perm = (1, 0, 4, 2, 3) + tuple(range(5, x.ndim))
  x = x.transpose(perm).reshape((b, nq * bq, hkv * g) + rest)
  return x[:, :s.q_len]


def _head_index(st: _Static):
  s = st.spec
  if not s.mask.depends_on_head:
    return None
  h = jnp.arange(s.num_kv_heads)[:, None] * s.group_size + jnp.arange(s.group_size)[None, :]
  return h[:, :, None, None]  # [Hkv, G, 1, 1]


def _tile_visibility(st: _Static, bm, kind, i, j, q_seg_tile, kv_seg_tile, phase):
  """Boolean visibility of tile (i, j), broadcastable to ``[B, Hkv, G, bq, bk]``.

  The predicate is evaluated only when the tile is PARTIAL; the choice is static when every
  visited tile has the same kind.
  """
  s = st.spec
  bq, bk = st.block_q, st.block_kv
  head = _head_index(st)
  shape = (s.num_kv_heads, s.group_size, bq, bk) if head is not None else (bq, bk)

  def evaluate():
    q_idx = i * bq + jnp.arange(bq)[:, None]
    kv_idx = j * bk + jnp.arange(bk)[None, :]
    if st.record_visits is not None:
      jax.debug.callback(st.record_visits, phase, -1, -1, i, j, True)
    return jnp.broadcast_to(common.tile_visibility(s, q_idx, kv_idx, head), shape)

  def skip():
    if st.record_visits is not None:
      jax.debug.callback(st.record_visits, phase, -1, -1, i, j, False)
    return jnp.ones(shape, bool)

  if bm.num_partial == 0:
    visible = skip()
  elif bm.num_full == 0:
    visible = evaluate()
  else:
    visible = lax.cond(kind == block_mask_lib.PARTIAL, evaluate, skip)
  if head is not None:
    visible = visible[None]
  if s.has_segments:
    visible = visible & (q_seg_tile[:, None, None, :, None] == kv_seg_tile[:, None, None, None, :])
  return visible


def _scores(qb, kb, st: _Static):
  """Scaled (and soft-capped) logits ``[B, Hkv, G, bq, bk]`` in float32, plus tanh for the VJP."""
  raw = jnp.einsum("bhgqd,bhkd->bhgqk", qb, kb, preferred_element_type=jnp.float32) * st.spec.scale
  return common.soft_cap_with_tanh(raw, st.spec.logits_soft_cap)


def _lists(ptr, idx, kinds):
  """Sparse rows of the (head-union) BlockMask as device arrays: ``ptr [n + 1]``, ``idx [N]``,
  ``kinds [N]``. An empty mask gets one dummy entry, never read."""
  if len(idx) == 0:
    idx, kinds = np.zeros(1, np.int32), np.zeros(1, np.int32)
  return (jnp.asarray(ptr[0], jnp.int32), jnp.asarray(idx, jnp.int32), jnp.asarray(kinds, jnp.int32))


def _forward(st: _Static, q, k, v, sinks, q_seg, kv_seg):
  s = st.spec
  bm = st.block_mask
  bq, bk = st.block_q, st.block_kv
  b = q.shape[0]
  qi = _queries_internal(q, st)
  ki, vi = _keys_internal(k, st), _keys_internal(v, st)
  if s.has_segments:
    q_seg = _pad_axis(q_seg, 1, qi.shape[3], -1)
    kv_seg = _pad_axis(kv_seg, 1, ki.shape[2], -2)
  kv_ptr, kv_cols, kv_kinds = _lists(bm.kv_ptr, bm.kv_cols, bm.kv_kinds)
  row_shape = (b, s.num_kv_heads, s.group_size, bq)
  if s.has_sinks:
    sink = sinks.astype(jnp.float32).reshape(s.num_kv_heads, s.group_size)[None, :, :, None]
    m0 = jnp.broadcast_to(sink, row_shape)
    # The sink's own term exp(sink - m) starts the normaliser at 1.
    l0 = jnp.ones(row_shape, jnp.float32)
  else:
    m0 = jnp.full(row_shape, common.NEG_INF, jnp.float32)
    l0 = jnp.zeros(row_shape, jnp.float32)
  acc0 = jnp.zeros(row_shape + (s.v_head_dim,), jnp.float32)

  def q_block(i):
    qb = lax.dynamic_slice_in_dim(qi, i * bq, bq, axis=3)
    q_seg_tile = lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1) if s.has_segments else None

    def body(t, carry):
      m, l, acc = carry
      j = kv_cols[t]
      kb = lax.dynamic_slice_in_dim(ki, j * bk, bk, axis=2)
      vb = lax.dynamic_slice_in_dim(vi, j * bk, bk, axis=2)
      kv_seg_tile = lax.dynamic_slice_in_dim(kv_seg, j * bk, bk, axis=1) if s.has_segments else None
      logits, _ = _scores(qb, kb, st)
      visible = _tile_visibility(st, bm, kv_kinds[t], i, j, q_seg_tile, kv_seg_tile, "fwd")
      m_new = jnp.maximum(m, jnp.max(jnp.where(visible, logits, common.NEG_INF), axis=-1))
      alpha = jnp.exp(m - m_new)
      p = jnp.where(visible, jnp.exp(logits - m_new[..., None]), 0.0)
      l = alpha * l + p.sum(-1)
      pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
      return m_new, l, alpha[..., None] * acc + pv

    m, l, acc = lax.fori_loop(kv_ptr[i], kv_ptr[i + 1], body, (m0, l0, acc0))
    positive = l > 0
    safe = jnp.where(positive, l, 1.0)
    out = (acc / safe[..., None]).astype(q.dtype)
    lse = jnp.where(positive, m + jnp.log(safe), -jnp.inf)
    return out, lse

  out, lse = lax.map(q_block, jnp.arange(bm.num_q_blocks))
  return _queries_public(out, st), _queries_public(lse, st)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, sinks, q_seg, kv_seg):
  return _forward(st, q, k, v, sinks, q_seg, kv_seg)


def _flash_fwd(st, q, k, v, sinks, q_seg, kv_seg):
  out, lse = _forward(st, q, k, v, sinks, q_seg, kv_seg)
  return (out, lse), (q, k, v, sinks, q_seg, kv_seg, out, lse)


def _flash_bwd(st: _Static, residuals, cotangents):
  q, k, v, sinks, q_seg, kv_seg, out, lse = residuals
  d_out, d_lse = cotangents
  s = st.spec
  bm = st.block_mask
  bq, bk = st.block_q, st.block_kv

  # delta_i = dO_i . O_i - dLSE_i: the row term of the softmax Jacobian. The LSE cotangent enters
  # the same way as the output's (d lse / d logit_ij = p_ij), with the opposite sign.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse
  d_sinks = None
  if s.has_sinks:
    # d lse_i / d sink_h = p_sink_i, and d out_i / d sink_h = -p_sink_i * out_i, so
    # dsink_h = -sum_i p_sink_i * delta_i over batch and query rows of head h.
    p_sink = jnp.exp(sinks.astype(jnp.float32)[None, None, :] - lse)
    d_sinks = (-(p_sink * delta).sum((0, 1))).astype(sinks.dtype)

  qi = _queries_internal(q, st)
  doi = _queries_internal(d_out, st)
  ki, vi = _keys_internal(k, st), _keys_internal(v, st)
  # Rows that must contribute nothing get lse = +inf so that p = exp(logit - lse) is exactly 0:
  # padded query rows (their dO is 0, but exp(logit) may overflow and 0 * inf is NaN) and rows
  # that saw no key (lse = -inf).
  lse_i = _rows_internal(jnp.where(jnp.isfinite(lse), lse, jnp.inf), st, jnp.inf)
  delta_i = _rows_internal(delta, st, 0.0)
  if s.has_segments:
    q_seg = _pad_axis(q_seg, 1, qi.shape[3], -1)
    kv_seg = _pad_axis(kv_seg, 1, ki.shape[2], -2)
  q_ptr, q_rows, q_kinds = _lists(bm.q_ptr, bm.q_rows, bm.q_kinds)
  b = q.shape[0]

  def kv_block(dq, j):
    kb = lax.dynamic_slice_in_dim(ki, j * bk, bk, axis=2)
    vb = lax.dynamic_slice_in_dim(vi, j * bk, bk, axis=2)
    kv_seg_tile = lax.dynamic_slice_in_dim(kv_seg, j * bk, bk, axis=1) if s.has_segments else None

    def body(t, carry):
      dq, dk, dv = carry
      i = q_rows[t]
      qb = lax.dynamic_slice_in_dim(qi, i * bq, bq, axis=3)
      dob = lax.dynamic_slice_in_dim(doi, i * bq, bq, axis=3)
      lse_b = lax.dynamic_slice_in_dim(lse_i, i * bq, bq, axis=3)
      delta_b = lax.dynamic_slice_in_dim(delta_i, i * bq, bq, axis=3)
      q_seg_tile = lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1) if s.has_segments else None
      logits, th = _scores(qb, kb, st)
      visible = _tile_visibility(st, bm, q_kinds[t], i, j, q_seg_tile, kv_seg_tile, "bwd")
      p = jnp.where(visible, jnp.exp(logits - lse_b[..., None]), 0.0)
      dv = dv + jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(d_out.dtype), dob,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("bhgqd,bhkd->bhgqk", dob, vb, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_b[..., None])
      if th is not None:
        ds = ds * (1.0 - th * th)
      ds = ds * s.scale
      dk = dk + jnp.einsum("bhgqk,bhgqd->bhkd", ds.astype(q.dtype), qb, preferred_element_type=jnp.float32)
      dq_tile = jnp.einsum("bhgqk,bhkd->bhgqd", ds.astype(k.dtype), kb, preferred_element_type=jnp.float32)
      dq = lax.dynamic_update_slice_in_dim(
          dq, lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=3) + dq_tile, i * bq, axis=3)
      return dq, dk, dv

    dk0 = jnp.zeros((b, s.num_kv_heads, bk, s.head_dim), jnp.float32)
    dv0 = jnp.zeros((b, s.num_kv_heads, bk, s.v_head_dim), jnp.float32)
    dq, dk, dv = lax.fori_loop(q_ptr[j], q_ptr[j + 1], body, (dq, dk0, dv0))
    return dq, (dk, dv)

  dq0 = jnp.zeros(qi.shape, jnp.float32)
  dq, (dk, dv) = lax.scan(kv_block, dq0, jnp.arange(bm.num_kv_blocks))
  dq = dq[:, :, :, :s.q_len].transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype)

  def keys_public(x, like):
    nk, b_, h, bk_, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b_, nk * bk_, h, d)[:, :s.kv_len].astype(like.dtype)

  dk = keys_public(dk, k)
  dv = keys_public(dv, v)
  return dq, dk, dv, d_sinks, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
