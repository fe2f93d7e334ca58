"""Block-sparse flash attention for TPU (Pallas Mosaic lowering), forward and backward.

Layout inside the kernels is head-major (``[B, H, T, D]``, transposed by the wrappers) so that a
tile is a contiguous ``(block, D)`` slab. Every kernel has a grid ``(B, units, steps)`` whose last
axis walks a step schedule (:class:`pallas_kernels.flash_common.Steps`): one step per non-empty
tile, row after row, so that no step is spent on empty tiles or on short rows. The index maps
decode the scalar-prefetched entry of the step to DMA exactly its blocks; an idle step (padding
at the end of a band) repeats the previous blocks, so nothing new is fetched.

* forward: units are query heads, or groups of ``stack`` query heads sharing a K/V head (GQA),
  stacked into one ``[stack * block_q, D]`` operand so that each K/V block is fetched once per
  group. Online softmax in base 2 (the wrapper folds ``scale * log2(e)`` into q), with the
  running max and sum kept lane-dense (``[rows, 128]``, every lane equal) so that they broadcast
  over logits and outputs without lane shuffles. Each ``block_kv`` block is processed in
  ``block_kv_compute`` sub-blocks to bound the live logits. Writes O and the LSE.
* dQ: the same grid and steps.
* dK/dV: units are K/V heads; the steps walk key blocks and, for each, the non-empty query blocks
  of every sub-group of its query heads. Tiles are computed transposed (``k q^T``, keys in
  sublanes) so that every matmul is a plain NN or NT product.

FULL tiles run without the mask; PARTIAL tiles evaluate the predicate from a column of query
positions and a row of key positions, or read their precomputed tile; segment ids apply to every
visited tile. Learned sinks initialise the running max (``m = sink``, ``l = 1``); their gradient
is computed outside from the LSE. Rows without tiles get one EMPTY_ROW step that writes zeros
(and the sink's LSE).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import flash_common as fc

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
LANES = 128
# Start of the running max of a row (in base-2 logits). Masked logits are NEG_INF, half as large
# again, so exp2(NEG_INF - m) is exactly 0 even in rows that have seen no visible key yet; the
# masked entries need no second select after the exponential. No real logit is this small.
M_FLOOR = 0.5 * fc.NEG_INF

_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Static tiling of the TPU kernels.

  Attributes:
    block_q: query rows per head per step (the BlockMask's query block).
    block_kv: keys per step (the BlockMask's key block, one DMA).
    block_kv_compute: keys per inner compute sub-block; divides ``block_kv``.
    stack: query heads of one GQA group stacked per step (1 for head-dependent masks).
    block_q_compute: query rows per compute sub-block (divides ``block_q``; None: all of them).
      Only without stacking. With sub-blocks along both axes, a PARTIAL tile on a diagonal
      skips its empty quarter and computes its full one without the mask.
    vmem_limit_bytes: scoped VMEM limit passed to Mosaic, or None for its default.
    fused_bwd: one backward kernel over the column steps computes dK, dV and dQ (dQ accumulated
      in float32 HBM by read-modify-write DMAs), instead of separate dQ and dK/dV kernels: five
      matmuls per tile instead of seven.
  """

  block_q: int
  block_kv: int
  block_kv_compute: int
  stack: int = 1
  block_q_compute: int | None = None
  vmem_limit_bytes: int | None = None
  fused_bwd: bool = False

  @property
  def row_chunk(self) -> int:
    return self.block_q_compute or self.block_q

  @property
  def sub_grid(self) -> tuple[int, int]:
    """Compute sub-blocks of a tile: (query chunks, key chunks)."""
    return self.block_q // self.row_chunk, self.block_kv // self.block_kv_compute


def _div(x, d: int):
  # Truncating division of a non-negative index: floor division of signed ints lowers with a
  # chip-specific sign correction.
  return x if d == 1 else lax.div(x, jnp.int32(d))


def _interpret_params(interpret: bool):
  # Eager DMAs: the kernels issue no manual copies, and it is about 1.5x faster to interpret.
  return pltpu.InterpretParams(dma_execution_mode="eager") if interpret else False


def _compiler_params(blocks: Blocks):
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                              vmem_limit_bytes=blocks.vmem_limit_bytes)


