"""Block-sparse flash attention for GPU (Pallas, Triton dialect), forward and backward.

Works in the public ``[B, T, H, D]`` layout (tiles are strided loads, no transposes). Each program
owns one tile of rows and walks its BlockMask row (:class:`pallas_kernels.flash_common.Lists`,
compressed sparse rows) with a dynamic-length ``fori_loop``, loading exactly the listed blocks
from the full-sequence K/V (or Q/dO) refs:

* forward: grid ``(nq, B, Hq)``; online softmax in registers; writes O and the LSE.
* dQ: grid ``(nq, B, Hq)`` over the lists of its own BlockMask.
* dK/dV: grid ``(nk, B, Hkv)``; loops over the G query heads of the GQA group and, for each, the
  transposed list of its non-empty query blocks, so K/V are never repeated and no atomics are
  needed. Tiles are computed transposed (``k q^T``).

The three kernels take their own block sizes and launch parameters (each its own schedule):
what a program keeps in registers differs (O and the statistics; dQ; dK and dV), and so does the
largest tile that fits in 255 registers per thread without spilling.

FULL tiles skip the mask (``lax.cond`` on the tile kind when both kinds occur); PARTIAL tiles
evaluate the iota predicate or read their precomputed tile; segment ids apply to every visited
tile. Block sizes and head dims must be powers of two >= 16 (Triton tiles); the adapter pads.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import flash_common as fc

_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


def _logits(a, b, scale, soft_cap):
  s = lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32) * scale
  if soft_cap is None:
    return s, None
  th = jnp.tanh(s / soft_cap)
  return soft_cap * th, th


def _select(mask: fc.MaskSpec, kind, fn, carry):
  """``fn(masked, carry)`` for the tile kinds that can occur; a cond on ``kind`` if both do."""
  if mask.has_partial and mask.has_full:
    return lax.cond(kind == fc.PARTIAL, functools.partial(fn, True), functools.partial(fn, False), carry)
  return fn(mask.has_partial, carry)


def _record(record, phase, b, h, i, j, masked):
  if record is not None:
    jax.debug.callback(record, phase, b, h, i, j, masked)


def _visibility(mask: fc.MaskSpec, masked, tile, q_idx, kv_idx, head, seg, shape):
  vis = None
  if masked:
    if mask.use_tiles:
      vis = tile != 0
    else:
      vis = jnp.broadcast_to(mask.predicate(q_idx, kv_idx, head), shape)
  if seg is not None:
    vis = seg if vis is None else vis & seg
  return vis


def _walk(mask: fc.MaskSpec, hmap_ref, ptr_ref, b, head, row, n_rows, transposed: bool):
  """``(start, end, entry)``: the entries ``start <= t < end`` of block ``row`` for (batch ``b``,
  local query head ``head``), ``entry(ref, t)`` reading one of them from a list ref.

  Static BlockMasks give :class:`~pallas_kernels.flash_common.Lists` (compressed sparse rows with
  a head -> list map). Traced BlockMasks (``mask.csr_transposed``) give their device lists, one
  row per (batch, list head): ``ptr`` holds the counts ``[rows, nq]`` and ``idx`` / ``kinds`` are
  ``[rows, nq, W]`` for the forward and dQ passes; for dK/dV ``ptr`` holds offsets
  ``[rows, nk + 1]`` into ``[rows, nq * W]`` lists.
  """
  if mask.csr_transposed:
    r = fc.list_row(mask, b, head)
    if transposed:
      return ptr_ref[r, row], ptr_ref[r, row + 1], lambda ref, t: ref[r, t]
    return 0, ptr_ref[r, row], lambda ref, t: ref[r, row, t]
  base = hmap_ref[head] * (n_rows + 1) + row
  return ptr_ref[base], ptr_ref[base + 1], lambda ref, t: ref[t]


def flash_fwd_kernel(hmap_ref, ptr_ref, idx_ref, kind_ref, tid_ref, off_ref, *refs, mask: fc.MaskSpec,
                     scale: float, soft_cap, block_q: int, block_kv: int, n_rows: int, has_sinks: bool,
                     has_segments: bool, record):
  refs = list(refs)
  q_ref, k_ref, v_ref = refs[:3]
  rest = refs[3:]
  sinks_ref = rest.pop(0) if has_sinks else None
  qseg_ref, kvseg_ref = (rest.pop(0), rest.pop(0)) if has_segments else (None, None)
  tiles_ref = rest.pop(0) if mask.use_tiles else None
  o_ref, lse_ref = rest

  i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bq, bk = block_q, block_kv
  q = q_ref[...]
  dv = o_ref.shape[-1]
  if has_sinks:
    m0 = jnp.full((bq,), sinks_ref[h], jnp.float32)
    l0 = jnp.ones((bq,), jnp.float32)
  else:
    m0 = jnp.full((bq,), fc.NEG_INF, jnp.float32)
    l0 = jnp.zeros((bq,), jnp.float32)
  acc0 = jnp.zeros((bq, dv), jnp.float32)
  q_idx = (i * bq + lax.iota(jnp.int32, bq))[:, None]
  qseg = qseg_ref[...] if has_segments else None
  head = off_ref[0] + h

  first, end, entry = _walk(mask, hmap_ref, ptr_ref, b, h, i, n_rows, False)

  def body(t, carry):
    j = entry(idx_ref, t)
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]

    def update(masked, carry):
      m_prev, l_prev, acc = carry
      _record(record, "fwd", b, h, i, j, masked)
      s, _ = _logits(q, k, scale, soft_cap)
      kv_idx = (start + lax.iota(jnp.int32, bk))[None, :]
      seg = (qseg[:, None] == kvseg_ref[pl.ds(start, bk)][None, :]) if has_segments else None
      tile = tiles_ref[entry(tid_ref, t)] if (masked and mask.use_tiles) else None
      vis = _visibility(mask, masked, tile, q_idx, kv_idx, head, seg, (bq, bk))
      if vis is None:
        m_new = jnp.maximum(m_prev, s.max(axis=1))
        p = jnp.exp(s - m_new[:, None])
      else:
        m_new = jnp.maximum(m_prev, jnp.where(vis, s, fc.NEG_INF).max(axis=1))
        p = jnp.where(vis, jnp.exp(s - m_new[:, None]), 0.0)
      alpha = jnp.exp(m_prev - m_new)
      pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
      return m_new, alpha * l_prev + p.sum(axis=1), alpha[:, None] * acc + pv

    return _select(mask, entry(kind_ref, t), update, carry)

  m, l, acc = lax.fori_loop(first, end, body, (m0, l0, acc0))
  positive = l > 0
  safe = jnp.where(positive, l, 1.0)
  o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(positive, m + jnp.log(safe), -jnp.inf)


def _full(shape):
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _schedule_specs(lists: fc.Lists):
  arrays = list(lists)
  return arrays, [_full(a.shape) for a in arrays]


def _params(num_warps, num_stages):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def flash_fwd(q, k, v, sinks, q_seg, kv_seg, head_offset, rows: fc.Lists, tiles, *,
              mask: fc.MaskSpec, scale: float, soft_cap, block_q: int, block_kv: int,
              interpret: bool, record: Callable | None = None, num_warps: int = 4,
              num_stages: int = 2):
  """Forward pass; same contract as :func:`pallas_kernels.flash_tpu.flash_fwd`, with the BlockMask
  rows as :class:`~pallas_kernels.flash_common.Lists` (``head_map`` over the local heads) and the
  ``[U, block_q, block_kv]`` tile table.

  ``Tq``/``Tk`` must be multiples of the blocks, head dims powers of two >= 16.
  """
  b, tq, hq, d = q.shape
  _, tk, hkv, dv = v.shape
  group = hq // hkv
  bq, bk = block_q, block_kv
  arrays, specs = _schedule_specs(rows)
  in_specs = specs + [_full((1,)),
                      pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0)),
                      pl.BlockSpec((None, tk, None, d), lambda i, bi, h: (bi, 0, h // group, 0)),
                      pl.BlockSpec((None, tk, None, dv), lambda i, bi, h: (bi, 0, h // group, 0))]
  args = arrays + [head_offset, q, k, v]
  if sinks is not None:
    in_specs.append(_full((hq,)))
    args.append(sinks)
  if q_seg is not None:
    in_specs += [pl.BlockSpec((None, bq), lambda i, bi, h: (bi, i)),
                 pl.BlockSpec((None, tk), lambda i, bi, h: (bi, 0))]
    args += [q_seg, kv_seg]
  if mask.use_tiles:
    in_specs.append(_full(tiles.shape))
    args.append(tiles)
  kernel = functools.partial(flash_fwd_kernel, mask=mask, scale=scale, soft_cap=soft_cap,
                             block_q=bq, block_kv=bk, n_rows=tq // bq, has_sinks=sinks is not None,
                             has_segments=q_seg is not None, record=record if interpret else None)
  o, lse = pl.pallas_call(
      kernel,
      grid=(tq // bq, b, hq),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bq, None, dv), lambda i, bi, h: (bi, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i))],
      out_shape=[jax.ShapeDtypeStruct((b, tq, hq, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, hq, tq), jnp.float32)],
      compiler_params=_params(num_warps, num_stages),
      interpret=interpret,
      name="flash_fwd_gpu",
  )(*args)
  return o, lse.transpose(0, 2, 1)


def flash_dq_kernel(hmap_ref, ptr_ref, idx_ref, kind_ref, tid_ref, off_ref, *refs, mask: fc.MaskSpec,
                    scale: float, soft_cap, block_q: int, block_kv: int, n_rows: int,
                    has_segments: bool, record):
  refs = list(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
  rest = refs[6:]
  qseg_ref, kvseg_ref = (rest.pop(0), rest.pop(0)) if has_segments else (None, None)
  tiles_ref = rest.pop(0) if mask.use_tiles else None
  (dq_ref,) = rest

  i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bq, bk = block_q, block_kv
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...][:, None]
  delta = delta_ref[...][:, None]
  q_idx = (i * bq + lax.iota(jnp.int32, bq))[:, None]
  qseg = qseg_ref[...] if has_segments else None
  head = off_ref[0] + h

  first, end, entry = _walk(mask, hmap_ref, ptr_ref, b, h, i, n_rows, False)

  def body(t, acc):
    j = entry(idx_ref, t)
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]

    def update(masked, acc):
      _record(record, "dq", b, h, i, j, masked)
      s, th = _logits(q, k, scale, soft_cap)
      kv_idx = (start + lax.iota(jnp.int32, bk))[None, :]
      seg = (qseg[:, None] == kvseg_ref[pl.ds(start, bk)][None, :]) if has_segments else None
      tile = tiles_ref[entry(tid_ref, t)] if (masked and mask.use_tiles) else None
      vis = _visibility(mask, masked, tile, q_idx, kv_idx, head, seg, (bq, bk))
      p = jnp.exp(s - lse)
      if vis is not None:
        p = jnp.where(vis, p, 0.0)
      dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
      ds = p * (dp - delta)
      if th is not None:
        ds = ds * (1.0 - th * th)
      return acc + scale * lax.dot_general(ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32)

    return _select(mask, entry(kind_ref, t), update, acc)

  acc = lax.fori_loop(first, end, body,
                      jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = acc.astype(dq_ref.dtype)


def flash_dkv_kernel(hmap_ref, ptr_ref, idx_ref, kind_ref, tid_ref, off_ref, *refs, mask: fc.MaskSpec,
                     scale: float, soft_cap, block_q: int, block_kv: int, n_rows: int, group: int,
                     has_segments: bool, record):
  refs = list(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
  rest = refs[6:]
  qseg_ref, kvseg_ref = (rest.pop(0), rest.pop(0)) if has_segments else (None, None)
  tiles_ref = rest.pop(0) if mask.use_tiles else None
  dk_ref, dv_ref = rest

  j, b, hk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bq, bk = block_q, block_kv
  k = k_ref[...]
  v = v_ref[...]
  kv_idx = (j * bk + lax.iota(jnp.int32, bk))[:, None]
  kvseg = kvseg_ref[...] if has_segments else None

  def head_body(g, accs):
    h = hk * group + g
    head = off_ref[0] + h

    first, end, entry = _walk(mask, hmap_ref, ptr_ref, b, h, j, n_rows, True)

    def body(t, accs):
      i = entry(idx_ref, t)
      start = pl.multiple_of(i * bq, bq)
      q = q_ref[pl.ds(start, bq), h, :]
      do = do_ref[pl.ds(start, bq), h, :]
      lse = lse_ref[h, pl.ds(start, bq)][None, :]
      delta = delta_ref[h, pl.ds(start, bq)][None, :]

      def update(masked, accs):
        dk, dv = accs
        _record(record, "dkv", b, h, i, j, masked)
        s, th = _logits(k, q, scale, soft_cap)  # [bk, bq]
        q_idx = (start + lax.iota(jnp.int32, bq))[None, :]
        seg = (kvseg[:, None] == qseg_ref[pl.ds(start, bq)][None, :]) if has_segments else None
        tile = tiles_ref[entry(tid_ref, t)] if (masked and mask.use_tiles) else None
        vis = _visibility(mask, masked, tile, q_idx, kv_idx, head, seg, (bk, bq))
        p = jnp.exp(s - lse)
        if vis is not None:
          p = jnp.where(vis, p, 0.0)
        dv = dv + lax.dot_general(p.astype(do.dtype), do, _NN, preferred_element_type=jnp.float32)
        dp = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta)
        if th is not None:
          ds = ds * (1.0 - th * th)
        dk = dk + scale * lax.dot_general(ds.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32)
        return dk, dv

      return _select(mask, entry(kind_ref, t), update, accs)

    return lax.fori_loop(first, end, body, accs)

  dk, dv = lax.fori_loop(0, group, head_body,
                         (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_rows(lse, delta):
  # The kernels read one query row's statistics per head as a contiguous [bq] slice.
  return lse.transpose(0, 2, 1), delta.transpose(0, 2, 1)


def flash_dq(q, k, v, q_seg, kv_seg, head_offset, rows: fc.Lists, tiles, lse, do, delta, *,
             mask: fc.MaskSpec, scale: float, soft_cap, block_q: int, block_kv: int,
             interpret: bool, record: Callable | None = None, num_warps: int = 4,
             num_stages: int = 2):
  """dQ of the backward pass; the arguments of :func:`pallas_kernels.flash_tpu.flash_bwd`.

  ``rows`` are the row lists (:class:`~pallas_kernels.flash_common.Lists`) of a BlockMask with
  blocks ``(block_q, block_kv)``, ``tiles`` its tile table; the dQ and dK/dV
  kernels may use different blocks (each gets its own schedule), so that each holds in registers
  only what it can afford.
  """
  b, tq, hq, d = q.shape
  _, tk, hkv, dv = v.shape
  group = hq // hkv
  bq, bk = block_q, block_kv
  has_segments = q_seg is not None
  lse_t, delta_t = _bwd_rows(lse, delta)
  arrays, specs = _schedule_specs(rows)
  in_specs = specs + [_full((1,)),
                      pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0)),
                      pl.BlockSpec((None, tk, None, d), lambda i, bi, h: (bi, 0, h // group, 0)),
                      pl.BlockSpec((None, tk, None, dv), lambda i, bi, h: (bi, 0, h // group, 0)),
                      pl.BlockSpec((None, bq, None, dv), lambda i, bi, h: (bi, i, h, 0)),
                      pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i)),
                      pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i))]
  args = arrays + [head_offset, q, k, v, do, lse_t, delta_t]
  if has_segments:
    in_specs += [pl.BlockSpec((None, bq), lambda i, bi, h: (bi, i)),
                 pl.BlockSpec((None, tk), lambda i, bi, h: (bi, 0))]
    args += [q_seg, kv_seg]
  if mask.use_tiles:
    in_specs.append(_full(tiles.shape))
    args.append(tiles)
  return pl.pallas_call(
      functools.partial(flash_dq_kernel, mask=mask, scale=scale, soft_cap=soft_cap, block_q=bq,
                        block_kv=bk, n_rows=tq // bq, has_segments=has_segments,
                        record=record if interpret else None),
      grid=(tq // bq, b, hq),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(num_warps, num_stages),
      interpret=interpret,
      name="flash_dq_gpu",
  )(*args)


def flash_dkv(q, k, v, q_seg, kv_seg, head_offset, cols: fc.Lists, tiles, lse, do, delta, *,
              mask: fc.MaskSpec, scale: float, soft_cap, block_q: int, block_kv: int,
              interpret: bool, record: Callable | None = None, num_warps: int = 4,
              num_stages: int = 2):
  """dK and dV of the backward pass; arguments as :func:`flash_dq`, with the BlockMask's column
  lists ``cols``. Returns ``(dk, dv)``."""
  b, tq, hq, d = q.shape
  _, tk, hkv, dv = v.shape
  group = hq // hkv
  bq, bk = block_q, block_kv
  has_segments = q_seg is not None
  lse_t, delta_t = _bwd_rows(lse, delta)
  arrays, specs = _schedule_specs(cols)
  in_specs = specs + [_full((1,)),
                      pl.BlockSpec((None, tq, hq, d), lambda j, bi, hk: (bi, 0, 0, 0)),
                      pl.BlockSpec((None, bk, None, d), lambda j, bi, hk: (bi, j, hk, 0)),
                      pl.BlockSpec((None, bk, None, dv), lambda j, bi, hk: (bi, j, hk, 0)),
                      pl.BlockSpec((None, tq, hq, dv), lambda j, bi, hk: (bi, 0, 0, 0)),
                      pl.BlockSpec((None, hq, tq), lambda j, bi, hk: (bi, 0, 0)),
                      pl.BlockSpec((None, hq, tq), lambda j, bi, hk: (bi, 0, 0))]
  args = arrays + [head_offset, q, k, v, do, lse_t, delta_t]
  if has_segments:
    in_specs += [pl.BlockSpec((None, tq), lambda j, bi, hk: (bi, 0)),
                 pl.BlockSpec((None, bk), lambda j, bi, hk: (bi, j))]
    args += [q_seg, kv_seg]
  if mask.use_tiles:
    tiles_t = tiles.swapaxes(1, 2)
    in_specs.append(_full(tiles_t.shape))
    args.append(tiles_t)
  return pl.pallas_call(
      functools.partial(flash_dkv_kernel, mask=mask, scale=scale, soft_cap=soft_cap, block_q=bq,
                        block_kv=bk, n_rows=tk // bk, group=group, has_segments=has_segments,
                        record=record if interpret else None),
      grid=(tk // bk, b, hkv),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bk, None, d), lambda j, bi, hk: (bi, j, hk, 0)),
                 pl.BlockSpec((None, bk, None, dv), lambda j, bi, hk: (bi, j, hk, 0))],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(num_warps, num_stages),
      interpret=interpret,
      name="flash_dkv_gpu",
  )(*args)
