"""Chunked linear attention for GPU (Pallas, Triton dialect), forward and backward.

Lightning Attention-2's tiling with the chunk loop inside the kernel: the grid
``(B, Hq, V / Vb, K / Kb)`` runs one program per (batch, query head, block of ``Vb`` value
columns, block of ``Kb`` key channels); it walks the ``N`` chunks of its sequence with a
``fori_loop`` that keeps its ``[Kb, Vb]`` float32 slice of the state in registers, computing each
chunk's intra-chunk block (masked, decayed ``C x C``) and inter-chunk term (the state), then
updating the state. The backward pass is two such sweeps: ``dQ`` forwards in time (recomputing
the state) and ``dK/dV`` backwards in time carrying the state gradient, which ends as the
gradient of the initial state. See :mod:`pallas_kernels.linear_common` for the per-chunk math.

Blocks of value columns (as flash-linear-attention does) and of key channels bound what a
program keeps in registers. The state's rows evolve independently (the carry scales rows), and
``dQ`` and ``dK`` are per key channel (with per-channel decays the intra-chunk part too); what
contracts across blocks is summed by the wrapper from float32 partials: ``dQ`` / ``dK`` over the
value blocks, the output and ``dV`` over the key blocks (the intra-chunk scores ``q k^T`` are then
partial sums over the channels of the block).

Registers, as ptxas allocates them: a launch of ``w`` warps lets a thread have ``65536 / (32 w)``
registers, at most 255 (``.reqntid`` in the PTX: 255 for 4 and 8 warps, 128 for 16). When
matmuls feed one another in a loop body, as here, Triton (its AccelerateMatmul pass) gives them
all the warp arrangement of the first, which for a ``[C, C]`` score matmul puts every warp along
the rows; each warp keeps the full operands of its rows. With 16-token chunks, an output with the
chunk dim as rows is then computed whole by every warp: a ``[C, K]`` dQ / dK tile costs
``C K / 32`` float32 registers a thread whatever the warp count, and element-wise tiles combined
with it take its layout. So the backward kernels work feature-major (below), where those outputs
are ``[Kb, C]`` and split among the warps; what stays whole in every warp is the small
``[C, C]`` / ``[C, Vb]`` outputs of matmuls that contract over the key channels, whose operands,
``Kb (C + Vb)`` elements, the key blocks bound.

Layout of the forward kernels: ``q [B, Hq, T, K]``, ``k [B, Hs, T, K]``, ``v [B, Hs, T, V]``
(``T`` a multiple of the chunk, ``K``, ``V`` powers of two >= 16 as Triton tiles require);
per-token vectors ``[B, Hs, T]`` (decay, factors) and ``[B, T]`` (run index). The backward
kernels take ``q``, ``k`` feature-major, ``[B, H, K, T]``, and produce ``dQ``, ``dK`` the same way
(``v``, ``dO``, ``dV`` stay token-major). Query head ``h`` reads state head ``h // group``. State
gradients and ``dK/dV`` are produced per query head; the caller sums each GQA group.

Per-channel decays (GLA gates) take separate kernels, selected statically by the ``carry``
argument: the chunk-local log decay ``b`` and the factors ``qf``, ``kf`` are then
``[B, Hs, T, K]`` (feature-major ``[B, Hs, K, T]`` in the backward pass) and the state carry
``[B, Hs, K, N]`` (one ``[K]`` column per chunk). Each chunk is processed in blocks of
``sub_chunk = 16`` tokens (the smallest ``tl.dot`` tile) with the sub-chunk scheme of
:func:`pallas_kernels.linear_common.channel_block` (its feature-major twin
:func:`channel_block_t` in the backward pass): a static Python loop over the blocks, each
loading its tokens from the refs, and a ``fori_loop`` over the tokens of the diagonal block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import linear_common as lc


def _unpack(refs, has_decay, has_segments, has_factors):
  refs = list(refs)
  out = {name: refs.pop(0) for name in ("q", "k", "v")}
  if has_decay:
    out["b"] = refs.pop(0)
  if has_segments:
    out["r"] = refs.pop(0)
  if has_factors:
    out["qf"], out["kf"] = refs.pop(0), refs.pop(0)
  return out, refs


def _chunk_terms(r, sl, chunk, has_decay, has_segments, has_factors):
  """Decay matrix, factor columns and carry of the chunk at slice ``sl``."""
  idx = jnp.arange(chunk)
  b = r["b"][sl] if has_decay else None
  seg = r["r"][sl] if has_segments else None
  d = lc.decay_matrix(idx[:, None] >= idx[None, :],
                      None if b is None else b[:, None], None if b is None else b[None, :],
                      None if seg is None else seg[:, None], None if seg is None else seg[None, :])
  if not has_factors:
    return d, None, None, None
  qf, kf = r["qf"][sl][:, None], r["kf"][sl][:, None]
  return d, qf, kf, lc.carry_of(qf, idx[:, None])


def linear_fwd_kernel(*refs, chunk, num_chunks, has_decay, has_segments, has_factors):
  r, (s0_ref, o_ref, st_ref) = _unpack(refs, has_decay, has_segments, has_factors)

  def body(c, state):
    sl = pl.ds(c * chunk, chunk)
    d, qf, kf, carry = _chunk_terms(r, sl, chunk, has_decay, has_segments, has_factors)
    o, state = lc.forward_chunk(r["q"][sl, :], r["k"][sl, :], r["v"][sl, :], d, qf, kf, carry, state)
    o_ref[sl, :] = o.astype(o_ref.dtype)
    return state

  st_ref[...] = lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(jnp.float32))


def _chunk_terms_t(r, base, chunk, has_decay, has_segments, has_factors):
  """Backward kernels (feature-major): ``D^T [C, C]`` (rows keys ``j``, columns queries ``i``),
  the factor rows ``qf``, ``kf`` ``[1, C]`` and the carry ``[1, 1]`` of the chunk at ``base``."""
  idx = jnp.arange(chunk)
  sl = pl.ds(base, chunk)
  b = r["b"][sl] if has_decay else None
  seg = r["r"][sl] if has_segments else None
  dt = lc.decay_matrix(idx[None, :] >= idx[:, None],
                       None if b is None else b[None, :], None if b is None else b[:, None],
                       None if seg is None else seg[None, :], None if seg is None else seg[:, None])
  if not has_factors:
    return dt, None, None, None
  qf, kf = r["qf"][sl][None, :], r["kf"][sl][None, :]
  return dt, qf, kf, lc.carry_of(r["qf"][sl][:, None], idx[:, None])


def _times_cols(x, f_row):
  """``x [K, C]`` times the per-token factor row ``f_row [1, C]`` (None means 1), in float32."""
  x = x.astype(jnp.float32)
  return x if f_row is None else x * f_row


def linear_bwd_dq_kernel(*refs, chunk, num_chunks, has_decay, has_segments, has_factors):
  """dQ, forwards in time. Feature-major: ``q``, ``k`` refs are ``[K, T]``, the output ``[K, T]``."""
  r, (do_ref, s0_ref, dq_ref) = _unpack(refs, has_decay, has_segments, has_factors)

  def body(c, state):
    sl = pl.ds(c * chunk, chunk)
    dt, qf, kf, carry = _chunk_terms_t(r, c * chunk, chunk, has_decay, has_segments, has_factors)
    kt, v, do = r["k"][:, sl], r["v"][sl, :], do_ref[sl, :]  # [K, C], [C, Vb], [C, Vb]
    dtype = kt.dtype
    dst = lc.dot(v, do, lc.NT, dtype) * dt  # (dO v^T * D)^T, [C, C]
    dqt = lc.dot(kt, dst, lc.NN, dtype) + _times_cols(lc.dot(state, do, lc.NT, dtype), qf)  # [K, C]
    dq_ref[:, sl] = dqt.astype(dq_ref.dtype)
    if carry is not None:
      state = carry * state
    return state + lc.dot(_times_cols(kt, kf), v, lc.NN, dtype)

  lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(jnp.float32))


def linear_bwd_dkv_kernel(*refs, chunk, num_chunks, has_decay, has_segments, has_factors):
  """dK and dV, backwards in time. Feature-major: ``q``, ``k`` refs ``[K, T]``, ``dk`` ``[K, T]``."""
  r, (do_ref, dst_ref, dk_ref, dv_ref, ds0_ref) = _unpack(refs, has_decay, has_segments, has_factors)

  def body(i, dstate):
    base = (num_chunks - 1 - i) * chunk
    sl = pl.ds(base, chunk)
    dt, qf, kf, carry = _chunk_terms_t(r, base, chunk, has_decay, has_segments, has_factors)
    qt, kt, v, do = r["q"][:, sl], r["k"][:, sl], r["v"][sl, :], do_ref[sl, :]
    dtype = qt.dtype
    scores_t = lc.dot(kt, qt, lc.TN) * dt  # (q k^T * D)^T, [C, C]
    dv = lc.dot(scores_t, do, lc.NN, dtype) + lc.dot(_times_cols(kt, kf), dstate, lc.TN, dtype)  # [C, Vb]
    dv_ref[sl, :] = dv.astype(dv_ref.dtype)
    ds_t = lc.dot(v, do, lc.NT, dtype) * dt  # (dO v^T * D)^T
    dkt = lc.dot(qt, ds_t, lc.NT, dtype) + _times_cols(lc.dot(dstate, v, lc.NT, dtype), kf)  # [K, C]
    dk_ref[:, sl] = dkt.astype(dk_ref.dtype)
    if carry is not None:
      dstate = carry * dstate
    return dstate + lc.dot(_times_cols(qt, qf), do, lc.NN, dtype)

  ds0_ref[...] = lax.fori_loop(0, num_chunks, body, dst_ref[...].astype(jnp.float32))


def _channel_unpack(refs, has_segments):
  refs = list(refs)
  names = ("q", "k", "v", "b") + (("r",) if has_segments else ()) + ("qf", "kf", "carry")
  return {name: refs.pop(0) for name in names}, refs


def _channel_blocks(r, base, chunk, sub, has_segments, queries):
  """Yields ``(start, block slice, mask, index vectors)`` for the row blocks of the chunk at ``base``."""
  rows, rows_all, cols = jnp.arange(sub)[:, None], jnp.arange(chunk)[:, None], jnp.arange(chunk)[None, :]
  r_row = r["r"][pl.ds(base, chunk)][None, :] if has_segments else None
  for start in range(0, chunk, sub):
    blk = pl.ds(base + start, sub)
    r_blk = r["r"][blk][:, None] if has_segments else None
    mask = lc.block_mask(start, rows, cols, queries, r_blk, r_row)
    yield start, blk, mask, dict(rows=rows, rows_all=rows_all, cols=cols)


def _carry(r, c):
  return r["carry"][:, pl.ds(c, 1)]  # [K, 1] of the [K, N] carries


def linear_fwd_channel_kernel(*refs, chunk, sub, num_chunks, has_segments):
  r, (s0_ref, o_ref, st_ref) = _channel_unpack(refs, has_segments)

  def body(c, state):
    sl = pl.ds(c * chunk, chunk)
    dt = r["q"].dtype
    k, b, v = r["k"][sl, :], r["b"][sl, :], r["v"][sl, :]
    for start, blk, mask, idx in _channel_blocks(r, c * chunk, chunk, sub, has_segments, queries=True):
      q_i = r["q"][blk, :]
      a, _ = lc.channel_block(q_i, r["k"][blk, :], r["b"][blk, :], k, b, start=start, queries=True,
                              mask=mask, dtype=dt, **idx)
      o = lc.dot(a, v, lc.NN, dt) + lc.dot(lc.scale_rows(q_i, r["qf"][blk, :]), state, lc.NN, dt)
      o_ref[blk, :] = o.astype(o_ref.dtype)
    return _carry(r, c) * state + lc.dot(lc.scale_rows(k, r["kf"][sl, :]), v, lc.TN, dt)

  st_ref[...] = lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(jnp.float32))


def _block_mask_t(start, rows_all, cols, queries, r_all=None, r_blk=None):
  """``[C, c]`` mask of the sub-chunk at offset ``start``, rows over the whole chunk: causal and
  same run.

  ``queries``: the block's columns are queries ``i`` and the rows keys ``j <= i``; else the
  block's columns are keys ``j`` and the rows queries ``i >= j``. ``rows_all`` ``[C, 1]`` and
  ``cols`` ``[1, c]`` are index vectors; ``r_all`` ``[C, 1]`` and ``r_blk`` ``[1, c]`` run indices.
  """
  shape = (rows_all.shape[0], cols.shape[1])
  rows, cols = lc._full(rows_all, shape), lc._full(cols + start, shape)
  mask = (cols >= rows) if queries else (rows >= cols)
  if r_all is not None:
    mask = mask & (lc._full(r_all, shape) == lc._full(r_blk, shape))
  return mask


def channel_block_t(xt, yt, bt_blk, yt_all, bt_all, *, start, queries, grad_t, rows_all, cols,
                    dtype, scores=True):
  """Feature-major twin of :func:`pallas_kernels.linear_common.channel_block` (backward kernels).

  Args:
    xt: ``[K, c]`` the block's own columns (keys of sub-chunk ``J``; unused for query blocks);
      yt: ``[K, c]`` the other side in the same sub-chunk (keys of ``I`` for a query block, queries
      of ``J`` for a key block); bt_blk: ``[K, c]`` float32 cumulative log decay of the block.
    yt_all, bt_all: ``[K, C]`` the other side and the log decay over the whole chunk.
    start: static offset of the block; queries: whether the block's columns are queries.
    grad_t: ``[C, c]`` float32 masked score gradient, rows over the chunk (``v dO_I^T`` for a
      query block, ``dO v_J^T`` for a key block).
    rows_all, cols: int32 index vectors ``[C, 1]`` and ``[1, c]``.
    dtype: matmul operand dtype.
    scores: key blocks only: also return ``A[:, J]`` ``[C, c]`` (rows queries), unmasked.

  Returns:
    ``(scores [C, c] float32 or None, d [K, c] float32)``: ``d`` is the intra-chunk part of
    ``dq^T`` (query blocks) or ``dk^T`` (key blocks). Every tile is feature-major (``K`` rows) or
    ``[C, c]``, so each matmul output has the large dim along rows, which Triton splits among
    the warps; a ``[c, K]`` output would be held whole by every warp.
  """
  c, chunk = yt.shape[1], yt_all.shape[1]
  yt = yt.astype(jnp.float32)
  xt = None if xt is None else xt.astype(jnp.float32)
  cols_all = rows_all.T
  out_s = out_d = None
  # Off-diagonal sub-chunks through the reference column p, both factors <= 1.
  if queries:
    has_off = start > 0
    if has_off:
      p = lc.pick_col(bt_blk, 0, cols)  # [K, 1]
      x_fac = jnp.exp(bt_blk - p)
      y_dec = yt_all.astype(jnp.float32) * lc.masked_exp(lc._full(cols_all, bt_all.shape) < start, p - bt_all)
  else:
    has_off = start + c < chunk
    if has_off:
      p = lc.pick_col(bt_blk, c - 1, cols)
      x_fac = jnp.exp(p - bt_blk)
      y_dec = yt_all.astype(jnp.float32) * lc.masked_exp(lc._full(cols_all, bt_all.shape) >= start + c,
                                                         bt_all - p)
  if has_off:
    if scores and not queries:
      out_s = lc.dot(y_dec, xt * x_fac, lc.TN, dtype)  # [C, c]
    out_d = lc.dot(y_dec, grad_t, lc.NN, dtype) * x_fac  # [K, c]
  if out_s is None and scores and not queries:
    out_s = jnp.zeros((chunk, c), jnp.float32)
  if out_d is None:
    out_d = jnp.zeros(yt.shape, jnp.float32)

  # The diagonal sub-chunk, one token m of the block (a column) per step.
  def body(m, carry):
    acc_s, acc_d = carry
    y_m, b_m = lc.pick_col(yt, m, cols), lc.pick_col(bt_blk, m, cols)  # [K, 1]
    if queries:
      e = lc.masked_exp(lc._full(cols, bt_blk.shape) >= m, bt_blk - b_m)  # exp(b_i - b_m), i >= m
    else:
      e = lc.masked_exp(lc._full(cols, bt_blk.shape) <= m, b_m - bt_blk)  # exp(b_m - b_j), j <= m
    ye = y_m * e  # [K, c]
    if acc_s is not None:
      row = jnp.sum(xt * ye, axis=0, keepdims=True)  # A[start + m, J], [1, c]
      acc_s = acc_s + jnp.where(lc._full(rows_all, acc_s.shape) == start + m, row, 0.0)
    acc_d = acc_d + lc.pick_row(grad_t, start + m, rows_all) * ye
    return acc_s, acc_d

  return lax.fori_loop(0, c, body, (out_s, out_d))


def _channel_blocks_t(r, base, chunk, sub, has_segments, queries):
  """Yields ``(start, block slice, mask [C, c], index vectors)`` for the sub-chunks of the chunk at
  ``base`` (feature-major backward kernels)."""
  rows_all, cols = jnp.arange(chunk)[:, None], jnp.arange(sub)[None, :]
  r_all = r["r"][pl.ds(base, chunk)][:, None] if has_segments else None
  for start in range(0, chunk, sub):
    blk = pl.ds(base + start, sub)
    r_blk = r["r"][blk][None, :] if has_segments else None
    mask = _block_mask_t(start, rows_all, cols, queries, r_all, r_blk)
    yield start, blk, mask, dict(rows_all=rows_all, cols=cols)


def linear_bwd_dq_channel_kernel(*refs, chunk, sub, num_chunks, has_segments):
  """dQ, per-channel decays, forwards in time; ``q``, ``k``, ``b``, ``qf``, ``kf`` refs and the
  output are feature-major ``[K, T]``."""
  r, (do_ref, s0_ref, dq_ref) = _channel_unpack(refs, has_segments)

  def body(c, state):
    sl = pl.ds(c * chunk, chunk)
    dt = r["k"].dtype
    kt, bt, v = r["k"][:, sl], r["b"][:, sl], r["v"][sl, :]
    for start, blk, mask, idx in _channel_blocks_t(r, c * chunk, chunk, sub, has_segments, queries=True):
      do_i = do_ref[blk, :]
      grad_t = jnp.where(mask, lc.dot(v, do_i, lc.NT, dt), 0.0)  # [C, c]
      _, dqt = channel_block_t(None, r["k"][:, blk], r["b"][:, blk], kt, bt, start=start, queries=True,
                               grad_t=grad_t, dtype=dt, scores=False, **idx)
      dq_ref[:, blk] = (dqt + lc.dot(state, do_i, lc.NT, dt) * r["qf"][:, blk]).astype(dq_ref.dtype)
    return _carry(r, c) * state + lc.dot(kt.astype(jnp.float32) * r["kf"][:, sl], v, lc.NN, dt)

  lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(jnp.float32))


def linear_bwd_dkv_channel_kernel(*refs, chunk, sub, num_chunks, has_segments):
  """dK and dV, per-channel decays, backwards in time; ``q``, ``k``, ``b``, ``qf``, ``kf`` refs and
  ``dk`` are feature-major ``[K, T]``."""
  r, (do_ref, dst_ref, dk_ref, dv_ref, ds0_ref) = _channel_unpack(refs, has_segments)

  def body(i, dstate):
    c = num_chunks - 1 - i
    sl = pl.ds(c * chunk, chunk)
    dt = r["q"].dtype
    qt, bt, do = r["q"][:, sl], r["b"][:, sl], do_ref[sl, :]
    for start, blk, mask, idx in _channel_blocks_t(r, c * chunk, chunk, sub, has_segments, queries=False):
      kt_j, v_j, kft_j = r["k"][:, blk], r["v"][blk, :], r["kf"][:, blk]
      grad_t = jnp.where(mask, lc.dot(do, v_j, lc.NT, dt), 0.0)  # [C, c]
      a, dkt = channel_block_t(kt_j, r["q"][:, blk], r["b"][:, blk], qt, bt, start=start, queries=False,
                               grad_t=grad_t, dtype=dt, **idx)
      dk_ref[:, blk] = (dkt + lc.dot(dstate, v_j, lc.NT, dt) * kft_j).astype(dk_ref.dtype)
      a = jnp.where(mask, a, 0.0)  # A[:, J], rows queries
      dv = lc.dot(a, do, lc.TN, dt) + lc.dot(kt_j.astype(jnp.float32) * kft_j, dstate, lc.TN, dt)
      dv_ref[blk, :] = dv.astype(dv_ref.dtype)
    return _carry(r, c) * dstate + lc.dot(qt.astype(jnp.float32) * r["qf"][:, sl], do, lc.NN, dt)

  ds0_ref[...] = lax.fori_loop(0, num_chunks, body, dst_ref[...].astype(jnp.float32))


def _in_specs(t, kb, vb, group, num_chunks, *, feature_major, channel, has_decay, has_segments,
              has_factors):
  """Input specs over the grid ``(B, Hq, V / Vb, K / Kb)``: ``[T, Kb]`` tiles of q, k (and of the
  per-channel ``b``, ``qf``, ``kf``), or ``[Kb, T]`` when ``feature_major``; ``[T, Vb]`` of v; the
  per-channel carry as ``[Kb, N]``."""
  tile = (None, None, kb, t) if feature_major else (None, None, t, kb)
  at = (lambda b, h, i: (b, h, i, 0)) if feature_major else (lambda b, h, i: (b, h, 0, i))
  q_spec = pl.BlockSpec(tile, lambda b, h, j, i: at(b, h, i))
  keys = pl.BlockSpec(tile, lambda b, h, j, i: at(b, lax.div(h, group), i))
  specs = [q_spec, keys, pl.BlockSpec((None, None, t, vb), lambda b, h, j, i: (b, lax.div(h, group), 0, j))]
  vec = pl.BlockSpec((None, None, t), lambda b, h, j, i: (b, lax.div(h, group), 0))
  runs = pl.BlockSpec((None, t), lambda b, h, j, i: (b, 0))
  if channel:
    specs.append(keys)
    if has_segments:
      specs.append(runs)
    return specs + [keys, keys, pl.BlockSpec((None, None, kb, num_chunks), lambda b, h, j, i: (b, lax.div(h, group), i, 0))]
  if has_decay:
    specs.append(vec)
  if has_segments:
    specs.append(runs)
  if has_factors:
    specs += [vec, vec]
  return specs


def _sub_chunk(chunk, sub_chunk):
  sub = sub_chunk or 16
  if sub < 16 or sub & (sub - 1) or chunk % sub:
    raise ValueError(f"sub_chunk must be a power of two >= 16 dividing the chunk ({chunk}), got {sub}")
  return sub


def _params(num_warps, num_stages, kd, vd):
  if num_warps is None:
    num_warps = 4 if max(kd, vd) <= 64 else 8
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages or 1)


def _value_block(vd, block_v):
  vb = block_v or vd
  if vb < 16 or vb & (vb - 1) or vd % vb:
    raise ValueError(f"block_v must be a power of two >= 16 dividing the value dim ({vd}), got {block_v}")
  return vb


def _key_block(kd, block_k):
  kb = block_k or kd
  if kb < 16 or kb & (kb - 1) or kd % kb:
    raise ValueError(f"block_k must be a power of two >= 16 dividing the key dim ({kd}), got {block_k}")
  return kb


def _setup(q, k, v, b, r, qf, kf, carry, *, chunk, sub_chunk, block_v, block_k, feature_major):
  """Kernel flags, extra arrays, input specs and sizes shared by the forward and backward calls."""
  t, kd = (q.shape[3], q.shape[2]) if feature_major else (q.shape[2], q.shape[3])
  vd = v.shape[3]
  group = q.shape[1] // k.shape[1]
  vb, kb = _value_block(vd, block_v), _key_block(kd, block_k)
  channel = carry is not None
  if channel:
    flags = dict(sub=_sub_chunk(chunk, sub_chunk), has_segments=r is not None)
    arrays = [x for x in (b, r, qf, kf, carry) if x is not None]
  else:
    flags = dict(has_decay=b is not None, has_segments=r is not None, has_factors=qf is not None)
    arrays = [x for x in (b, r, qf, kf) if x is not None]
  specs = _in_specs(t, kb, vb, group, t // chunk, feature_major=feature_major, channel=channel,
                    has_decay=b is not None, has_segments=r is not None, has_factors=qf is not None)
  grid = (q.shape[0], q.shape[1], vd // vb, kd // kb)
  return flags, arrays, specs, dict(t=t, kd=kd, vd=vd, vb=vb, kb=kb, group=group, grid=grid)


def forward(q, k, v, s0, *, b=None, r=None, qf=None, kf=None, carry=None, chunk: int, out_dtype,
            sub_chunk: int | None = None, block_v: int | None = None, block_k: int | None = None,
            num_warps=None, num_stages=None, interpret: bool = False):
  """Forward pass. Returns ``(o [B, Hq, T, V] out_dtype, final state [B, Hq, K, V] float32)``.

  Args:
    q: ``[B, Hq, T, K]``; k: ``[B, Hs, T, K]``; v: ``[B, Hs, T, V]``; s0: ``[B, Hs, K, V]`` f32.
    b: ``[B, Hs, T]`` chunk-local cumulative log decay; r: ``[B, T]`` int32 run index;
    qf, kf: ``[B, Hs, T]`` float32 query / key factors (see linear_common).
    carry: per-channel decays only: ``[B, Hs, K, N]`` float32 state carry of each chunk; ``b``,
      ``qf`` and ``kf`` are then ``[B, Hs, T, K]``.
    sub_chunk: per-channel decays: rows per block, a power of two >= 16 dividing the chunk
      (default 16).
    block_v: value columns per program, a power of two >= 16 dividing ``V`` (default ``V``).
    block_k: key channels per program, a power of two >= 16 dividing ``K`` (default ``K``). The
      output contracts over the key channels: with more than one block, each program writes a
      float32 partial output and they are summed here.

  The grid is ``(B, Hq, V / block_v, K / block_k)``; a program keeps a ``[block_k, block_v]``
  float32 slice of the state in registers.
  """
  flags, arrays, in_specs, z = _setup(q, k, v, b, r, qf, kf, carry, chunk=chunk, sub_chunk=sub_chunk,
                                      block_v=block_v, block_k=block_k, feature_major=False)
  bsz, hq, t, kd, vd, kb, vb, group = *q.shape[:2], z["t"], z["kd"], z["vd"], z["kb"], z["vb"], z["group"]
  nk = kd // kb
  kernel = linear_fwd_channel_kernel if carry is not None else linear_fwd_kernel
  if nk == 1:
    out_spec = pl.BlockSpec((None, None, t, vb), lambda b, h, j, i: (b, h, 0, j))
    out_shape = jax.ShapeDtypeStruct((bsz, hq, t, vd), out_dtype)
  else:
    out_spec = pl.BlockSpec((None, None, None, t, vb), lambda b, h, j, i: (i, b, h, 0, j))
    out_shape = jax.ShapeDtypeStruct((nk, bsz, hq, t, vd), jnp.float32)
  o, state = pl.pallas_call(
      functools.partial(kernel, chunk=chunk, num_chunks=t // chunk, **flags),
      grid=z["grid"],
      in_specs=in_specs + [pl.BlockSpec((None, None, kb, vb), lambda b, h, j, i: (b, lax.div(h, group), i, j))],
      out_specs=[out_spec, pl.BlockSpec((None, None, kb, vb), lambda b, h, j, i: (b, h, i, j))],
      out_shape=[out_shape, jax.ShapeDtypeStruct((bsz, hq, kd, vd), jnp.float32)],
      compiler_params=_params(num_warps, num_stages, kb, vb),
      interpret=interpret,
      name="linear_fwd_channel" if carry is not None else "linear_fwd",
  )(q, k, v, *arrays, s0)
  return (o if nk == 1 else o.sum(0).astype(out_dtype)), state


def backward(q, k, v, s0, do, dst, *, b=None, r=None, qf=None, kf=None, carry=None, chunk: int,
             sub_chunk: int | None = None, block_v: int | None = None, block_k: int | None = None,
             num_warps=None, num_stages=None, dkv_num_warps=None, dkv_num_stages=None,
             interpret: bool = False):
  """Backward pass: ``(dq [B, Hq, K, T], dk [B, Hq, K, T], dv [B, Hq, T, V], ds0 [B, Hq, K, V])``.

  Feature-major: ``q [B, Hq, K, T]`` and ``k [B, Hs, K, T]`` (per-channel decays: ``b``, ``qf``
  and ``kf`` ``[B, Hs, K, T]`` too, and the carry ``[B, Hs, K, N]``), and ``dq``, ``dk`` come
  back the same way; ``v``, ``do [B, Hq, T, V]`` and ``dv`` stay token-major. Every matmul whose
  output has the key dim then produces it as ``[K, C]`` rather than ``[C, K]``: Triton splits an
  output's rows among the warps, so a ``[C, K]`` tile of a 16-token chunk would be held whole by
  every warp (see the module doc).

  The grid is ``(B, Hq, V / block_v, K / block_k)``: a program keeps a ``[block_k, block_v]``
  slice of the state (gradient). The state's rows evolve independently, and so do dQ and dK
  per key channel; dQ / dK contract over the value columns and dV over the key channels, so
  each program writes a partial sum of those and they are added here.

  ``do`` is the output gradient and ``dst [B, Hq, K, V]`` the final-state gradient per query head.
  ``dk``, ``dv`` and ``ds0`` are per query head; all gradients are float32. ``block_k``: key
  channels per program, a power of two >= 16 dividing ``K`` (default ``K``); the other arguments
  are those of :func:`forward`; ``num_warps`` / ``num_stages`` launch the dQ kernel,
  ``dkv_num_warps`` / ``dkv_num_stages`` (default: the same) the dK/dV kernel.
  """
  flags, arrays, specs, z = _setup(q, k, v, b, r, qf, kf, carry, chunk=chunk, sub_chunk=sub_chunk,
                                   block_v=block_v, block_k=block_k, feature_major=True)
  bsz, hq, t, kd, vd, kb, vb, group = *q.shape[:2], z["t"], z["kd"], z["vd"], z["kb"], z["vb"], z["group"]
  n, nv, nk, grid = t // chunk, vd // vb, kd // kb, z["grid"]
  channel = carry is not None
  kernels = ((linear_bwd_dq_channel_kernel, linear_bwd_dkv_channel_kernel) if channel else
             (linear_bwd_dq_kernel, linear_bwd_dkv_kernel))
  suffix = "_channel" if channel else ""
  values = pl.BlockSpec((None, None, t, vb), lambda b, h, j, i: (b, h, 0, j))
  # dQ and dK contract over the value columns, dV over the key channels: partial sums.
  partial_keys = pl.BlockSpec((None, None, None, kb, t), lambda b, h, j, i: (j, b, h, i, 0))
  partial_values = pl.BlockSpec((None, None, None, t, vb), lambda b, h, j, i: (i, b, h, 0, j))
  head_state = pl.BlockSpec((None, None, kb, vb), lambda b, h, j, i: (b, h, i, j))
  dq = pl.pallas_call(
      functools.partial(kernels[0], chunk=chunk, num_chunks=n, **flags),
      grid=grid,
      in_specs=specs + [values, pl.BlockSpec((None, None, kb, vb), lambda b, h, j, i: (b, lax.div(h, group), i, j))],
      out_specs=partial_keys,
      out_shape=jax.ShapeDtypeStruct((nv, bsz, hq, kd, t), jnp.float32),
      compiler_params=_params(num_warps, num_stages, kb, vb),
      interpret=interpret,
      name="linear_bwd_dq" + suffix,
  )(q, k, v, *arrays, do, s0)
  dk, dv, ds0 = pl.pallas_call(
      functools.partial(kernels[1], chunk=chunk, num_chunks=n, **flags),
      grid=grid,
      in_specs=specs + [values, head_state],
      out_specs=[partial_keys, partial_values, head_state],
      out_shape=[jax.ShapeDtypeStruct((nv, bsz, hq, kd, t), jnp.float32),
                 jax.ShapeDtypeStruct((nk, bsz, hq, t, vd), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, hq, kd, vd), jnp.float32)],
      compiler_params=_params(dkv_num_warps or num_warps, dkv_num_stages or num_stages, kb, vb),
      interpret=interpret,
      name="linear_bwd_dkv" + suffix,
  )(q, k, v, *arrays, do, dst)
  return dq.sum(0), dk.sum(0), dv.sum(0), ds0