def _lanes(x, width):
  """A lane-dense ``[rows, 128]`` statistic (all lanes equal) widened or cut to ``width`` lanes."""
  if width == LANES:
    return x
  if width % LANES == 0:
    return jnp.tile(x, (1, width // LANES))
  if width < LANES:
    return x[:, :width]
  return jnp.broadcast_to(x[:, :1], (x.shape[0], width))


def _column(row):
  """``[1, n]`` row vector -> ``[n, 128]`` lane-dense column (one transpose per call)."""
  return jnp.transpose(jnp.broadcast_to(row, (LANES, row.shape[1])))


def _stacked(x, stack):
  """``[stack, n, ...]`` block -> ``[stack * n, ...]`` operand."""
  return x.reshape((stack * x.shape[1],) + x.shape[2:]) if stack > 1 else x[0]


def _record(record, phase, b, h, i, j, masked):
  if record is not None:
    jax.debug.callback(record, phase, b, h, i, j, jnp.bool_(masked))


def _cap(s, soft_cap):
  """Soft-cap of base-2 logits; returns the capped logits and tanh (None without a cap)."""
  if soft_cap is None:
    return s, None
  cap2 = soft_cap * LOG2E
  th = jnp.tanh(s * (1.0 / cap2))
  return cap2 * th, th


def _visibility(mask: fc.MaskSpec, masked: bool, tile, q_pos, kv_pos, head, seg, shape):
  """Boolean visibility of a (sub-)tile, or None when every pair is visible.

  ``q_pos`` and ``kv_pos`` are a column and a row (or a row and a column, for transposed tiles)
  of positions; the predicate broadcasts them. The predicate (or the precomputed tile) applies
  only to PARTIAL tiles (``masked``); segment ids apply to every tile.
  """
  vis = None
  if masked:
    if mask.use_tiles:
      # Widened before the comparison: TPU v4 has no int8 vector compare (Mosaic cannot
      # legalize arith.cmpi on i8 vectors there); v5e and later accept both.
      vis = tile.astype(jnp.int32) != 0
    else:
      vis = jnp.broadcast_to(mask.predicate(q_pos, kv_pos, head), shape)
  if seg is not None:
    vis = seg if vis is None else vis & seg
  return vis


def _run_kinds(mask: fc.MaskSpec, kind, fn):
  """Runs ``fn(masked)`` for the tile kinds that can occur, selecting on ``kind`` at run time."""
  if mask.has_full:
    pl.when(kind == fc.FULL)(lambda: fn(False))
  if mask.has_partial:
    pl.when(kind == fc.PARTIAL)(lambda: fn(True))


def _entry(layout: fc.EntryLayout, words, unit_map_ref, unit, s, capacity):
  e = layout.decode(words, unit_map_ref[unit] * capacity + s)
  for name in ("row", "col", "g", "tile"):
    e.setdefault(name, jnp.int32(0))
  return e


def _chunk(blocks: Blocks, r: int):
  """Rows of query chunk ``r`` in the stacked ``[stack * block_q, ...]`` operand."""
  n = blocks.row_chunk * blocks.stack
  return slice(r * n, (r + 1) * n)


def _q_rows(ref, blocks: Blocks, r: int):
  """Query chunk ``r`` of a ``[stack, block_q, X]`` block as a ``[rows, X]`` operand."""
  if blocks.stack == 1:
    return ref[0, _chunk(blocks, r), :]
  return _stacked(ref[...], blocks.stack)


def _row_subtile(mask: fc.MaskSpec, masked: bool, r: int, c: int, q, k_ref, i, j, head, blocks: Blocks,
                 soft_cap, qseg_ref, kvseg_ref, tile_ref):
  """Compute sub-block ``(r, c)`` of a forward / dQ step: ``(keys slice, base-2 logits [rows,
  bkc], tanh of the soft-cap or None, visibility or None)``."""
  bq, bk, bkc, gs = blocks.block_q, blocks.block_kv, blocks.block_kv_compute, blocks.stack
  bqc = blocks.row_chunk
  rs = _chunk(blocks, r)
  q_pos = i * bq + r * bqc + lax.broadcasted_iota(jnp.int32, (bqc, 1), 0)   # [bqc, 1]
  qseg = qseg_ref[rs, :] if qseg_ref is not None else None
  if gs > 1:
    q_pos = jnp.tile(q_pos, (gs, 1))
    qseg = None if qseg is None else jnp.tile(qseg, (gs, 1))
  sl = slice(c * bkc, (c + 1) * bkc)
  s_, th = _cap(lax.dot_general(q, k_ref[sl, :], _NT, preferred_element_type=jnp.float32), soft_cap)
  kv_pos = j * bk + c * bkc + lax.broadcasted_iota(jnp.int32, (1, bkc), 1)
  seg = (qseg == kvseg_ref[:, sl]) if qseg is not None else None
  tile = None
  if masked and mask.use_tiles:
    tile = tile_ref[rs, sl] if gs == 1 else jnp.tile(tile_ref[:, sl], (gs, 1))
  return sl, s_, th, _visibility(mask, masked, tile, q_pos, kv_pos, head, seg, (gs * bqc, bkc))


def _per_sub_block(layout: fc.EntryLayout, e, masked: bool, blocks: Blocks, fn):
  """Runs ``fn(r, c, masked)`` for the compute sub-blocks (query chunk ``r``, key chunk ``c``)
  of a step. On a PARTIAL tile whose entry carries sub-block kinds, empty sub-blocks are skipped
  and full ones computed unmasked."""
  n_r, n_c = blocks.sub_grid
  for r in range(n_r):
    for c in range(n_c):
      if not masked or not layout.has("sub"):
        fn(r, c, masked)
        continue
      kind = lax.shift_right_logical(e["sub"], jnp.int32(2 * (r * n_c + c))) & 3
      pl.when(kind == fc.PARTIAL)(functools.partial(fn, r, c, True))
      pl.when(kind == fc.FULL)(functools.partial(fn, r, c, False))


def _visit(mask: fc.MaskSpec, layout: fc.EntryLayout, e, blocks: Blocks, sub_update, record, phase, b,
           heads, i, j):
  """Runs a forward / dQ step's tile: ``sub_update(r, c, masked)`` per compute sub-block, for the
  tile kinds that can occur (recording the visit of each head in ``heads`` in interpret mode)."""
  def update(masked):
    for h in heads:
      _record(record, phase, b, h, i, j, masked)
    _per_sub_block(layout, e, masked, blocks, sub_update)

  _run_kinds(mask, e["kind"], update)


def flash_fwd_kernel(*refs, layout: fc.EntryLayout, capacity: int, mask: fc.MaskSpec, soft_cap,
                     blocks: Blocks, group: int, has_sinks: bool, has_segments: bool, record):
  nw = len(layout.word_bits)
  words, unit_map_ref, off_ref = refs[:nw], refs[nw], refs[nw + 1]
  rest = list(refs[nw + 2:])
  q_ref, k_ref, v_ref = rest[:3]
  rest = rest[3:]
  sinks_ref = rest.pop(0) if has_sinks else None
  qseg_ref, kvseg_ref = (rest.pop(0), rest.pop(0)) if has_segments else (None, None)
  tile_ref = rest.pop(0) if mask.use_tiles else None
  # Aliased output buffers (banded calls) come before the outputs and are not read.
  o_ref, lse_ref, m_ref, l_ref, acc_ref = rest[-5:]

  bq, bk, bkc, gs = blocks.block_q, blocks.block_kv, blocks.block_kv_compute, blocks.stack
  rows = gs * bq
  dv = acc_ref.shape[-1]
  b, u, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  e = _entry(layout, words, unit_map_ref, u, s, capacity)
  i, j = e["row"], e["col"]
  head = off_ref[0] + u * gs  # first global query head of the unit

  @pl.when(e["first"] == 1)
  def init():
    acc_ref[...] = jnp.zeros_like(acc_ref)
    if has_sinks:
      # Sinks are per head: fill each stacked head's rows with its own sink (log2 units).
      for g in range(gs):
        m_ref[g * bq:(g + 1) * bq, :] = jnp.full((bq, LANES), sinks_ref[u * gs + g] * LOG2E, jnp.float32)
      l_ref[...] = jnp.ones_like(l_ref)
    else:
      m_ref[...] = jnp.full(m_ref.shape, M_FLOOR, jnp.float32)
      l_ref[...] = jnp.zeros_like(l_ref)

  def sub_update(r, c, masked):
    rs = _chunk(blocks, r)
    q = _q_rows(q_ref, blocks, r)                                  # [rows, D], pre-scaled
    sl, s_, _, vis = _row_subtile(mask, masked, r, c, q, k_ref, i, j, head, blocks, soft_cap,
                                  qseg_ref, kvseg_ref, tile_ref)
    if vis is not None:
      # One select: the running max never drops below M_FLOOR, so exp2(NEG_INF - m) is 0.
      s_ = jnp.where(vis, s_, fc.NEG_INF)
    m_prev = m_ref[rs, :]
    m_new = jnp.maximum(m_prev, s_.max(axis=1, keepdims=True))  # [rows, 128]
    alpha = jnp.exp2(m_prev - m_new)
    p = jnp.exp2(s_ - _lanes(m_new, bkc))
    m_ref[rs, :] = m_new
    l_ref[rs, :] = alpha * l_ref[rs, :] + p.sum(axis=1, keepdims=True)
    pv = lax.dot_general(p.astype(v_ref.dtype), v_ref[sl, :], _NN, preferred_element_type=jnp.float32)
    acc_ref[rs, :] = _lanes(alpha, dv) * acc_ref[rs, :] + pv

  _visit(mask, layout, e, blocks, sub_update, record, "fwd", b, [u * gs + g for g in range(gs)], i, j)

  @pl.when(e["last"] == 1)
  def finish():
    l = l_ref[...]
    positive = l > 0
    safe = jnp.where(positive, l, 1.0)
    o = acc_ref[...] * _lanes(1.0 / safe, dv)
    for g in range(gs):
      o_ref[g] = o[g * bq:(g + 1) * bq].astype(o_ref.dtype)
    # Natural-log LSE, one transpose per row of blocks to store it as a row.
    lse = jnp.where(positive, (m_ref[...] + jnp.log2(safe)) * LN2, -jnp.inf)
    lse_t = jnp.transpose(lse)                                      # [128, rows]
    for g in range(gs):
      lse_ref[g] = lse_t[0:1, g * bq:(g + 1) * bq]


def _banded(call, words_all, num_bands: int, outs_init):
  """Runs ``call(words, outs)`` once per band, the outputs threaded through and aliased.

  With one band the kernel runs once on fresh outputs (``outs=None``).
  """
  if num_bands == 1:
    return call(tuple(w[0] for w in words_all), None)

  def body(band, outs):
    words = tuple(lax.dynamic_index_in_dim(w, band, 0, keepdims=False) for w in words_all)
    return tuple(call(words, outs))

  return lax.fori_loop(0, num_bands, body, tuple(outs_init))


class _RowMaps:
  """Index maps of the forward and dQ grids ``(batch, unit, step)``: the step's entry names the
  query block (``row``), the key block (``col``) and the tile."""

  def __init__(self, layout: fc.EntryLayout, capacity: int, stack: int, group: int):
    self.layout, self.capacity, self.stack, self.group = layout, capacity, stack, group
    self.nw = len(layout.word_bits)

  def entry(self, u, s, refs):
    return _entry(self.layout, refs[:self.nw], refs[self.nw], u, s, self.capacity)

  def q(self, bi, u, s, *refs):        # [B, units, stack, T, X]
    return bi, u, 0, self.entry(u, s, refs)["row"], 0

  def kv(self, bi, u, s, *refs):       # [B, Hkv, T, X]
    return bi, _div(u * self.stack, self.group), self.entry(u, s, refs)["col"], 0

  def rows(self, bi, u, s, *refs):     # [B, units, stack, 1, T]
    return bi, u, 0, 0, self.entry(u, s, refs)["row"]

  def q_seg(self, bi, u, s, *refs):    # [B, Tq, 1]
    return bi, self.entry(u, s, refs)["row"], 0

  def kv_seg(self, bi, u, s, *refs):   # [B, 1, Tk]
    return bi, 0, self.entry(u, s, refs)["col"]

  def tile(self, bi, u, s, *refs):     # [U, bq, bk]
    return self.entry(u, s, refs)["tile"], 0, 0


class _ColMaps:
  """Index maps of the dK/dV grid ``(batch, K/V head, step)``: the step's entry names the key
  block (``row``, owned by the step's row of steps), the query block (``col``) and the sub-group
  ``g`` of the K/V head's query heads."""

  def __init__(self, layout: fc.EntryLayout, capacity: int, subs: int):
    self.layout, self.capacity, self.subs = layout, capacity, subs
    self.nw = len(layout.word_bits)

  def entry(self, hk, s, refs):
    return _entry(self.layout, refs[:self.nw], refs[self.nw], hk, s, self.capacity)

  def kv_own(self, bi, hk, s, *refs):  # [B, Hkv, Tk, X]
    return bi, hk, self.entry(hk, s, refs)["row"], 0

  def q(self, bi, hk, s, *refs):       # [B, units, stack, Tq, X]
    e = self.entry(hk, s, refs)
    return bi, hk * self.subs + e["g"], 0, e["col"], 0

  def rows(self, bi, hk, s, *refs):    # [B, units, stack, 1, Tq]
    e = self.entry(hk, s, refs)
    return bi, hk * self.subs + e["g"], 0, 0, e["col"]

  def q_seg(self, bi, hk, s, *refs):   # [B, 1, Tq]
    return bi, 0, self.entry(hk, s, refs)["col"]

  def kv_seg(self, bi, hk, s, *refs):  # [B, Tk, 1]
    return bi, self.entry(hk, s, refs)["row"], 0

  def tile(self, bi, hk, s, *refs):    # [U, bk, bq]
    return self.entry(hk, s, refs)["tile"], 0, 0


def _scaled_units(q, scale: float, stack: int):
  """``[B, T, Hq, D]`` -> ``[B, Hq // stack, stack, T, D]`` scaled by ``scale * log2(e)`` (the
  kernels' softmax is in base 2)."""
  b, t, hq, d = q.shape
  qs = (q.astype(jnp.float32) * (scale * LOG2E)).astype(q.dtype)
  return qs.transpose(0, 2, 1, 3).reshape(b, hq // stack, stack, t, d)


def _any_spec():
  return pl.BlockSpec(memory_space=pl.ANY)


def flash_fwd(q, k, v, sinks, q_seg, kv_seg, head_offset, sched: fc.Steps, tiles, *,
              layout: fc.EntryLayout, capacity: int, mask: fc.MaskSpec, scale: float, soft_cap,
              blocks: Blocks, interpret: bool, record: Callable | None = None):
  """Forward pass.

  Args:
    q: ``[B, Tq, Hq, D]``; k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]``, with ``Tq`` and ``Tk``
      multiples of ``block_q`` / ``block_kv`` (the caller pads).
    sinks: ``[Hq]`` float32 or None. q_seg / kv_seg: ``[B, Tq]`` / ``[B, Tk]`` int32 or None.
    head_offset: ``[1]`` int32 global index of the first local query head (non-zero inside a
      head-sharded shard_map), for head-dependent predicates.
    sched: the row schedule (words ``[num_bands, L * capacity]``, unit map of the local units).
    tiles: ``[U, block_q, block_kv]`` int8 tile table when ``mask.use_tiles``, else unused.
    layout, capacity: the schedule's entry layout and list length per band.
    mask: how to mask PARTIAL tiles; blocks: the tiling.

  Returns:
    ``o [B, Tq, Hq, Dv]`` in q's dtype and ``lse [B, Tq, Hq]`` float32 (``-inf`` for rows that
    see nothing and have no sink).
  """
  b, tq, hq, d = q.shape
  _, tk, hkv, dv = v.shape
  group = hq // hkv
  bq, bk, gs = blocks.block_q, blocks.block_kv, blocks.stack
  units = hq // gs
  nw = len(layout.word_bits)
  steps = capacity
  words_all, unit_map = sched
  maps = _RowMaps(layout, capacity, gs, group)
  in_specs = [pl.BlockSpec((None, None, gs, bq, d), maps.q), pl.BlockSpec((None, None, bk, d), maps.kv),
              pl.BlockSpec((None, None, bk, dv), maps.kv)]
  args = [_scaled_units(q, scale, gs), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)]
  if sinks is not None:
    in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    args.append(sinks.astype(jnp.float32))
  if q_seg is not None:
    in_specs += [pl.BlockSpec((None, bq, 1), maps.q_seg), pl.BlockSpec((None, 1, bk), maps.kv_seg)]
    args += [q_seg[:, :, None], kv_seg[:, None, :]]
  if mask.use_tiles:
    in_specs.append(pl.BlockSpec((None, bq, bk), maps.tile))
    args.append(tiles)
  out_specs = [pl.BlockSpec((None, None, gs, bq, dv), maps.q),
               pl.BlockSpec((None, None, gs, 1, bq), maps.rows)]
  out_shape = [jax.ShapeDtypeStruct((b, units, gs, tq, dv), q.dtype),
               jax.ShapeDtypeStruct((b, units, gs, 1, tq), jnp.float32)]
  kernel = functools.partial(
      flash_fwd_kernel, layout=layout, capacity=capacity, mask=mask, soft_cap=soft_cap,
      blocks=blocks, group=group, has_sinks=sinks is not None, has_segments=q_seg is not None,
      record=record if interpret else None)
  rows = gs * bq
  scratch = [pltpu.VMEM((rows, LANES), jnp.float32), pltpu.VMEM((rows, LANES), jnp.float32),
             pltpu.VMEM((rows, dv), jnp.float32)]

  def call(words, outs):
    specs, extra, aliases = list(in_specs), [], {}
    if outs is not None:
      n_prefetch = nw + 2
      base = n_prefetch + len(args)
      specs += [_any_spec(), _any_spec()]
      extra = list(outs)
      aliases = {base: 0, base + 1: 1}
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=nw + 2, grid=(b, units, steps), in_specs=specs,
            out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_compiler_params(blocks),
        interpret=_interpret_params(interpret),
        name="flash_fwd_tpu",
    )(*words, unit_map, head_offset, *args, *extra)

  outs_init = [jnp.zeros(s.shape, s.dtype) for s in out_shape]
  o, lse = _banded(call, words_all, words_all[0].shape[0], outs_init)
  o = o.reshape(b, hq, tq, dv).transpose(0, 2, 1, 3)
  lse = lse.reshape(b, hq, tq).transpose(0, 2, 1)
  return o, lse


def _bwd_refs(refs, layout: fc.EntryLayout, has_segments: bool, use_tiles: bool):
  """Splits the refs of the dQ and dK/dV kernels: ``(words, unit_map, head_offset, (q, k, v, do,
  lse, delta), qseg, kvseg, tile, outputs and scratch)``; aliased output buffers (banded calls)
  sit between the inputs and the outputs and are dropped by the callers' negative indexing."""
  nw = len(layout.word_bits)
  rest = list(refs[nw + 2:])
  tensors, rest = rest[:6], rest[6:]
  qseg, kvseg = (rest.pop(0), rest.pop(0)) if has_segments else (None, None)
  tile = rest.pop(0) if use_tiles else None
  return refs[:nw], refs[nw], refs[nw + 1], tensors, qseg, kvseg, tile, rest


def flash_dq_kernel(*refs, layout: fc.EntryLayout, capacity: int, mask: fc.MaskSpec, soft_cap,
                    scale: float, blocks: Blocks, has_segments: bool, record):
  words, unit_map_ref, off_ref, tensors, qseg_ref, kvseg_ref, tile_ref, rest = _bwd_refs(
      refs, layout, has_segments, mask.use_tiles)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = tensors
  dq_ref, acc_ref, lse_sc, delta_sc = rest[-4:]

  bq, bk, bkc, gs = blocks.block_q, blocks.block_kv, blocks.block_kv_compute, blocks.stack
  rows = gs * bq
  b, u, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  e = _entry(layout, words, unit_map_ref, u, s, capacity)
  i, j = e["row"], e["col"]
  head = off_ref[0] + u * gs

  @pl.when(e["first"] == 1)
  def init():
    acc_ref[...] = jnp.zeros_like(acc_ref)
    # The row statistics arrive as rows; make them lane-dense columns once per query block.
    for g in range(gs):
      lse_sc[g * bq:(g + 1) * bq, :] = _column(lse_ref[g])
      delta_sc[g * bq:(g + 1) * bq, :] = _column(delta_ref[g])

  def sub_update(r, c, masked):
    rs = _chunk(blocks, r)
    q = _q_rows(q_ref, blocks, r)
    do = _q_rows(do_ref, blocks, r)
    sl, s_, th, vis = _row_subtile(mask, masked, r, c, q, k_ref, i, j, head, blocks, soft_cap,
                                   qseg_ref, kvseg_ref, tile_ref)
    k = k_ref[sl, :]
    if vis is not None:
      s_ = jnp.where(vis, s_, fc.NEG_INF)
    p = jnp.exp2(s_ - _lanes(lse_sc[rs, :], bkc))
    dp = lax.dot_general(do, v_ref[sl, :], _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(delta_sc[rs, :], bkc))
    if th is not None:
      ds = ds * (1.0 - th * th)
    acc_ref[rs, :] += lax.dot_general(ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32)

  _visit(mask, layout, e, blocks, sub_update, record, "dq", b, [u * gs + g for g in range(gs)], i, j)

  @pl.when(e["last"] == 1)
  def finish():
    dq = acc_ref[...] * scale
    for g in range(gs):
      dq_ref[g] = dq[g * bq:(g + 1) * bq].astype(dq_ref.dtype)


def flash_dkv_kernel(*refs, layout: fc.EntryLayout, capacity: int, mask: fc.MaskSpec, soft_cap,
                     scale: float, blocks: Blocks, group: int, has_segments: bool, fused: bool, record):
  """dK/dV over the column steps; with ``fused``, dQ too (see :func:`_dq_exchange`)."""
  words, unit_map_ref, off_ref, tensors, qseg_ref, kvseg_ref, tile_ref, rest = _bwd_refs(
      refs, layout, has_segments, mask.use_tiles)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = tensors
  if fused:
    dk_ref, dv_ref, dq_hbm, dk_acc, dv_acc, dq_buf, sems = rest[-7:]
  else:
    dk_ref, dv_ref, dk_acc, dv_acc = rest[-4:]

  bq, bk, bkc, gs = blocks.block_q, blocks.block_kv, blocks.block_kv_compute, blocks.stack
  rows = gs * bq
  b, hk, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  e = _entry(layout, words, unit_map_ref, hk, s, capacity)
  j, i, g, kind = e["row"], e["col"], e["g"], e["kind"]
  head = off_ref[0] + hk * group + g * gs

  @pl.when(e["first"] == 1)
  def init():
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)

  exchange = None
  if fused:
    exchange = _dq_exchange(layout, words, unit_map_ref, hk, s, capacity, b, group // gs, bq, dq_hbm,
                            dq_buf, sems)
    exchange.before()

  def sub_update(r, c, masked):
    bqc = blocks.row_chunk
    q = _q_rows(q_ref, blocks, r)                                  # [rows, D]
    do = _q_rows(do_ref, blocks, r)                                # [rows, Dv]
    if gs == 1:
      cols = _chunk(blocks, r)
      lse, delta = lse_ref[0, :, cols], delta_ref[0, :, cols]     # [1, rows]
      qseg = qseg_ref[:, cols] if has_segments else None
    else:
      lse = jnp.concatenate([lse_ref[x] for x in range(gs)], axis=1)
      delta = jnp.concatenate([delta_ref[x] for x in range(gs)], axis=1)
      qseg = jnp.tile(qseg_ref[...], (1, gs)) if has_segments else None
    q_pos = i * bq + r * bqc + lax.broadcasted_iota(jnp.int32, (1, bqc), 1)   # [1, bqc]
    if gs > 1:
      q_pos = jnp.tile(q_pos, (1, gs))
    sl = slice(c * bkc, (c + 1) * bkc)
    k = k_ref[sl, :]
    v = v_ref[sl, :]
    # Transposed tile: keys in rows, queries in columns.
    s_, th = _cap(lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32), soft_cap)
    kv_pos = j * bk + c * bkc + lax.broadcasted_iota(jnp.int32, (bkc, 1), 0)
    seg = (kvseg_ref[sl, :] == qseg) if has_segments else None
    tile = None
    if masked and mask.use_tiles:
      tile = tile_ref[sl, _chunk(blocks, r)] if gs == 1 else jnp.tile(tile_ref[sl, :], (1, gs))
    vis = _visibility(mask, masked, tile, q_pos, kv_pos, head, seg, (bkc, q.shape[0]))
    if vis is not None:
      s_ = jnp.where(vis, s_, fc.NEG_INF)
    p = jnp.exp2(s_ - lse)
    dv_acc[sl, :] += lax.dot_general(p.astype(do.dtype), do, _NN, preferred_element_type=jnp.float32)
    dp = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta)
    if th is not None:
      ds = ds * (1.0 - th * th)
    ds = ds.astype(q.dtype)
    dk_acc[sl, :] += lax.dot_general(ds, q, _NN, preferred_element_type=jnp.float32)
    if fused:
      dq = lax.dot_general(ds, k, _TN, preferred_element_type=jnp.float32)   # [rows, D]
      exchange.accumulate((dq * scale).reshape(gs, -1, dq.shape[-1]), _chunk(blocks, r) if gs == 1 else None)

  def update(masked):
    for gg in range(gs):
      h = hk * group + g * gs + gg
      _record(record, "dkv", b, h, i, j, masked)
      if fused:
        _record(record, "dq", b, h, i, j, masked)
    _per_sub_block(layout, e, masked, blocks, sub_update)

  _run_kinds(mask, kind, update)
  if fused:
    exchange.after()

  @pl.when(e["last"] == 1)
  def finish():
    # q was scaled by scale * log2(e); dK needs scale alone.
    dk_ref[...] = (dk_acc[...] * (1.0 / LOG2E)).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


