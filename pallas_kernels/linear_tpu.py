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

Per-channel decays (GLA gates) take separate kernels, selected statically by the ``carry``
argument: the chunk-local log decay ``b`` and the factors ``qf``, ``kf`` come as ``[B, Hs, T, K]``
(whole ``[C, K]`` blocks, ``K`` a multiple of 128) and the state carry as ``[B, Hs, N, K, 1]``
columns. Each chunk is processed in row blocks of ``sub_chunk`` tokens (16, or 8 when the chunk is
not a multiple of 16) with the sub-chunk scheme of :func:`pallas_kernels.linear_common.channel_block`:
a static Python loop over the blocks, static sublane slices (multiples of 8) of float32 values,
and a ``fori_loop`` over the tokens of each diagonal block. The forward output goes through a
float32 VMEM scratch so that every partial store is (8, 128)-aligned whatever the output dtype.
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


def _iota(shape, dim):
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def _channel_unpack(refs, has_segments, with_q=True):
  refs = list(refs)
  names = (("q",) if with_q else ()) + ("k", "v", "b") + (("r_col", "r_row") if has_segments else ()) + (
      "qf", "kf", "carry")
  return {name: refs.pop(0) for name in names}, refs


def _channel_blocks(r, chunk, sub, has_segments, queries):
  """Yields ``(start, slice, mask, index vectors)`` for the row blocks of a chunk."""
  rows, rows_all, cols = _iota((sub, 1), 0), _iota((chunk, 1), 0), _iota((1, chunk), 1)
  r_col = r["r_col"][...] if has_segments else None
  r_row = r["r_row"][...] if has_segments else None
  for start in range(0, chunk, sub):
    sl = slice(start, start + sub)
    mask = lc.block_mask(start, rows, cols, queries, None if r_col is None else r_col[sl], r_row)
    yield start, sl, mask, dict(rows=rows, rows_all=rows_all, cols=cols)


def linear_fwd_channel_kernel(*refs, chunk, sub, has_segments):
  r, (s0_ref, o_ref, st_ref, s_scr, o_scr) = _channel_unpack(refs, has_segments)
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    s_scr[...] = s0_ref[...]

  dt = r["q"].dtype
  q, k, v, b, qf = (r[n][...] for n in ("q", "k", "v", "b", "qf"))
  q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
  state = s_scr[...]
  for start, sl, mask, idx in _channel_blocks(r, chunk, sub, has_segments, queries=True):
    a, _ = lc.channel_block(q32[sl], k32[sl], b[sl], k32, b, start=start, queries=True, mask=mask,
                            dtype=dt, **idx)
    o_scr[pl.ds(start, sub), :] = lc.dot(a, v, lc.NN, dt) + lc.dot(q32[sl] * qf[sl], state, lc.NN, dt)
  o_ref[...] = o_scr[...].astype(o_ref.dtype)
  state = r["carry"][...] * state + lc.dot(k32 * r["kf"][...], v, lc.TN, dt)
  s_scr[...] = state

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    st_ref[...] = state


def linear_bwd_dq_channel_kernel(*refs, chunk, sub, has_segments):
  r, (do_ref, s0_ref, dq_ref, s_scr) = _channel_unpack(refs, has_segments, with_q=False)
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    s_scr[...] = s0_ref[...]

  dt = r["k"].dtype
  k, v, b, qf = (r[n][...] for n in ("k", "v", "b", "qf"))
  k32, do32 = k.astype(jnp.float32), do_ref[...].astype(jnp.float32)
  state = s_scr[...]
  for start, sl, mask, idx in _channel_blocks(r, chunk, sub, has_segments, queries=True):
    grad = jnp.where(mask, lc.dot(do32[sl], v, lc.NT, dt), 0.0)
    _, dq = lc.channel_block(None, k32[sl], b[sl], k32, b, start=start, queries=True, mask=mask,
                             dtype=dt, grad=grad, scores=False, **idx)
    dq_ref[pl.ds(start, sub), :] = dq + lc.dot(do32[sl], state, lc.NT, dt) * qf[sl]
  s_scr[...] = r["carry"][...] * state + lc.dot(k32 * r["kf"][...], v, lc.TN, dt)


