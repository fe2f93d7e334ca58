"""Chunked linear attention for GPU (Pallas, Triton dialect), forward and backward.

Lightning Attention-2's tiling with the chunk loop inside the kernel: the grid ``(B, Hq)`` runs
one program per (batch, query head); it walks the ``N`` chunks of its sequence with a
``fori_loop`` that keeps the float32 state in registers, computing each chunk's intra-chunk
block (masked, decayed ``C x C``) and inter-chunk term (the state), then updating the state. The
backward pass is two such sweeps: ``dQ`` forwards in time (recomputing the state) and ``dK/dV``
backwards in time carrying the state gradient, which ends as the gradient of the initial state.
See :mod:`pallas_kernels.linear_common` for the per-chunk math.

Layout: ``q [B, Hq, T, K]``, ``k [B, Hs, T, K]``, ``v [B, Hs, T, V]`` (``T`` a multiple of the
chunk, ``K``, ``V`` powers of two >= 16 as Triton tiles require); per-token vectors
``[B, Hs, T]`` (decay, factors) and ``[B, T]`` (run index). Query head ``h`` reads state head
``h // group``. State gradients and ``dK/dV`` are produced per query head; the caller sums each
GQA group.

Scalar decays only (one value per token and state head); per-channel gates are not supported.
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


def _in_specs(shape, group, has_decay, has_segments, has_factors):
  t, kd, vd = shape
  kv = lambda b, h: (b, lax.div(h, group), 0, 0)
  specs = [pl.BlockSpec((None, None, t, kd), lambda b, h: (b, h, 0, 0)),
           pl.BlockSpec((None, None, t, kd), kv),
           pl.BlockSpec((None, None, t, vd), kv)]
  vec = pl.BlockSpec((None, None, t), lambda b, h: (b, lax.div(h, group), 0))
  if has_decay:
    specs.append(vec)
  if has_segments:
    specs.append(pl.BlockSpec((None, t), lambda b, h: (b, 0)))
  if has_factors:
    specs += [vec, vec]
  return specs


def _extras(b, r, qf, kf):
  flags = dict(has_decay=b is not None, has_segments=r is not None, has_factors=qf is not None)
  arrays = [x for x in (b, r, qf, kf) if x is not None]
  return arrays, flags


def _params(num_warps, num_stages, kd, vd):
  if num_warps is None:
    num_warps = 4 if max(kd, vd) <= 64 else 8
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages or 1)


def forward(q, k, v, s0, *, b=None, r=None, qf=None, kf=None, chunk: int, out_dtype,
            num_warps=None, num_stages=None, interpret: bool = False):
  """Forward pass. Returns ``(o [B, Hq, T, V] out_dtype, final state [B, Hq, K, V] float32)``.

  Args:
    q: ``[B, Hq, T, K]``; k: ``[B, Hs, T, K]``; v: ``[B, Hs, T, V]``; s0: ``[B, Hs, K, V]`` f32.
    b: ``[B, Hs, T]`` chunk-local cumulative log decay; r: ``[B, T]`` int32 run index;
    qf, kf: ``[B, Hs, T]`` float32 query / key factors (see linear_common).
  """
  bsz, hq, t, kd = q.shape
  hs, vd = k.shape[1], v.shape[3]
  group = hq // hs
  arrays, flags = _extras(b, r, qf, kf)
  kernel = functools.partial(linear_fwd_kernel, chunk=chunk, num_chunks=t // chunk, **flags)
  head_state = pl.BlockSpec((None, None, kd, vd), lambda b, h: (b, h, 0, 0))
  return pl.pallas_call(
      kernel,
      grid=(bsz, hq),
      in_specs=_in_specs((t, kd, vd), group, **flags)
      + [pl.BlockSpec((None, None, kd, vd), lambda b, h: (b, lax.div(h, group), 0, 0))],
      out_specs=[pl.BlockSpec((None, None, t, vd), lambda b, h: (b, h, 0, 0)), head_state],
      out_shape=[jax.ShapeDtypeStruct((bsz, hq, t, vd), out_dtype),
                 jax.ShapeDtypeStruct((bsz, hq, kd, vd), jnp.float32)],
      compiler_params=_params(num_warps, num_stages, kd, vd),
      interpret=interpret,
      name="linear_fwd",
  )(q, k, v, *arrays, s0)


def backward(q, k, v, s0, do, dst, *, b=None, r=None, qf=None, kf=None, chunk: int,
             num_warps=None, num_stages=None, interpret: bool = False):
  """Backward pass: ``(dq [B, Hq, T, K], dk [B, Hq, T, K], dv [B, Hq, T, V], ds0 [B, Hq, K, V])``.

  ``do [B, Hq, T, V]`` is the output gradient and ``dst [B, Hq, K, V]`` the final-state
  gradient per query head. ``dk``, ``dv`` and ``ds0`` are per query head; all gradients are
  float32.
  """
  bsz, hq, t, kd = q.shape
  hs, vd = k.shape[1], v.shape[3]
  group = hq // hs
  n = t // chunk
  arrays, flags = _extras(b, r, qf, kf)
  specs = _in_specs((t, kd, vd), group, **flags)
  tokens = lambda width: pl.BlockSpec((None, None, t, width), lambda b, h: (b, h, 0, 0))
  head_state = pl.BlockSpec((None, None, kd, vd), lambda b, h: (b, h, 0, 0))
  params = _params(num_warps, num_stages, kd, vd)
  dq = pl.pallas_call(
      functools.partial(linear_bwd_dq_kernel, chunk=chunk, num_chunks=n, **flags),
      grid=(bsz, hq),
      in_specs=specs + [tokens(vd), pl.BlockSpec((None, None, kd, vd),
                                                 lambda b, h: (b, lax.div(h, group), 0, 0))],
      out_specs=tokens(kd),
      out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
      compiler_params=params,
      interpret=interpret,
      name="linear_bwd_dq",
  )(q, k, v, *arrays, do, s0)
  dk, dv, ds0 = pl.pallas_call(
      functools.partial(linear_bwd_dkv_kernel, chunk=chunk, num_chunks=n, **flags),
      grid=(bsz, hq),
      in_specs=specs + [tokens(vd), head_state],
      out_specs=[tokens(kd), tokens(vd), head_state],
      out_shape=[jax.ShapeDtypeStruct((bsz, hq, t, kd), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, hq, t, vd), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, hq, kd, vd), jnp.float32)],
      compiler_params=params,
      interpret=interpret,
      name="linear_bwd_dkv",
  )(q, k, v, *arrays, do, dst)
  return dq, dk, dv, ds0