class _dq_exchange:
  """dQ accumulation of the fused backward: a read-modify-write of float32 dQ blocks in HBM.

  The column steps visit the query blocks of a key block in turn, so each step adds its tile's
  contribution to a different dQ block. Two VMEM buffers alternate by step parity: while step
  ``s`` computes, its block has been read into its buffer (started by step ``s - 1``); it then
  writes the block back and starts reading the block of step ``s + 1`` into the other buffer.
  Ordering rules, all from the entries of steps ``s - 1``, ``s`` and ``s + 1``:

  * the write of step ``s - 1`` is waited for during step ``s`` (before the other buffer is
    refilled, and before step ``s`` writes if both steps hold the same block);
  * consecutive steps on the same block pass it on in VMEM instead of through HBM;
  * the first step of a grid row reads its own block; the last waits for its write.
  """

  def __init__(self, layout, words, unit_map_ref, hk, s, capacity, b, subs, bq, dq_hbm, dq_buf, sems):
    self.s, self.last_step = s, capacity - 1
    self.buf, self.slot, self.other = dq_buf, s % 2, 1 - s % 2

    def info(t, valid):
      e = _entry(layout, words, unit_map_ref, hk, t, capacity)
      need = ((e["kind"] == fc.FULL) | (e["kind"] == fc.PARTIAL)) & valid
      return need, hk * subs + e["g"], e["col"]

    self.need, self.unit, self.i = info(s, True)
    self.need_p, unit_p, i_p = info(jnp.maximum(s - 1, 0), s >= 1)
    self.need_n, unit_n, i_n = info(jnp.minimum(s + 1, capacity - 1), s + 1 < capacity)
    self.same = self.need & self.need_p & (self.unit == unit_p) & (self.i == i_p)
    self.same_n = self.need_n & self.need & (unit_n == self.unit) & (i_n == self.i)

    def block(unit, i):
      return dq_hbm.at[b, unit, :, pl.ds(i * bq, bq), :]

    self.read = lambda slot, unit, i: pltpu.make_async_copy(block(unit, i), dq_buf.at[slot], sems.at[0, slot])
    self.write = lambda slot, unit, i: pltpu.make_async_copy(dq_buf.at[slot], block(unit, i), sems.at[1, slot])
    self.prev, self.next = (unit_p, i_p), (unit_n, i_n)

  def before(self):
    pl.when((self.s == 0) & self.need)(lambda: self.read(self.slot, self.unit, self.i).start())
    pl.when(self.same)(lambda: self.write(self.other, *self.prev).wait())
    pl.when(self.need & ~self.same)(lambda: self.read(self.slot, self.unit, self.i).wait())

  def accumulate(self, dq, rows=None):
    if rows is None:
      self.buf[self.slot] += dq
    else:
      self.buf[self.slot, :, rows, :] += dq

  def after(self):
    pl.when(self.need)(lambda: self.write(self.slot, self.unit, self.i).start())
    pl.when(self.need_p & ~self.same)(lambda: self.write(self.other, *self.prev).wait())

    @pl.when(self.same_n)
    def _():
      self.buf[self.other] = self.buf[self.slot]

    pl.when(self.need_n & ~self.same_n)(lambda: self.read(self.other, *self.next).start())
    pl.when((self.s == self.last_step) & self.need)(lambda: self.write(self.slot, self.unit, self.i).wait())