def linear_bwd_dkv_channel_kernel(*refs, chunk, sub, has_segments):
  r, (do_ref, dst_ref, dk_ref, dv_ref, ds0_ref, ds_scr) = _channel_unpack(refs, has_segments)
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    ds_scr[...] = dst_ref[...]

  dt = r["q"].dtype
  q, k, v, b, kf = (r[n][...] for n in ("q", "k", "v", "b", "kf"))
  q32, k32, v32 = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
  do = do_ref[...]
  dstate = ds_scr[...]
  for start, sl, mask, idx in _channel_blocks(r, chunk, sub, has_segments, queries=False):
    grad = jnp.where(mask, lc.dot(v32[sl], do, lc.NT, dt), 0.0)
    at, dk = lc.channel_block(k32[sl], q32[sl], b[sl], q32, b, start=start, queries=False, mask=mask,
                              dtype=dt, grad=grad, **idx)
    dk_ref[pl.ds(start, sub), :] = dk + lc.dot(v32[sl], dstate, lc.NT, dt) * kf[sl]
    dv_ref[pl.ds(start, sub), :] = lc.dot(at, do, lc.NN, dt) + lc.dot(k32[sl] * kf[sl], dstate, lc.NN, dt)
  dstate = r["carry"][...] * dstate + lc.dot(q32 * r["qf"][...], do, lc.TN, dt)
  ds_scr[...] = dstate

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    ds0_ref[...] = dstate


def _channel_specs(shapes, *, chunk, group, num_chunks, reverse, has_segments, with_q=True):
  """BlockSpecs of (q,) k, v, b, (runs,) qf, kf and the carry for per-channel decays."""
  kd, vd = shapes

  def t(c):
    return num_chunks - 1 - c if reverse else c

  tokens = lambda width, grouped: pl.BlockSpec(
      (None, None, chunk, width), lambda b, h, c: (b, _group_div(h, group) if grouped else h, t(c), 0))
  specs = ([tokens(kd, False)] if with_q else []) + [tokens(kd, True), tokens(vd, True), tokens(kd, True)]
  if has_segments:
    specs += [pl.BlockSpec((None, chunk, 1), lambda b, h, c: (b, t(c), 0)),
              pl.BlockSpec((None, None, 1, chunk), lambda b, h, c: (b, t(c), 0, 0))]
  specs += [tokens(kd, True), tokens(kd, True),
            pl.BlockSpec((None, None, None, kd, 1), lambda b, h, c: (b, _group_div(h, group), t(c), 0, 0))]
  return specs


def _sub_chunk(chunk, sub_chunk):
  sub = sub_chunk or (16 if chunk % 16 == 0 else 8)
  if sub % 8 or chunk % sub:
    raise ValueError(f"sub_chunk must be a multiple of 8 dividing the chunk ({chunk}), got {sub}")
  return sub


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
            b=None, carry=None, chunk: int, sub_chunk: int | None = None, out_dtype,
            interpret: bool = False):
  """Forward pass. Returns ``(o [B, Hq, T, V] out_dtype, final state [B, Hq, K, V] float32)``.

  Args:
    q: ``[B, Hq, T, K]``; k: ``[B, Hs, T, K]``; v: ``[B, Hs, T, V]``; s0: ``[B, Hs, K, V]`` f32.
    b_col, b_row: ``[B, Hs, T, 1]`` / ``[B, Hs, N, 1, C]`` chunk-local cumulative log decay.
    r_col, r_row: ``[B, T, 1]`` / ``[B, N, 1, C]`` int32 run index (segments).
    qf, kf: ``[B, Hs, T, 1]`` float32 query / key factors (see linear_common).
    b, carry: per-channel decays only (then ``b_col``, ``b_row`` are not given): ``b``
      ``[B, Hs, T, K]`` float32 chunk-local cumulative log decay and ``carry`` ``[B, Hs, N, K, 1]``
      the state carry of each chunk; ``qf``, ``kf`` are then ``[B, Hs, T, K]``.
    sub_chunk: per-channel decays: rows per block, a multiple of 8 dividing the chunk
      (default 16 when it divides the chunk, else 8).
  """
  if carry is not None:
    return _forward_channel(q, k, v, s0, b, r_col, r_row, qf, kf, carry, chunk=chunk,
                            sub=_sub_chunk(chunk, sub_chunk), out_dtype=out_dtype, interpret=interpret)
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
             kf=None, b=None, carry=None, chunk: int, sub_chunk: int | None = None,
             interpret: bool = False):
  """Backward pass: ``(dq [B, Hq, T, K], dk [B, Hq, T, K], dv [B, Hq, T, V], ds0 [B, Hq, K, V])``.

  ``do [B, Hq, T, V]`` is the output gradient and ``dst [B, Hq, K, V]`` the final-state
  gradient per query head (the caller puts a state head's gradient on one head of its group).
  ``dk``, ``dv`` and ``ds0`` are per query head; all gradients are float32. The decay arguments
  are those of :func:`forward`.
  """
  if carry is not None:
    return _backward_channel(q, k, v, s0, do, dst, b, r_col, r_row, qf, kf, carry, chunk=chunk,
                             sub=_sub_chunk(chunk, sub_chunk), interpret=interpret)
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


