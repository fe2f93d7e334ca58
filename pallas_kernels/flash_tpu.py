"""Block-sparse flash attention for TPU (Pallas Mosaic lowering), forward and backward.

Layout inside the kernels is head-major (``[B, H, T, D]``, transposed by the wrappers) so that a
tile is a contiguous ``(block, D)`` slab. The key axis of every grid is a position in the
BlockMask's list, not a key-block index: the index maps read the scalar-prefetched lists to DMA
exactly the listed key blocks, and entries past a row's count repeat the last listed block, so
the pipeline fetches nothing new for them and the body is skipped with ``pl.when``.

* forward: grid ``(B, Hq, nq, Wk)``; online softmax in VMEM scratch; writes O and the LSE.
* dQ: grid ``(B, Hq, nq, Wk)`` over the same lists.
* dK/dV: grid ``(B, Hkv, nk, G, Wq)`` over the transposed lists, accumulating the G query heads
  of a GQA group into one K/V block without repeating K/V. Tiles are computed transposed
  (``k q^T``, keys in sublanes) so that every matmul is a plain NN or NT product.

FULL tiles run without the mask; PARTIAL tiles evaluate the iota predicate in-kernel, or read
their precomputed tile; segment ids apply to every visited tile. Learned sinks initialise the
running max (``m = sink``, ``l = 1``); their gradient is computed outside from the LSE.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import flash_common as fc

_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _interpret_params(interpret: bool):
  # Eager DMAs: the kernels issue no manual copies, and it is about 1.5x faster to interpret.
  return pltpu.InterpretParams(dma_execution_mode="eager") if interpret else False


def _group_div(h, group: int):
  return h if group == 1 else lax.div(h, group)


def _logits(a, b, scale, soft_cap):
  """``scale * a @ b.T`` in float32, soft-capped; also returns tanh for the backward pass."""
  s = lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32) * scale
  if soft_cap is None:
    return s, None
  th = jnp.tanh(s / soft_cap)
  return soft_cap * th, th


def _visibility(mask: fc.MaskSpec, masked: bool, tile_ref, q_start, kv_start, shape, head, seg,
                transposed: bool = False):
  """Boolean visibility of a tile, or None when every pair is visible.

  The predicate (or the precomputed tile) applies only to PARTIAL tiles (``masked``); segment
  ids apply to every tile. ``transposed`` tiles have keys in rows and queries in columns.
  """
  vis = None
  if masked:
    if mask.use_tiles:
      # Widened before the comparison: TPU v4 has no int8 vector compare (Mosaic cannot
      # legalize arith.cmpi on i8 vectors there); v5e and later accept both.
      vis = tile_ref[...].astype(jnp.int32) != 0
    else:
      q_axis, kv_axis = (1, 0) if transposed else (0, 1)
      q_idx = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
      kv_idx = kv_start + lax.broadcasted_iota(jnp.int32, shape, kv_axis)
      vis = jnp.broadcast_to(mask.predicate(q_idx, kv_idx, head), shape)
  if seg is not None:
    vis = seg if vis is None else vis & seg
  return vis


def _branches(mask: fc.MaskSpec, kind, fn):
  """Runs ``fn(masked)`` for the tile kinds that can occur, selecting on ``kind`` at run time."""
  if mask.has_partial and mask.has_full:
    pl.when(kind == fc.FULL)(lambda: fn(False))
    pl.when(kind == fc.PARTIAL)(lambda: fn(True))
  else:
    fn(mask.has_partial)


def _record(record, phase, b, h, i, j, kind):
  if record is not None:
    jax.debug.callback(record, phase, b, h, i, j, kind == fc.PARTIAL)


def flash_fwd_kernel(idx_ref, kind_ref, cnt_ref, tid_ref, off_ref, *refs, mask: fc.MaskSpec,
                     scale: float, soft_cap, block_q: int, block_kv: int, num_steps: int,
                     has_sinks: bool, has_segments: bool, record):
  refs = list(refs)
  q_ref, k_ref, v_ref = refs[:3]
  rest = refs[3:]
  sinks_ref = rest.pop(0) if has_sinks else None
  qseg_ref, kvseg_ref = (rest.pop(0), rest.pop(0)) if has_segments else (None, None)
  tile_ref = rest.pop(0) if mask.use_tiles else None
  o_ref, lse_ref, m_ref, l_ref, acc_ref = rest

  b, h, i, t = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  hm = h if mask.per_head else 0

  @pl.when(t == 0)
  def init():
    acc_ref[...] = jnp.zeros_like(acc_ref)
    if has_sinks:
      m_ref[...] = jnp.full(m_ref.shape, sinks_ref[h], jnp.float32)
      l_ref[...] = jnp.ones_like(l_ref)
    else:
      m_ref[...] = jnp.full(m_ref.shape, fc.NEG_INF, jnp.float32)
      l_ref[...] = jnp.zeros_like(l_ref)

  @pl.when(t < cnt_ref[hm, i])
  def visit():
    j = idx_ref[hm, i, t]
    kind = kind_ref[hm, i, t]
    shape = (block_q, block_kv)

    def update(masked):
      _record(record, "fwd", b, h, i, j, jnp.int32(fc.PARTIAL if masked else fc.FULL))
      s, _ = _logits(q_ref[...], k_ref[...], scale, soft_cap)
      seg = (qseg_ref[...] == kvseg_ref[...]) if has_segments else None
      vis = _visibility(mask, masked, tile_ref, i * block_q, j * block_kv, shape, off_ref[0] + h, seg)
      m_prev = m_ref[...]
      if vis is None:
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
      else:
        m_new = jnp.maximum(m_prev, jnp.where(vis, s, fc.NEG_INF).max(axis=1, keepdims=True))
        p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
      alpha = jnp.exp(m_prev - m_new)
      m_ref[...] = m_new
      l_ref[...] = alpha * l_ref[...] + p.sum(axis=1, keepdims=True)
      pv = lax.dot_general(p.astype(v_ref.dtype), v_ref[...], _NN, preferred_element_type=jnp.float32)
      acc_ref[...] = alpha * acc_ref[...] + pv

    _branches(mask, kind, update)

  @pl.when(t == num_steps - 1)
  def finish():
    l = l_ref[...]
    positive = l > 0
    safe = jnp.where(positive, l, 1.0)
    o_ref[...] = (acc_ref[...] / safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(positive, m_ref[...] + jnp.log(safe), -jnp.inf)


def _prefetch(sched: fc.Schedule, head_offset, transposed: bool):
  if transposed:
    return [sched.q_indices, sched.q_kinds, sched.q_counts, sched.q_tile_ids, head_offset]
  return [sched.kv_indices, sched.kv_kinds, sched.kv_counts, sched.kv_tile_ids, head_offset]


def flash_fwd(q, k, v, sinks, q_seg, kv_seg, head_offset, sched: fc.Schedule, *,
              mask: fc.MaskSpec, scale: float, soft_cap, block_q: int, block_kv: int,
              interpret: bool, record: Callable | None = None):
  """Forward pass.

  Args:
    q: ``[B, Tq, Hq, D]``; k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]``, with ``Tq`` and ``Tk``
      multiples of ``block_q`` / ``block_kv`` (the caller pads).
    sinks: ``[Hq]`` float32 or None. q_seg / kv_seg: ``[B, Tq]`` / ``[B, Tk]`` int32 or None.
    head_offset: ``[1]`` int32 added to the local head index for head-dependent predicates
      (non-zero inside a head-sharded shard_map).
    sched: the block lists; mask: how to mask PARTIAL tiles.

  Returns:
    ``o [B, Tq, Hq, Dv]`` in q's dtype and ``lse [B, Tq, Hq]`` float32 (``-inf`` for rows that
    see nothing and have no sink).
  """
  b, tq, hq, d = q.shape
  _, tk, hkv, dv = v.shape
  group = hq // hkv
  bq, bk = block_q, block_kv
  num_steps = sched.kv_indices.shape[-1]
  per_head = mask.per_head

  def q_map(bi, h, i, t, *_):
    return bi, h, i, 0

  def kv_map(bi, h, i, t, idx, *_):
    return bi, _group_div(h, group), idx[h if per_head else 0, i, t], 0

  in_specs = [pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, dv), kv_map)]
  args = [q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)]
  if sinks is not None:
    in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    args.append(sinks.astype(jnp.float32))
  if q_seg is not None:
    in_specs.append(pl.BlockSpec((None, bq, 1), lambda bi, h, i, t, *_: (bi, i, 0)))
    in_specs.append(pl.BlockSpec((None, 1, bk), lambda bi, h, i, t, idx, *_: (bi, 0, idx[h if per_head else 0, i, t])))
    args += [q_seg[:, :, None], kv_seg[:, None, :]]
  if mask.use_tiles:
    in_specs.append(pl.BlockSpec(
        (None, bq, bk), lambda bi, h, i, t, idx, kind, cnt, tid, off: (tid[h if per_head else 0, i, t], 0, 0)))
    args.append(sched.tiles)
  kernel = functools.partial(
      flash_fwd_kernel, mask=mask, scale=scale, soft_cap=soft_cap, block_q=bq, block_kv=bk,
      num_steps=num_steps, has_sinks=sinks is not None, has_segments=q_seg is not None,
      record=record if interpret else None)
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(b, hq, tq // bq, num_steps),
          in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, bq, dv), q_map), pl.BlockSpec((None, None, bq, 1), q_map)],
          scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                          pltpu.VMEM((bq, dv), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, hq, tq, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, hq, tq, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_interpret_params(interpret),
      name="flash_fwd_tpu",
  )(*_prefetch(sched, head_offset, False), *args)
  return o.transpose(0, 2, 1, 3), lse[..., 0].transpose(0, 2, 1)


def flash_dq_kernel(idx_ref, kind_ref, cnt_ref, tid_ref, off_ref, *refs, mask: fc.MaskSpec,
                    scale: float, soft_cap, block_q: int, block_kv: int, num_steps: int,
                    has_segments: bool, record):
  refs = list(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
  rest = refs[6:]
  qseg_ref, kvseg_ref = (rest.pop(0), rest.pop(0)) if has_segments else (None, None)
  tile_ref = rest.pop(0) if mask.use_tiles else None
  dq_ref, acc_ref = rest

  b, h, i, t = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  hm = h if mask.per_head else 0

  @pl.when(t == 0)
  def init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(t < cnt_ref[hm, i])
  def visit():
    j = idx_ref[hm, i, t]
    kind = kind_ref[hm, i, t]
    shape = (block_q, block_kv)

    def update(masked):
      _record(record, "dq", b, h, i, j, jnp.int32(fc.PARTIAL if masked else fc.FULL))
      s, th = _logits(q_ref[...], k_ref[...], scale, soft_cap)
      seg = (qseg_ref[...] == kvseg_ref[...]) if has_segments else None
      vis = _visibility(mask, masked, tile_ref, i * block_q, j * block_kv, shape, off_ref[0] + h, seg)
      p = jnp.exp(s - lse_ref[...])
      if vis is not None:
        p = jnp.where(vis, p, 0.0)
      dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_ref[...])
      if th is not None:
        ds = ds * (1.0 - th * th)
      acc_ref[...] += scale * lax.dot_general(ds.astype(k_ref.dtype), k_ref[...], _NN,
                                              preferred_element_type=jnp.float32)

    _branches(mask, kind, update)

  @pl.when(t == num_steps - 1)
  def finish():
    dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def flash_dkv_kernel(idx_ref, kind_ref, cnt_ref, tid_ref, off_ref, *refs, mask: fc.MaskSpec,
                     scale: float, soft_cap, block_q: int, block_kv: int, num_steps: int,
                     group: int, has_segments: bool, record):
  refs = list(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
  rest = refs[6:]
  qseg_ref, kvseg_ref = (rest.pop(0), rest.pop(0)) if has_segments else (None, None)
  tile_ref = rest.pop(0) if mask.use_tiles else None
  dk_ref, dv_ref, dk_acc, dv_acc = rest

  b, hk, j, g, t = (pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3),
                    pl.program_id(4))
  h = hk * group + g
  hm = h if mask.per_head else 0

  @pl.when((g == 0) & (t == 0))
  def init():
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)

  @pl.when(t < cnt_ref[hm, j])
  def visit():
    i = idx_ref[hm, j, t]
    kind = kind_ref[hm, j, t]
    shape = (block_kv, block_q)

    def update(masked):
      _record(record, "dkv", b, h, i, j, jnp.int32(fc.PARTIAL if masked else fc.FULL))
      # Transposed tile: keys in rows, queries in columns.
      s, th = _logits(k_ref[...], q_ref[...], scale, soft_cap)
      seg = (kvseg_ref[...] == qseg_ref[...]) if has_segments else None
      vis = _visibility(mask, masked, tile_ref, i * block_q, j * block_kv, shape, off_ref[0] + h, seg,
                        transposed=True)
      p = jnp.exp(s - lse_ref[...])
      if vis is not None:
        p = jnp.where(vis, p, 0.0)
      dv_acc[...] += lax.dot_general(p.astype(do_ref.dtype), do_ref[...], _NN,
                                     preferred_element_type=jnp.float32)
      dp = lax.dot_general(v_ref[...], do_ref[...], _NT, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_ref[...])
      if th is not None:
        ds = ds * (1.0 - th * th)
      dk_acc[...] += scale * lax.dot_general(ds.astype(q_ref.dtype), q_ref[...], _NN,
                                             preferred_element_type=jnp.float32)

    _branches(mask, kind, update)

  @pl.when((g == group - 1) & (t == num_steps - 1))
  def finish():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def flash_bwd(q, k, v, q_seg, kv_seg, head_offset, sched: fc.Schedule, lse, do, delta, *,
              mask: fc.MaskSpec, scale: float, soft_cap, block_q: int, block_kv: int,
              interpret: bool, record: Callable | None = None):
  """Backward pass: ``(dq, dk, dv)`` in the dtypes of ``q, k, v``.

  Args:
    q, k, v, q_seg, kv_seg, head_offset, sched: as in :func:`flash_fwd`.
    lse: ``[B, Tq, Hq]`` float32 from the forward pass, with rows that must not contribute
      (padding, rows that saw nothing) set to ``+inf`` by the caller.
    do: ``[B, Tq, Hq, Dv]`` output cotangent (zero on padded rows).
    delta: ``[B, Tq, Hq]`` float32, ``sum(do * o, -1) - dlse``.
  """
  b, tq, hq, d = q.shape
  _, tk, hkv, dv = v.shape
  group = hq // hkv
  bq, bk = block_q, block_kv
  per_head = mask.per_head
  has_segments = q_seg is not None
  qt, kt, vt, dot_ = (x.transpose(0, 2, 1, 3) for x in (q, k, v, do))
  lse_t = lse.transpose(0, 2, 1)      # [B, Hq, Tq]
  delta_t = delta.transpose(0, 2, 1)

  def hsel(h):
    return h if per_head else 0

  # dQ: same grid and lists as the forward pass.
  num_steps = sched.kv_indices.shape[-1]

  def q_map(bi, h, i, t, *_):
    return bi, h, i, 0

  def kv_map(bi, h, i, t, idx, *_):
    return bi, _group_div(h, group), idx[hsel(h), i, t], 0

  in_specs = [pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, dv), kv_map), pl.BlockSpec((None, None, bq, dv), q_map),
              pl.BlockSpec((None, None, bq, 1), q_map), pl.BlockSpec((None, None, bq, 1), q_map)]
  args = [qt, kt, vt, dot_, lse_t[..., None], delta_t[..., None]]
  if has_segments:
    in_specs.append(pl.BlockSpec((None, bq, 1), lambda bi, h, i, t, *_: (bi, i, 0)))
    in_specs.append(pl.BlockSpec((None, 1, bk), lambda bi, h, i, t, idx, *_: (bi, 0, idx[hsel(h), i, t])))
    args += [q_seg[:, :, None], kv_seg[:, None, :]]
  if mask.use_tiles:
    in_specs.append(pl.BlockSpec(
        (None, bq, bk), lambda bi, h, i, t, idx, kind, cnt, tid, off: (tid[hsel(h), i, t], 0, 0)))
    args.append(sched.tiles)
  dq = pl.pallas_call(
      functools.partial(flash_dq_kernel, mask=mask, scale=scale, soft_cap=soft_cap, block_q=bq,
                        block_kv=bk, num_steps=num_steps, has_segments=has_segments,
                        record=record if interpret else None),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(b, hq, tq // bq, num_steps),
          in_specs=in_specs,
          out_specs=pl.BlockSpec((None, None, bq, d), q_map),
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((b, hq, tq, d), q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_interpret_params(interpret),
      name="flash_dq_tpu",
  )(*_prefetch(sched, head_offset, False), *args)

  # dK/dV: grid over key blocks, then the group's query heads, then the transposed list.
  num_steps_t = sched.q_indices.shape[-1]

  def kv_own(bi, hk, j, g, t, *_):
    return bi, hk, j, 0

  def q_list(bi, hk, j, g, t, idx, *_):
    return bi, hk * group + g, idx[hsel(hk * group + g), j, t], 0

  def row_list(bi, hk, j, g, t, idx, *_):
    return bi, hk * group + g, 0, idx[hsel(hk * group + g), j, t]

  in_specs = [pl.BlockSpec((None, None, bq, d), q_list), pl.BlockSpec((None, None, bk, d), kv_own),
              pl.BlockSpec((None, None, bk, dv), kv_own), pl.BlockSpec((None, None, bq, dv), q_list),
              pl.BlockSpec((None, None, 1, bq), row_list), pl.BlockSpec((None, None, 1, bq), row_list)]
  args = [qt, kt, vt, dot_, lse_t[:, :, None, :], delta_t[:, :, None, :]]
  if has_segments:
    in_specs.append(pl.BlockSpec(
        (None, 1, bq), lambda bi, hk, j, g, t, idx, *_: (bi, 0, idx[hsel(hk * group + g), j, t])))
    in_specs.append(pl.BlockSpec((None, bk, 1), lambda bi, hk, j, g, t, *_: (bi, j, 0)))
    args += [q_seg[:, None, :], kv_seg[:, :, None]]
  if mask.use_tiles:
    in_specs.append(pl.BlockSpec(
        (None, bk, bq),
        lambda bi, hk, j, g, t, idx, kind, cnt, tid, off: (tid[hsel(hk * group + g), j, t], 0, 0)))
    args.append(sched.tiles.swapaxes(1, 2))
  dk, dv_ = pl.pallas_call(
      functools.partial(flash_dkv_kernel, mask=mask, scale=scale, soft_cap=soft_cap, block_q=bq,
                        block_kv=bk, num_steps=num_steps_t, group=group,
                        has_segments=has_segments, record=record if interpret else None),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(b, hkv, tk // bk, group, num_steps_t),
          in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, bk, d), kv_own), pl.BlockSpec((None, None, bk, dv), kv_own)],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, dv), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, hkv, tk, d), k.dtype),
                 jax.ShapeDtypeStruct((b, hkv, tk, dv), v.dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=_interpret_params(interpret),
      name="flash_dkv_tpu",
  )(*_prefetch(sched, head_offset, True), *args)
  return dq.transpose(0, 2, 1, 3), dk.transpose(0, 2, 1, 3), dv_.transpose(0, 2, 1, 3)