def flash_bwd(q, k, v, q_seg, kv_seg, head_offset, row_sched: fc.Steps, col_sched: fc.Steps, tiles,
              lse, do, delta, *, row_layout: fc.EntryLayout, row_capacity: int,
              col_layout: fc.EntryLayout, col_capacity: int, mask: fc.MaskSpec, scale: float,
              soft_cap, blocks: Blocks, interpret: bool, record: Callable | None = None):
  """Backward pass: ``(dq, dk, dv)`` in the dtypes of ``q, k, v``.

  Args:
    q, k, v, q_seg, kv_seg, head_offset, tiles: as in :func:`flash_fwd`.
    row_sched: the forward's row schedule (dQ pass); col_sched: the column schedule (dK/dV pass),
      whose units are the local K/V heads.
    lse: ``[B, Tq, Hq]`` float32 from the forward pass, with rows that must not contribute
      (padding, rows that saw nothing) set to ``+inf`` by the caller.
    do: ``[B, Tq, Hq, Dv]`` output cotangent (zero on padded rows).
    delta: ``[B, Tq, Hq]`` float32, ``sum(do * o, -1) - dlse``.
  """
  b, tq, hq, d = q.shape
  _, tk, hkv, dv = v.shape
  group = hq // hkv
  bq, bk, gs = blocks.block_q, blocks.block_kv, blocks.stack
  units = hq // gs
  has_segments = q_seg is not None
  record = record if interpret else None

  def stack_heads(x):                     # [B, T, Hq, X] -> [B, Hq // gs, gs, T, X]
    return x.transpose(0, 2, 1, 3).reshape(b, units, gs, x.shape[1], x.shape[3])

  def stack_rows(x):                      # [B, T, Hq] -> [B, Hq // gs, gs, 1, T]
    return x.transpose(0, 2, 1).reshape(b, units, gs, 1, x.shape[1])

  qt = _scaled_units(q, scale, gs)
  kt, vt, dot_ = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), stack_heads(do)
  lse_t = stack_rows(lse * LOG2E)         # base-2 LSE: p = exp2(s - lse) with base-2 logits
  delta_t = stack_rows(delta)

  # dQ: same grid and steps as the forward pass.
  nw = len(row_layout.word_bits)
  maps = _RowMaps(row_layout, row_capacity, gs, group)
  in_specs = [pl.BlockSpec((None, None, gs, bq, d), maps.q), pl.BlockSpec((None, None, bk, d), maps.kv),
              pl.BlockSpec((None, None, bk, dv), maps.kv), pl.BlockSpec((None, None, gs, bq, dv), maps.q),
              pl.BlockSpec((None, None, gs, 1, bq), maps.rows), pl.BlockSpec((None, None, gs, 1, bq), maps.rows)]
  args = [qt, kt, vt, dot_, lse_t, delta_t]
  if has_segments:
    in_specs += [pl.BlockSpec((None, bq, 1), maps.q_seg), pl.BlockSpec((None, 1, bk), maps.kv_seg)]
    args += [q_seg[:, :, None], kv_seg[:, None, :]]
  if mask.use_tiles:
    in_specs.append(pl.BlockSpec((None, bq, bk), maps.tile))
    args.append(tiles)
  fused = blocks.fused_bwd
  dq_shape = jax.ShapeDtypeStruct((b, units, gs, tq, d), jnp.float32 if fused else q.dtype)
  dq_kernel = functools.partial(flash_dq_kernel, layout=row_layout, capacity=row_capacity, mask=mask,
                                soft_cap=soft_cap, scale=scale, blocks=blocks,
                                has_segments=has_segments, record=record)

  def dq_call(words, outs):
    specs, extra, aliases = list(in_specs), [], {}
    if outs is not None:
      specs.append(_any_spec())
      extra = list(outs)
      aliases = {nw + 2 + len(args): 0}
    return (pl.pallas_call(
        dq_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=nw + 2, grid=(b, units, row_capacity), in_specs=specs,
            out_specs=pl.BlockSpec((None, None, gs, bq, d), maps.q),
            scratch_shapes=[pltpu.VMEM((gs * bq, d), jnp.float32),
                            pltpu.VMEM((gs * bq, LANES), jnp.float32),
                            pltpu.VMEM((gs * bq, LANES), jnp.float32)]),
        out_shape=dq_shape,
        input_output_aliases=aliases,
        compiler_params=_compiler_params(blocks),
        interpret=_interpret_params(interpret),
        name="flash_dq_tpu",
    )(*words, row_sched.unit_map, head_offset, *args, *extra),)

  if not fused:
    (dq,) = _banded(dq_call, row_sched.words, row_sched.words[0].shape[0],
                    [jnp.zeros(dq_shape.shape, dq_shape.dtype)])

  # dK/dV: units are K/V heads; steps walk key blocks and their query blocks per sub-group.
  nwc = len(col_layout.word_bits)
  subs = group // gs

  maps_c = _ColMaps(col_layout, col_capacity, subs)
  in_specs = [pl.BlockSpec((None, None, gs, bq, d), maps_c.q), pl.BlockSpec((None, None, bk, d), maps_c.kv_own),
              pl.BlockSpec((None, None, bk, dv), maps_c.kv_own), pl.BlockSpec((None, None, gs, bq, dv), maps_c.q),
              pl.BlockSpec((None, None, gs, 1, bq), maps_c.rows), pl.BlockSpec((None, None, gs, 1, bq), maps_c.rows)]
  args = [qt, kt, vt, dot_, lse_t, delta_t]
  if has_segments:
    in_specs += [pl.BlockSpec((None, 1, bq), maps_c.q_seg), pl.BlockSpec((None, bk, 1), maps_c.kv_seg)]
    args += [q_seg[:, None, :], kv_seg[:, :, None]]
  if mask.use_tiles:
    in_specs.append(pl.BlockSpec((None, bk, bq), maps_c.tile))
    args.append(tiles.swapaxes(1, 2))
  dkv_shapes = [jax.ShapeDtypeStruct((b, hkv, tk, d), k.dtype), jax.ShapeDtypeStruct((b, hkv, tk, dv), v.dtype)]
  out_specs = [pl.BlockSpec((None, None, bk, d), maps_c.kv_own), pl.BlockSpec((None, None, bk, dv), maps_c.kv_own)]
  scratch = [pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, dv), jnp.float32)]
  if fused:
    # dQ lives in HBM (float32) and is read, updated and written back by the kernel's own DMAs.
    dkv_shapes.append(dq_shape)
    out_specs.append(_any_spec())
    scratch += [pltpu.VMEM((2, gs, bq, d), jnp.float32), pltpu.SemaphoreType.DMA((2, 2))]
  dkv_kernel = functools.partial(flash_dkv_kernel, layout=col_layout, capacity=col_capacity, mask=mask,
                                 soft_cap=soft_cap, scale=scale, blocks=blocks, group=group,
                                 has_segments=has_segments, fused=fused, record=record)
  n_out = len(dkv_shapes)

  def dkv_call(words, outs):
    if outs is None and fused:
      outs, alias = [None, None, jnp.zeros(dq_shape.shape, dq_shape.dtype)], [2]
    else:
      alias = [] if outs is None else list(range(n_out))
    base = nwc + 2 + len(args)
    return pl.pallas_call(
        dkv_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=nwc + 2, grid=(b, hkv, col_capacity),
            in_specs=list(in_specs) + [_any_spec() for _ in alias], out_specs=out_specs,
            scratch_shapes=scratch),
        out_shape=dkv_shapes,
        input_output_aliases={base + n: o for n, o in enumerate(alias)},
        compiler_params=_compiler_params(blocks),
        interpret=_interpret_params(interpret),
        name="flash_dkv_tpu",
    )(*words, col_sched.unit_map, head_offset, *args, *[outs[o] for o in alias])

  outs = _banded(dkv_call, col_sched.words, col_sched.words[0].shape[0],
                 [jnp.zeros(x.shape, x.dtype) for x in dkv_shapes])
  dk, dv_ = outs[0], outs[1]
  if fused:
    dq = outs[2].astype(q.dtype)
  dq = dq.reshape(b, hq, tq, d).transpose(0, 2, 1, 3)
  return dq, dk.transpose(0, 2, 1, 3), dv_.transpose(0, 2, 1, 3)