def _forward_channel(q, k, v, s0, b, r_col, r_row, qf, kf, carry, *, chunk, sub, out_dtype, interpret):
  bsz, hq, t, kd = q.shape
  hs, vd = k.shape[1], v.shape[3]
  n = t // chunk
  has_segments = r_col is not None
  group = hq // hs
  state_spec = pl.BlockSpec((None, None, kd, vd), lambda b, h, c: (b, _group_div(h, group), 0, 0))
  return pl.pallas_call(
      functools.partial(linear_fwd_channel_kernel, chunk=chunk, sub=sub, has_segments=has_segments),
      grid=(bsz, hq, n),
      in_specs=_channel_specs((kd, vd), chunk=chunk, group=group, num_chunks=n, reverse=False,
                              has_segments=has_segments) + [state_spec],
      out_specs=[pl.BlockSpec((None, None, chunk, vd), lambda b, h, c: (b, h, c, 0)),
                 pl.BlockSpec((None, None, kd, vd), lambda b, h, c: (b, h, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((bsz, hq, t, vd), out_dtype),
                 jax.ShapeDtypeStruct((bsz, hq, kd, vd), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((kd, vd), jnp.float32), pltpu.VMEM((chunk, vd), jnp.float32)],
      compiler_params=_params(),
      interpret=_interpret_params(interpret),
      name="linear_fwd_channel",
  )(q, k, v, b, *([r_col, r_row] if has_segments else []), qf, kf, carry, s0)


def _backward_channel(q, k, v, s0, do, dst, b, r_col, r_row, qf, kf, carry, *, chunk, sub, interpret):
  bsz, hq, t, kd = q.shape
  hs, vd = k.shape[1], v.shape[3]
  n = t // chunk
  group = hq // hs
  has_segments = r_col is not None
  arrays = [b] + ([r_col, r_row] if has_segments else []) + [qf, kf, carry]
  state_spec = pl.BlockSpec((None, None, kd, vd), lambda b, h, c: (b, _group_div(h, group), 0, 0))
  head_state = pl.BlockSpec((None, None, kd, vd), lambda b, h, c: (b, h, 0, 0))

  def tokens(width, reverse):
    return pl.BlockSpec((None, None, chunk, width),
                        lambda b, h, c: (b, h, n - 1 - c if reverse else c, 0))

  specs = functools.partial(_channel_specs, (kd, vd), chunk=chunk, group=group, num_chunks=n,
                            has_segments=has_segments)
  dq = pl.pallas_call(
      functools.partial(linear_bwd_dq_channel_kernel, chunk=chunk, sub=sub, has_segments=has_segments),
      grid=(bsz, hq, n),
      in_specs=specs(reverse=False, with_q=False) + [tokens(vd, False), state_spec],
      out_specs=tokens(kd, False),
      out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
      scratch_shapes=[pltpu.VMEM((kd, vd), jnp.float32)],
      compiler_params=_params(),
      interpret=_interpret_params(interpret),
      name="linear_bwd_dq_channel",
  )(k, v, *arrays, do, s0)
  dk, dv, ds0 = pl.pallas_call(
      functools.partial(linear_bwd_dkv_channel_kernel, chunk=chunk, sub=sub, has_segments=has_segments),
      grid=(bsz, hq, n),
      in_specs=specs(reverse=True) + [tokens(vd, True), head_state],
      out_specs=[tokens(kd, True), tokens(vd, True), head_state],
      out_shape=[jax.ShapeDtypeStruct((bsz, hq, t, kd), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, hq, t, vd), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, hq, kd, vd), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((kd, vd), jnp.float32)],
      compiler_params=_params(),
      interpret=_interpret_params(interpret),
      name="linear_bwd_dkv_channel",
  )(q, k, v, *arrays, do, dst)
  return dq, dk, dv, ds0
