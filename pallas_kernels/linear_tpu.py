"""Chunked linear attention for TPU (Pallas Mosaic lowering), forward and backward.

Lightning Attention-2's tiling: the grid ``(B, Hq, N)`` walks the ``N`` chunks of one (batch,
query head) sequentially (the last grid axis is "arbitrary"), keeping the float32 state in VMEM
scratch; each step computes the chunk's intra-chunk part (a masked, decayed ``C x C`` block) and
its inter-chunk part (the state), then updates the state. The backward pass is two such sweeps:
``dQ`` forwards in time (recomputing the state), ``dK/dV`` backwards in time carrying the state
gradient, which ends as the gradient of the initial state. See :mod:`pallas_kernels.linear_common`
for the per-chunk math.

Layout inside the kernels is head-major: ``q [B, Hq, T, K]``, ``k [B, Hs, T, K]``,
``v [B, Hs, T, V]``, with ``T`` a multiple of the chunk and ``K``, ``V`` the (padded) feature
dims; query head ``h`` reads state head ``h // group``. Per-token factors come as columns
``[B, Hs, T, 1]`` and the decay and run index also as rows ``[B, Hs, N, 1, C]`` (so that both
orientations are whole blocks; TPU blocks must be (8, 128)-divisible or span a full dimension).
State gradients and ``dK/dV`` are produced per query head; the caller sums each GQA group.

Scalar decays only (one value per token and state head); per-channel gates are not supported.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import linear_common as lc


def _interpret_params(interpret: bool):
  # Eager DMAs: the kernels issue no manual copies, and interpretation is faster that way.
  return pltpu.InterpretParams(dma_execution_mode="eager") if interpret else False


def _group_div(h, group: int):
  return h if group == 1 else lax.div(h, group)


def _unpack(refs, has_decay, has_segments, has_factors, with_q=True):
  refs = list(refs)
  out = {name: refs.pop(0) for name in (("q", "k", "v") if with_q else ("k", "v"))}
  if has_decay:
    out["b_col"], out["b_row"] = refs.pop(0), refs.pop(0)
  if has_segments:
    out["r_col"], out["r_row"] = refs.pop(0), refs.pop(0)
  if has_factors:
    out["qf"], out["kf"] = refs.pop(0), refs.pop(0)
  return out, refs


def _chunk_terms(r, chunk, has_decay, has_segments, has_factors):
  """The decay matrix, factor columns and carry of the current chunk, from the refs in ``r``."""
  rows = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  cols = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  d = lc.decay_matrix(rows >= cols,
                      r["b_col"][...] if has_decay else None, r["b_row"][...] if has_decay else None,
                      r["r_col"][...] if has_segments else None, r["r_row"][...] if has_segments else None)
  if not has_factors:
    return d, None, None, None
  qf, kf = r["qf"][...], r["kf"][...]
  carry = lc.carry_of(qf, lax.broadcasted_iota(jnp.int32, (chunk, 1), 0))
  return d, qf, kf, carry


def linear_fwd_kernel(*refs, chunk, has_decay, has_segments, has_factors):
  r, rest = _unpack(refs, has_decay, has_segments, has_factors)
  s0_ref, o_ref, st_ref, s_scr = rest
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    s_scr[...] = s0_ref[...]

  d, qf, kf, carry = _chunk_terms(r, chunk, has_decay, has_segments, has_factors)
  o, state = lc.forward_chunk(r["q"][...], r["k"][...], r["v"][...], d, qf, kf, carry, s_scr[...])
  o_ref[...] = o.astype(o_ref.dtype)
  s_scr[...] = state

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    st_ref[...] = state


def linear_bwd_dq_kernel(*refs, chunk, has_decay, has_segments, has_factors):
  # dQ needs no queries: the kernel reads k, v, dO and the state only.
  r, rest = _unpack(refs, has_decay, has_segments, has_factors, with_q=False)
  do_ref, s0_ref, dq_ref, s_scr = rest
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    s_scr[...] = s0_ref[...]

  d, qf, kf, carry = _chunk_terms(r, chunk, has_decay, has_segments, has_factors)
  k, v = r["k"][...], r["v"][...]
  state = s_scr[...]
  dq_ref[...] = lc.dq_chunk(do_ref[...], k, v, d, qf, state).astype(dq_ref.dtype)
  if carry is not None:
    state = carry * state
  s_scr[...] = state + lc.dot(lc.scale_rows(k, kf), v, lc.TN, k.dtype)


def linear_bwd_dkv_kernel(*refs, chunk, has_decay, has_segments, has_factors):
  r, rest = _unpack(refs, has_decay, has_segments, has_factors)
  do_ref, dst_ref, dk_ref, dv_ref, ds0_ref, ds_scr = rest
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    ds_scr[...] = dst_ref[...]

  d, qf, kf, carry = _chunk_terms(r, chunk, has_decay, has_segments, has_factors)
  q, do = r["q"][...], do_ref[...]
  dstate = ds_scr[...]
  dk, dv = lc.dkv_chunk(q, r["k"][...], r["v"][...], do, d, kf, dstate)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  dstate = lc.dstate_chunk(q, do, qf, carry, dstate)
  ds_scr[...] = dstate

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    ds0_ref[...] = dstate


def _specs(shapes, *, chunk, group, num_chunks, reverse, has_decay, has_segments, has_factors, with_q=True):
  """BlockSpecs of (q,) k, v and the optional factor arrays, for chunk ``c`` (or ``N - 1 - c``)."""
  kd, vd = shapes

  def t(c):
    return num_chunks - 1 - c if reverse else c

  specs = [pl.BlockSpec((None, None, chunk, kd), lambda b, h, c: (b, h, t(c), 0))] if with_q else []
  specs += [
      pl.BlockSpec((None, None, chunk, kd), lambda b, h, c: (b, _group_div(h, group), t(c), 0)),
      pl.BlockSpec((None, None, chunk, vd), lambda b, h, c: (b, _group_div(h, group), t(c), 0)),
  ]
  col = pl.BlockSpec((None, None, chunk, 1), lambda b, h, c: (b, _group_div(h, group), t(c), 0))
  row = pl.BlockSpec((None, None, None, 1, chunk), lambda b, h, c: (b, _group_div(h, group), t(c), 0, 0))
  if has_decay:
    specs += [col, row]
  if has_segments:
    specs += [pl.BlockSpec((None, chunk, 1), lambda b, h, c: (b, t(c), 0)),
              pl.BlockSpec((None, None, 1, chunk), lambda b, h, c: (b, t(c), 0, 0))]
  if has_factors:
    specs += [col, col]
  return specs


def _extras(b_col, b_row, r_col, r_row, qf, kf):
  has_decay, has_segments, has_factors = b_col is not None, r_col is not None, qf is not None
  arrays = ([b_col, b_row] if has_decay else []) + ([r_col, r_row] if has_segments else []) + (
      [qf, kf] if has_factors else [])
  return arrays, dict(has_decay=has_decay, has_segments=has_segments, has_factors=has_factors)


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def forward(q, k, v, s0, *, b_col=None, b_row=None, r_col=None, r_row=None, qf=None, kf=None,
            chunk: int, out_dtype, interpret: bool = False):
  """Forward pass. Returns ``(o [B, Hq, T, V] out_dtype, final state [B, Hq, K, V] float32)``.

  Args:
    q: ``[B, Hq, T, K]``; k: ``[B, Hs, T, K]``; v: ``[B, Hs, T, V]``; s0: ``[B, Hs, K, V]`` f32.
    b_col, b_row: ``[B, Hs, T, 1]`` / ``[B, Hs, N, 1, C]`` chunk-local cumulative log decay.
    r_col, r_row: ``[B, T, 1]`` / ``[B, N, 1, C]`` int32 run index (segments).
    qf, kf: ``[B, Hs, T, 1]`` float32 query / key factors (see linear_common).
  """
  b, hq, t, kd = q.shape
  hs, vd = k.shape[1], v.shape[3]
  n = t // chunk
  arrays, flags = _extras(b_col, b_row, r_col, r_row, qf, kf)
  kernel = functools.partial(linear_fwd_kernel, chunk=chunk, **flags)
  state_spec = pl.BlockSpec((None, None, kd, vd), lambda b, h, c: (b, _group_div(h, hq // hs), 0, 0))
  return pl.pallas_call(
      kernel,
      grid=(b, hq, n),
      in_specs=_specs((kd, vd), chunk=chunk, group=hq // hs, num_chunks=n, reverse=False, **flags) + [state_spec],
      out_specs=[pl.BlockSpec((None, None, chunk, vd), lambda b, h, c: (b, h, c, 0)),
                 pl.BlockSpec((None, None, kd, vd), lambda b, h, c: (b, h, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, hq, t, vd), out_dtype),
                 jax.ShapeDtypeStruct((b, hq, kd, vd), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((kd, vd), jnp.float32)],
      compiler_params=_params(),
      interpret=_interpret_params(interpret),
      name="linear_fwd",
  )(q, k, v, *arrays, s0)


def backward(q, k, v, s0, do, dst, *, b_col=None, b_row=None, r_col=None, r_row=None, qf=None,
             kf=None, chunk: int, interpret: bool = False):
  """Backward pass: ``(dq [B, Hq, T, K], dk [B, Hq, T, K], dv [B, Hq, T, V], ds0 [B, Hq, K, V])``.

  ``do [B, Hq, T, V]`` is the output gradient and ``dst [B, Hq, K, V]`` the final-state
  gradient per query head (the caller puts a state head's gradient on one head of its group).
  ``dk``, ``dv`` and ``ds0`` are per query head; all gradients are float32.
  """
  b, hq, t, kd = q.shape
  hs, vd = k.shape[1], v.shape[3]
  n = t // chunk
  group = hq // hs
  arrays, flags = _extras(b_col, b_row, r_col, r_row, qf, kf)
  state_spec = pl.BlockSpec((None, None, kd, vd), lambda b, h, c: (b, _group_div(h, group), 0, 0))
  head_state = pl.BlockSpec((None, None, kd, vd), lambda b, h, c: (b, h, 0, 0))

  def tokens(width, reverse):
    return pl.BlockSpec((None, None, chunk, width),
                        lambda b, h, c: (b, h, n - 1 - c if reverse else c, 0))

  dq = pl.pallas_call(
      functools.partial(linear_bwd_dq_kernel, chunk=chunk, **flags),
      grid=(b, hq, n),
      in_specs=_specs((kd, vd), chunk=chunk, group=group, num_chunks=n, reverse=False, with_q=False, **flags)
      + [tokens(vd, False), state_spec],
      out_specs=tokens(kd, False),
      out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
      scratch_shapes=[pltpu.VMEM((kd, vd), jnp.float32)],
      compiler_params=_params(),
      interpret=_interpret_params(interpret),
      name="linear_bwd_dq",
  )(k, v, *arrays, do, s0)
  dk, dv, ds0 = pl.pallas_call(
      functools.partial(linear_bwd_dkv_kernel, chunk=chunk, **flags),
      grid=(b, hq, n),
      in_specs=_specs((kd, vd), chunk=chunk, group=group, num_chunks=n, reverse=True, **flags)
      + [tokens(vd, True), head_state],
      out_specs=[tokens(kd, True), tokens(vd, True), head_state],
      out_shape=[jax.ShapeDtypeStruct((b, hq, t, kd), jnp.float32),
                 jax.ShapeDtypeStruct((b, hq, t, vd), jnp.float32),
                 jax.ShapeDtypeStruct((b, hq, kd, vd), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((kd, vd), jnp.float32)],
      compiler_params=_params(),
      interpret=_interpret_params(interpret),
      name="linear_bwd_dkv",
  )(q, k, v, *arrays, do, dst)
  return dq, dk, dv, ds0
