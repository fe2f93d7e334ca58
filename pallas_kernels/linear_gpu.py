"""Chunked linear attention for GPU (Pallas, Triton dialect), forward and backward.

Lightning Attention-2's tiling with the chunk loop inside the kernel: the grid ``(B, Hq, V / Vb)``
runs one program per (batch, query head, block of ``Vb`` value columns); it walks the ``N``
chunks of its sequence with a ``fori_loop`` that keeps its ``[K, Vb]`` float32 slice of the state
in registers, computing each chunk's intra-chunk
block (masked, decayed ``C x C``) and inter-chunk term (the state), then updating the state. The
backward pass is two such sweeps: ``dQ`` forwards in time (recomputing the state) and ``dK/dV``
backwards in time carrying the state gradient, which ends as the gradient of the initial state.
See :mod:`pallas_kernels.linear_common` for the per-chunk math.

Splitting the value columns (as flash-linear-attention does) bounds what a program keeps in
registers: the state slice, and in the backward pass its gradient, are ``K x Vb`` rather than
``K x V``, which is what lets head dim 128 compile without register spills. Every column block is
independent, except that ``dQ`` and ``dK`` contract over the value columns: each program writes its
partial ``dQ`` / ``dK`` and the wrapper sums them (``[V / Vb, ...]`` float32). The intra-chunk
scores are recomputed per column block.

Layout: ``q [B, Hq, T, K]``, ``k [B, Hs, T, K]``, ``v [B, Hs, T, V]`` (``T`` a multiple of the
chunk, ``K``, ``V`` powers of two >= 16 as Triton tiles require); per-token vectors
``[B, Hs, T]`` (decay, factors) and ``[B, T]`` (run index). Query head ``h`` reads state head
``h // group``. State gradients and ``dK/dV`` are produced per query head; the caller sums each
GQA group.

Per-channel decays (GLA gates) take separate kernels, selected statically by the ``carry``
argument: the chunk-local log decay ``b`` and the factors ``qf``, ``kf`` are then
``[B, Hs, T, K]`` and the state carry ``[B, Hs, N * K]`` (one ``[K]`` column per chunk). Each
chunk is processed in row blocks of ``sub_chunk = 16`` tokens (the smallest ``tl.dot`` tile) with
the sub-chunk scheme of :func:`pallas_kernels.linear_common.channel_block`: a static Python loop
over the blocks, each loading its rows from the refs, and a ``fori_loop`` over the tokens of the
diagonal block.
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


def linear_bwd_dq_kernel(*refs, chunk, num_chunks, has_decay, has_segments, has_factors):
  r, (do_ref, s0_ref, dq_ref) = _unpack(refs, has_decay, has_segments, has_factors)

  def body(c, state):
    sl = pl.ds(c * chunk, chunk)
    d, qf, kf, carry = _chunk_terms(r, sl, chunk, has_decay, has_segments, has_factors)
    k, v = r["k"][sl, :], r["v"][sl, :]
    dq_ref[sl, :] = lc.dq_chunk(do_ref[sl, :], k, v, d, qf, state).astype(dq_ref.dtype)
    if carry is not None:
      state = carry * state
    return state + lc.dot(lc.scale_rows(k, kf), v, lc.TN, k.dtype)

  lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(jnp.float32))


def linear_bwd_dkv_kernel(*refs, chunk, num_chunks, has_decay, has_segments, has_factors):
  r, (do_ref, dst_ref, dk_ref, dv_ref, ds0_ref) = _unpack(refs, has_decay, has_segments, has_factors)

  def body(i, dstate):
    sl = pl.ds((num_chunks - 1 - i) * chunk, chunk)
    d, qf, kf, carry = _chunk_terms(r, sl, chunk, has_decay, has_segments, has_factors)
    q, do = r["q"][sl, :], do_ref[sl, :]
    dk, dv = lc.dkv_chunk(q, r["k"][sl, :], r["v"][sl, :], do, d, kf, dstate)
    dk_ref[sl, :] = dk.astype(dk_ref.dtype)
    dv_ref[sl, :] = dv.astype(dv_ref.dtype)
    return lc.dstate_chunk(q, do, qf, carry, dstate)

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


def _carry(r, c, kd):
  return r["carry"][pl.ds(c * kd, kd)][:, None]  # [K, 1]


def linear_fwd_channel_kernel(*refs, chunk, sub, num_chunks, has_segments):
  r, (s0_ref, o_ref, st_ref) = _channel_unpack(refs, has_segments)
  kd = r["q"].shape[-1]

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
    return _carry(r, c, kd) * state + lc.dot(lc.scale_rows(k, r["kf"][sl, :]), v, lc.TN, dt)

  st_ref[...] = lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(jnp.float32))


def linear_bwd_dq_channel_kernel(*refs, chunk, sub, num_chunks, has_segments):
  r, (do_ref, s0_ref, dq_ref) = _channel_unpack(refs, has_segments)
  kd = r["q"].shape[-1]

  def body(c, state):
    sl = pl.ds(c * chunk, chunk)
    dt = r["k"].dtype
    k, b, v = r["k"][sl, :], r["b"][sl, :], r["v"][sl, :]
    for start, blk, mask, idx in _channel_blocks(r, c * chunk, chunk, sub, has_segments, queries=True):
      do_i = do_ref[blk, :]
      grad = jnp.where(mask, lc.dot(do_i, v, lc.NT, dt), 0.0)
      _, dq = lc.channel_block(None, r["k"][blk, :], r["b"][blk, :], k, b, start=start, queries=True,
                               mask=mask, dtype=dt, grad=grad, scores=False, **idx)
      dq_ref[blk, :] = (dq + lc.dot(do_i, state, lc.NT, dt) * r["qf"][blk, :]).astype(dq_ref.dtype)
    return _carry(r, c, kd) * state + lc.dot(lc.scale_rows(k, r["kf"][sl, :]), v, lc.TN, dt)

  lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(jnp.float32))


def linear_bwd_dkv_channel_kernel(*refs, chunk, sub, num_chunks, has_segments):
  r, (do_ref, dst_ref, dk_ref, dv_ref, ds0_ref) = _channel_unpack(refs, has_segments)
  kd = r["q"].shape[-1]

  def body(i, dstate):
    c = num_chunks - 1 - i
    sl = pl.ds(c * chunk, chunk)
    dt = r["q"].dtype
    q, b, do = r["q"][sl, :], r["b"][sl, :], do_ref[sl, :]
    for start, blk, mask, idx in _channel_blocks(r, c * chunk, chunk, sub, has_segments, queries=False):
      k_j, v_j, kf_j = r["k"][blk, :], r["v"][blk, :], r["kf"][blk, :]
      grad = jnp.where(mask, lc.dot(v_j, do, lc.NT, dt), 0.0)
      at, dk = lc.channel_block(k_j, r["q"][blk, :], r["b"][blk, :], q, b, start=start, queries=False,
                                mask=mask, dtype=dt, grad=grad, **idx)
      dk_ref[blk, :] = (dk + lc.dot(v_j, dstate, lc.NT, dt) * kf_j).astype(dk_ref.dtype)
      dv = lc.dot(at, do, lc.NN, dt) + lc.dot(lc.scale_rows(k_j, kf_j), dstate, lc.NN, dt)
      dv_ref[blk, :] = dv.astype(dv_ref.dtype)
    return _carry(r, c, kd) * dstate + lc.dot(lc.scale_rows(q, r["qf"][sl, :]), do, lc.TN, dt)

  ds0_ref[...] = lax.fori_loop(0, num_chunks, body, dst_ref[...].astype(jnp.float32))


def _channel_in_specs(shape, group, num_chunks, has_segments, vb):
  t, kd, _ = shape
  kv = lambda b, h, j: (b, lax.div(h, group), 0, 0)
  specs = [pl.BlockSpec((None, None, t, kd), lambda b, h, j: (b, h, 0, 0)),
           pl.BlockSpec((None, None, t, kd), kv),
           pl.BlockSpec((None, None, t, vb), lambda b, h, j: (b, lax.div(h, group), 0, j)),
           pl.BlockSpec((None, None, t, kd), kv)]
  if has_segments:
    specs.append(pl.BlockSpec((None, t), lambda b, h, j: (b, 0)))
  specs += [pl.BlockSpec((None, None, t, kd), kv), pl.BlockSpec((None, None, t, kd), kv),
            pl.BlockSpec((None, None, num_chunks * kd), lambda b, h, j: (b, lax.div(h, group), 0))]
  return specs


def _in_specs(shape, group, has_decay, has_segments, has_factors, vb):
  t, kd, _ = shape
  kv = lambda b, h, j: (b, lax.div(h, group), 0, 0)
  specs = [pl.BlockSpec((None, None, t, kd), lambda b, h, j: (b, h, 0, 0)),
           pl.BlockSpec((None, None, t, kd), kv),
           pl.BlockSpec((None, None, t, vb), lambda b, h, j: (b, lax.div(h, group), 0, j))]
  vec = pl.BlockSpec((None, None, t), lambda b, h, j: (b, lax.div(h, group), 0))
  if has_decay:
    specs.append(vec)
  if has_segments:
    specs.append(pl.BlockSpec((None, t), lambda b, h, j: (b, 0)))
  if has_factors:
    specs += [vec, vec]
  return specs


def _extras(b, r, qf, kf):
  flags = dict(has_decay=b is not None, has_segments=r is not None, has_factors=qf is not None)
  arrays = [x for x in (b, r, qf, kf) if x is not None]
  return arrays, flags


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


def _setup(q, k, v, b, r, qf, kf, carry, chunk, sub_chunk, block_v):
  """Kernel flags, extra arrays and input specs shared by the forward and backward calls."""
  t, kd, vd = q.shape[2], q.shape[3], v.shape[3]
  group = q.shape[1] // k.shape[1]
  vb = _value_block(vd, block_v)
  if carry is not None:
    flags = dict(sub=_sub_chunk(chunk, sub_chunk), has_segments=r is not None)
    specs = _channel_in_specs((t, kd, vd), group, t // chunk, r is not None, vb)
    arrays = [x for x in (b, r, qf, kf, carry) if x is not None]
  else:
    arrays, flags = _extras(b, r, qf, kf)
    specs = _in_specs((t, kd, vd), group, vb=vb, **flags)
  return flags, arrays, specs, vb


def forward(q, k, v, s0, *, b=None, r=None, qf=None, kf=None, carry=None, chunk: int, out_dtype,
            sub_chunk: int | None = None, block_v: int | None = None, num_warps=None, num_stages=None,
            interpret: bool = False):
  """Forward pass. Returns ``(o [B, Hq, T, V] out_dtype, final state [B, Hq, K, V] float32)``.

  Args:
    q: ``[B, Hq, T, K]``; k: ``[B, Hs, T, K]``; v: ``[B, Hs, T, V]``; s0: ``[B, Hs, K, V]`` f32.
    b: ``[B, Hs, T]`` chunk-local cumulative log decay; r: ``[B, T]`` int32 run index;
    qf, kf: ``[B, Hs, T]`` float32 query / key factors (see linear_common).
    carry: per-channel decays only: ``[B, Hs, N * K]`` float32 state carry of each chunk; ``b``,
      ``qf`` and ``kf`` are then ``[B, Hs, T, K]``.
    sub_chunk: per-channel decays: rows per block, a power of two >= 16 dividing the chunk
      (default 16).
    block_v: value columns per program, a power of two >= 16 dividing ``V`` (default ``V``).
  """
  bsz, hq, t, kd = q.shape
  vd = v.shape[3]
  group = hq // k.shape[1]
  flags, arrays, in_specs, vb = _setup(q, k, v, b, r, qf, kf, carry, chunk, sub_chunk, block_v)
  kernel = linear_fwd_channel_kernel if carry is not None else linear_fwd_kernel
  head_state = pl.BlockSpec((None, None, kd, vb), lambda b, h, j: (b, h, 0, j))
  return pl.pallas_call(
      functools.partial(kernel, chunk=chunk, num_chunks=t // chunk, **flags),
      grid=(bsz, hq, vd // vb),
      in_specs=in_specs + [pl.BlockSpec((None, None, kd, vb), lambda b, h, j: (b, lax.div(h, group), 0, j))],
      out_specs=[pl.BlockSpec((None, None, t, vb), lambda b, h, j: (b, h, 0, j)), head_state],
      out_shape=[jax.ShapeDtypeStruct((bsz, hq, t, vd), out_dtype),
                 jax.ShapeDtypeStruct((bsz, hq, kd, vd), jnp.float32)],
      compiler_params=_params(num_warps, num_stages, kd, vb),
      interpret=interpret,
      name="linear_fwd_channel" if carry is not None else "linear_fwd",
  )(q, k, v, *arrays, s0)


def backward(q, k, v, s0, do, dst, *, b=None, r=None, qf=None, kf=None, carry=None, chunk: int,
             sub_chunk: int | None = None, block_v: int | None = None, num_warps=None, num_stages=None,
             dkv_num_warps=None, dkv_num_stages=None, interpret: bool = False):
  """Backward pass: ``(dq [B, Hq, T, K], dk [B, Hq, T, K], dv [B, Hq, T, V], ds0 [B, Hq, K, V])``.

  ``do [B, Hq, T, V]`` is the output gradient and ``dst [B, Hq, K, V]`` the final-state
  gradient per query head. ``dk``, ``dv`` and ``ds0`` are per query head; all gradients are
  float32. The decay arguments and ``block_v`` are those of :func:`forward`; ``num_warps`` /
  ``num_stages`` launch the dQ kernel, ``dkv_num_warps`` / ``dkv_num_stages`` (default: the
  same) the dK/dV kernel.
  """
  bsz, hq, t, kd = q.shape
  vd = v.shape[3]
  group = hq // k.shape[1]
  n = t // chunk
  flags, arrays, specs, vb = _setup(q, k, v, b, r, qf, kf, carry, chunk, sub_chunk, block_v)
  nv = vd // vb
  if carry is not None:
    kernels = (linear_bwd_dq_channel_kernel, linear_bwd_dkv_channel_kernel)
  else:
    kernels = (linear_bwd_dq_kernel, linear_bwd_dkv_kernel)
  suffix = "_channel" if carry is not None else ""
  values = pl.BlockSpec((None, None, t, vb), lambda b, h, j: (b, h, 0, j))
  # dQ and dK contract over the value columns: one partial sum per column block.
  partial_keys = pl.BlockSpec((None, None, None, t, kd), lambda b, h, j: (j, b, h, 0, 0))
  head_state = pl.BlockSpec((None, None, kd, vb), lambda b, h, j: (b, h, 0, j))
  dq = pl.pallas_call(
      functools.partial(kernels[0], chunk=chunk, num_chunks=n, **flags),
      grid=(bsz, hq, nv),
      in_specs=specs + [values, pl.BlockSpec((None, None, kd, vb), lambda b, h, j: (b, lax.div(h, group), 0, j))],
      out_specs=partial_keys,
      out_shape=jax.ShapeDtypeStruct((nv, bsz, hq, t, kd), jnp.float32),
      compiler_params=_params(num_warps, num_stages, kd, vb),
      interpret=interpret,
      name="linear_bwd_dq" + suffix,
  )(q, k, v, *arrays, do, s0)
  dk, dv, ds0 = pl.pallas_call(
      functools.partial(kernels[1], chunk=chunk, num_chunks=n, **flags),
      grid=(bsz, hq, nv),
      in_specs=specs + [values, head_state],
      out_specs=[partial_keys, values, head_state],
      out_shape=[jax.ShapeDtypeStruct((nv, bsz, hq, t, kd), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, hq, t, vd), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, hq, kd, vd), jnp.float32)],
      compiler_params=_params(dkv_num_warps or num_warps, dkv_num_stages or num_stages, kd, vb),
      interpret=interpret,
      name="linear_bwd_dkv" + suffix,
  )(q, k, v, *arrays, do, dst)
  if nv == 1:
    return dq[0], dk[0], dv, ds0
  return dq.sum(0), dk.sum(0), dv, ds0
