"""Masks moved to absolute positions: what one device's (query shard, key shard) tile sees.

Under context parallelism a device attends a slice of the queries (global positions
``q_offset + i``) to a slice of the keys (``kv_offset + j``), and, with heads sharded, to a slice
of the heads. Each such call is an ordinary :func:`attn_jax.attention` call on local indices, so
its mask must be the global mask with the offsets added. :func:`shift` builds that mask:

* masks that depend on positions only through differences (full, causal, sliding windows,
  chunked causal on chunk-aligned key offsets) and sink tokens become the same kind of mask
  with a new static offset. Two devices whose tiles sit at the same relative position then get
  *equal* masks, so they share one compiled branch and one BlockMask;
* anything else (block layouts, user predicates, head-dependent masks, neighborhood masks) is
  wrapped in :class:`Shifted`, which adds the offsets before evaluating the wrapped mask and
  keeps its analytic block bounds (they are evaluated on the shifted rectangles), so the local
  BlockMask is still built from bounds and not element by element.

The wrapped mask is evaluated against the global lengths (``MaskContext(q_len, kv_len)`` of
the whole sequence), which the default bottom-right alignment of causal-type masks needs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attn_jax import masks as masks_lib


@dataclasses.dataclass(frozen=True)
class Shifted(masks_lib.Mask):
  """``base`` evaluated at ``(q_idx + q_offset, kv_idx + kv_offset, head + head_offset)``.

  Attributes:
    base: the global mask.
    q_offset, kv_offset, head_offset: static offsets of the local slice (Python ints).
    q_len, kv_len: the global lengths ``base`` is evaluated against.
  """

  base: masks_lib.Mask
  q_offset: int
  kv_offset: int
  head_offset: int
  q_len: int
  kv_len: int

  @property
  def depends_on_head(self):
    return self.base.depends_on_head

  @property
  def in_kernel(self):
    # Adding Python-int constants keeps an in-kernel predicate elementwise.
    return self.base.in_kernel

  @property
  def global_context(self) -> masks_lib.MaskContext:
    return masks_lib.MaskContext(self.q_len, self.kv_len)

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    if head is not None and self.head_offset:
      head = head + self.head_offset
    return self.base.evaluate(q_idx + self.q_offset, kv_idx + self.kv_offset, head,
                              self.global_context, xp)

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    return self.base.block_bounds(q_lo + self.q_offset, q_hi + self.q_offset, k_lo + self.kv_offset,
                                  k_hi + self.kv_offset, self.global_context)

  def block_bounds_exact(self, q_lo, q_hi, k_lo, k_hi, ctx):
    return self.base.block_bounds_exact(q_lo + self.q_offset, q_hi + self.q_offset,
                                        k_lo + self.kv_offset, k_hi + self.kv_offset,
                                        self.global_context)

  def validate(self, ctx):
    # The base mask was validated once against the global lengths; the local slice is smaller.
    pass

  def __repr__(self):
    return (f"shifted({self.base!r}, q+{self.q_offset}, kv+{self.kv_offset}"
            f"{f', head+{self.head_offset}' if self.head_offset else ''})")


def _offset(mask, ctx: masks_lib.MaskContext) -> int:
  return ctx.default_offset if mask.offset is None else mask.offset


def shift(mask: masks_lib.Mask, q_offset: int, kv_offset: int, head_offset: int,
          ctx: masks_lib.MaskContext, q_size: int | None = None, kv_size: int | None = None) -> masks_lib.Mask:
  """The mask of the local tile whose first query is ``q_offset`` and first key ``kv_offset``.

  Args:
    mask: the global mask.
    q_offset, kv_offset: global positions of local index 0.
    head_offset: global index of local query head 0 (0 without head sharding).
    ctx: the global lengths.
    q_size, kv_size: the tile's extent. Given, the parts of ``&`` / ``|`` / ``~`` combinations
      that the block bounds prove never or always visible on the whole tile are dropped, so that
      e.g. ``sliding_window(w) | sink_tokens(n)`` far from the diagonal becomes plain
      ``sink_tokens(n)``, the same mask for every device.

  Returns:
    A mask on local indices, in canonical form where the family allows (see the module doc).
  """
  out = _shift(mask, int(q_offset), int(kv_offset), int(head_offset), ctx)
  if q_size is not None:
    out = _prune(out, int(q_size), int(kv_size))
    visibility = _visibility(out, int(q_size), int(kv_size))
    if visibility == _ALWAYS:
      return masks_lib.Full()
    if visibility == _NEVER:
      return masks_lib.Not(masks_lib.Full())
  return out


_NEVER, _SOMETIMES, _ALWAYS = 0, 1, 2


def _visibility(mask: masks_lib.Mask, q_size: int, kv_size: int) -> int:
  may, must = mask.block_bounds(np.asarray(0), np.asarray(q_size - 1), np.asarray(0), np.asarray(kv_size - 1),
                                masks_lib.MaskContext(q_size, kv_size))
  return _ALWAYS if bool(np.all(must)) else _NEVER if not bool(np.any(may)) else _SOMETIMES


def _prune(mask: masks_lib.Mask, q_size: int, kv_size: int) -> masks_lib.Mask:
  """Drops the parts of combinations that are constant on the ``q_size x kv_size`` tile."""
  never = masks_lib.Not(masks_lib.Full())
  if type(mask) in (masks_lib.And, masks_lib.Or):
    a, b = _prune(mask.a, q_size, kv_size), _prune(mask.b, q_size, kv_size)
    va, vb = _visibility(a, q_size, kv_size), _visibility(b, q_size, kv_size)
    if type(mask) is masks_lib.Or:
      if _ALWAYS in (va, vb):
        return masks_lib.Full()
      return b if va == _NEVER else a if vb == _NEVER else masks_lib.Or(a, b)
    if _NEVER in (va, vb):
      return never
    return b if va == _ALWAYS else a if vb == _ALWAYS else masks_lib.And(a, b)
  if type(mask) is masks_lib.Not:
    a = _prune(mask.a, q_size, kv_size)
    va = _visibility(a, q_size, kv_size)
    return never if va == _ALWAYS else masks_lib.Full() if va == _NEVER else masks_lib.Not(a)
  if type(mask) is masks_lib.SinkTokens:
    # Sinks past the tile's keys do not exist here, and causal sinks that every query of the
    # tile is past are plain sinks: one mask for all the tiles far below the diagonal.
    n = min(mask.n, kv_size)
    if mask.causal and n - 1 <= mask.offset:
      return masks_lib.SinkTokens(n, causal=False)
    return masks_lib.SinkTokens(n, mask.causal, mask.offset)
  return mask


def _shift(mask, q_offset, kv_offset, head_offset, ctx):
  d = q_offset - kv_offset
  if type(mask) is masks_lib.Full:
    return mask
  if type(mask) is masks_lib.Causal:
    return masks_lib.Causal(_offset(mask, ctx) + d)
  if type(mask) is masks_lib.SlidingWindow:
    return masks_lib.SlidingWindow(mask.left, mask.right, _offset(mask, ctx) + d)
  if type(mask) is masks_lib.SinkTokens:
    # k + dk < n  <=>  k < n - dk; the causal condition moves like a causal mask's.
    offset = _offset(mask, ctx) + d if mask.causal else None
    return masks_lib.SinkTokens(max(0, mask.n - kv_offset), mask.causal, offset)
  if type(mask) is masks_lib.ChunkedCausal and kv_offset % mask.chunk == 0:
    # (q + o) // c == (k + n c) // c  <=>  (q + o - n c) // c == k // c: chunk-aligned key
    # offsets fold into the query offset.
    return masks_lib.ChunkedCausal(mask.chunk, _offset(mask, ctx) + d)
  if type(mask) is masks_lib.PrefixLM:
    # A bidirectional prefix (all of it visible to every query) or causal attention.
    parts = masks_lib.SinkTokens(mask.prefix_len, causal=False) | masks_lib.Causal(_offset(mask, ctx))
    return _shift(parts, q_offset, kv_offset, head_offset, ctx)
  if type(mask) in (masks_lib.And, masks_lib.Or):
    return type(mask)(_shift(mask.a, q_offset, kv_offset, head_offset, ctx),
                      _shift(mask.b, q_offset, kv_offset, head_offset, ctx))
  if type(mask) is masks_lib.Not:
    return masks_lib.Not(_shift(mask.a, q_offset, kv_offset, head_offset, ctx))
  return Shifted(mask, q_offset, kv_offset, head_offset if mask.depends_on_head else 0,
                 ctx.q_len, ctx.kv_len)


def rectangle_bounds(mask: masks_lib.Mask, ctx: masks_lib.MaskContext, q_starts, q_len: int,
                     kv_starts, kv_len: int):
  """``(may_any, must_all)`` of ``mask`` on the rectangles ``[q_start, +q_len) x [kv_start, +kv_len)``.

  ``q_starts`` and ``kv_starts`` are 1-D; the result is ``[len(q_starts), len(kv_starts)]``.
  """
  q_lo = np.asarray(q_starts, np.int64)[:, None]
  k_lo = np.asarray(kv_starts, np.int64)[None, :]
  may, must = mask.block_bounds(q_lo, q_lo + q_len - 1, k_lo, k_lo + kv_len - 1, ctx)
  shape = (q_lo.shape[0], k_lo.shape[1])
  may = np.broadcast_to(np.asarray(may, bool), shape)
  must = np.broadcast_to(np.asarray(must, bool), shape) & may
  return may, must
