"""Kernel schedules from a BlockMask, built on the host.

* :func:`gpu_lists`: the BlockMask's sparse rows as they are (the GPU kernels loop over a row).
* :func:`row_steps` / :func:`col_steps`: step schedules of the TPU kernels, one grid step per
  non-empty tile (plus one per row without tiles, which must still write its output). Entries
  are packed into the smallest integers that hold them; every distinct list is stored once
  (lists per head are shared by the heads of equal block structure). When the lists do not fit
  the scalar-memory budget they are cut into bands of whole rows, one kernel call per band, each
  padded to the same length so that every band runs the same compiled kernel.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attn_jax import block_mask as block_mask_lib
from attn_jax import masks as masks_lib
from pallas_kernels import flash_common as fc

# Scalar memory given to one band of a TPU schedule. TPU cores have 1 MiB (v5e) or more of SMEM,
# shared with the kernel's other scalars; a quarter keeps clear of them on every generation.
DEFAULT_SCHEDULE_BYTES = 256 * 1024


def _width(n_values: int) -> int:
  """Bits that hold 0 .. n_values - 1 (0 when there is one value)."""
  return max(0, int(n_values) - 1).bit_length()


@dataclasses.dataclass(frozen=True, eq=False)
class StepLists:
  """A step schedule on the host.

  Attributes:
    layout: how entries are packed.
    words: one array per layout word, ``[num_bands, num_lists * capacity]``.
    unit_map: ``[units]`` int32, the list of each grid unit (global numbering).
    capacity: entries per list per band (``C``).
    band_starts: ``[num_bands + 1]`` the first row of each band (rows are query blocks for
      row steps, key blocks for column steps).
    num_entries: non-idle entries over all lists (tiles plus empty-row placeholders).
  """

  layout: fc.EntryLayout
  words: tuple[np.ndarray, ...]
  unit_map: np.ndarray
  capacity: int
  band_starts: np.ndarray
  num_entries: int

  @property
  def num_bands(self) -> int:
    return len(self.band_starts) - 1

  @property
  def num_lists(self) -> int:
    return self.words[0].shape[1] // self.capacity

  @property
  def band_bytes(self) -> int:
    """Scalar memory of one band (what one kernel call prefetches)."""
    return sum(w[0].nbytes for w in self.words)

  def entries(self, band: int, list_index: int) -> dict[str, np.ndarray]:
    """Unpacked fields of one list in one band (for tests)."""
    sl = slice(list_index * self.capacity, (list_index + 1) * self.capacity)
    return self.layout.unpack(tuple(w[band, sl] for w in self.words))


def structure_mask(bm: block_mask_lib.BlockMask, m: int) -> masks_lib.Mask:
  """A mask whose analytic bounds are sound for every head of structure ``m``: the head's own mask
  when the heads of ``m`` share one (``per_head`` masks), the per-head masks of those heads
  combined when they differ (kernels that evaluate the predicate in-kernel let heads of equal
  block structure share ``m``), else the whole mask (bounds over every head)."""
  if bm.num_heads == 1:
    return bm.mask
  own = [bm.mask.for_head(int(h)) for h in np.nonzero(bm.head_to_mask == m)[0]]
  if not own or any(x is None for x in own):
    return bm.mask
  distinct = list(dict.fromkeys(own))
  return distinct[0] if len(distinct) == 1 else masks_lib.per_head(distinct)


def sub_kinds(bm: block_mask_lib.BlockMask, q_blocks, kv_blocks, kinds, sub_grid: tuple[int, int],
              mask: masks_lib.Mask | None = None) -> np.ndarray:
  """Kinds of the compute sub-blocks of each entry, from the analytic bounds of ``mask`` (default
  the BlockMask's: sound for every head; :func:`structure_mask` for one structure's heads), packed
  2 bits per sub-block: sub-block (query chunk ``r``, key chunk ``c``) of a ``(n_r, n_c)`` grid in
  bits ``2 (r n_c + c)`` and up.

  A PARTIAL tile often has sub-blocks with nothing visible (the quarter above a causal diagonal;
  the sink column of a window with sinks: 4 visible keys out of 1024) or everything visible;
  kernels skip the former and compute the latter without the mask. FULL entries have all
  sub-blocks FULL.
  """
  n_r, n_c = sub_grid
  out = np.zeros(len(kinds), np.int64)
  for n in range(n_r * n_c):
    out |= np.int64(block_mask_lib.FULL) << (2 * n)
  part = np.nonzero(kinds == block_mask_lib.PARTIAL)[0]
  if len(part) == 0:
    return out
  ctx = bm.mask_context
  rows, cols = bm.block_q // n_r, bm.block_kv // n_c
  packed = np.zeros(len(part), np.int64)
  for r in range(n_r):
    q_lo = q_blocks[part].astype(np.int64) * bm.block_q + r * rows
    q_valid = q_lo < bm.q_len
    q_hi = np.minimum(q_lo + rows, bm.q_len) - 1
    q_lo = np.minimum(q_lo, bm.q_len - 1)
    for c in range(n_c):
      k_lo = kv_blocks[part].astype(np.int64) * bm.block_kv + c * cols
      k_hi = k_lo + cols - 1
      k_valid = k_lo < bm.kv_len
      may, must = (mask or bm.mask).block_bounds(q_lo, q_hi, np.minimum(k_lo, bm.kv_len - 1),
                                       np.minimum(k_hi, bm.kv_len - 1), ctx)
      may = np.broadcast_to(np.asarray(may, bool), part.shape) & k_valid & q_valid
      must = np.broadcast_to(np.asarray(must, bool), part.shape) & may & (k_hi < bm.kv_len)
      kind = np.where(must, block_mask_lib.FULL, np.where(may, block_mask_lib.PARTIAL, block_mask_lib.EMPTY))
      packed |= kind.astype(np.int64) << (2 * (r * n_c + c))
  out[part] = packed
  return out


def _steps(lists, unit_map, n_rows, n_cols, n_groups, n_tiles, budget, what, sub_grid=(1, 1)) -> StepLists:
  """Packs per-list entries into banded step lists.

  Args:
    lists: per list, a dict of int arrays ``row``, ``col``, ``kind`` and optionally ``g`` and
      ``tile``, sorted by ``row``.
    unit_map: list index of every grid unit.
    n_rows, n_cols, n_groups, n_tiles: value ranges of the fields.
    budget: scalar-memory bytes of one band.
    what: name of the pass, for errors.
  """
  layout = fc.EntryLayout.make({"row": _width(n_rows), "col": _width(n_cols), "kind": 2, "first": 1,
                                "last": 1, "g": _width(n_groups), "tile": _width(n_tiles),
                                "sub": 2 * sub_grid[0] * sub_grid[1] if sub_grid != (1, 1) else 0})
  full = []
  for entries in lists:
    counts = np.bincount(entries["row"], minlength=n_rows)
    empty = np.nonzero(counts == 0)[0]
    if len(empty):
      # One placeholder per row without tiles: the kernel still writes that row's output.
      pad = {"row": empty, "col": np.zeros_like(empty), "kind": np.full(len(empty), fc.EMPTY_ROW)}
      merged = {k: np.concatenate([np.asarray(entries.get(k, np.zeros(len(entries["row"]), np.int64))),
                                   pad.get(k, np.zeros(len(empty), np.int64))])
                for k in ("row", "col", "kind", "g", "tile", "sub")}
      order = np.argsort(merged["row"], kind="stable")
      entries = {k: v[order] for k, v in merged.items()}
      counts = np.maximum(counts, 1)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    pos = np.arange(ptr[-1])
    entries = dict(entries)
    entries["first"] = (pos == ptr[entries["row"]]).astype(np.int64)
    entries["last"] = (pos == ptr[entries["row"] + 1] - 1).astype(np.int64)
    full.append((entries, ptr))

  num_lists = len(full)
  bpe = layout.bytes_per_entry
  longest = max(ptr[-1] for _, ptr in full)
  if num_lists * longest * bpe <= budget:
    starts = np.array([0, n_rows])
    capacity = int(longest)
  else:
    capacity = budget // (num_lists * bpe)
    rows_max = np.max([np.diff(ptr) for _, ptr in full], axis=0)
    worst = int(rows_max.max())
    if worst > capacity:
      raise ValueError(
          f"the {what} schedule does not fit the scalar-memory budget even one row per call: a row "
          f"has {worst} tiles x {num_lists} distinct lists x {bpe} bytes = {worst * num_lists * bpe} "
          f"bytes, over max_schedule_bytes={budget}; use larger blocks or a larger budget")
    # Greedy bands of whole rows, each within the capacity for every list.
    cum = np.concatenate([[0], np.cumsum(rows_max)])
    starts = [0]
    while starts[-1] < n_rows:
      starts.append(int(np.searchsorted(cum, cum[starts[-1]] + capacity, side="right")) - 1)
    starts = np.asarray(starts)

  num_bands = len(starts) - 1
  fields = {k: np.zeros((num_bands, num_lists, capacity), np.int64)
            for k in ("row", "col", "kind", "first", "last", "g", "tile", "sub")}
  slot = np.arange(capacity)
  for l, (entries, ptr) in enumerate(full):
    lo, hi = ptr[starts[:-1]], ptr[starts[1:]]                     # [num_bands]
    idx = np.minimum(lo[:, None] + slot[None, :], hi[:, None] - 1)  # [num_bands, C]
    idle = slot[None, :] >= (hi - lo)[:, None]
    for k in fields:
      v = np.asarray(entries.get(k, 0))
      fields[k][:, l] = v[idx] if v.ndim else 0
    # Idle entries repeat the band's last entry (no new block is fetched) and do nothing.
    for k in ("kind", "first", "last"):
      fields[k][:, l][idle] = 0
  words = layout.pack({k: v.reshape(num_bands, num_lists * capacity) for k, v in fields.items()})
  for w in words:
    w.setflags(write=False)
  return StepLists(layout, words, np.asarray(unit_map, np.int32), int(capacity), starts,
                   int(sum(ptr[-1] for _, ptr in full)))


def _struct_of_head(bm, h):
  return int(bm.head_to_mask[h if bm.num_heads > 1 else 0])


def row_steps(bm: block_mask_lib.BlockMask, tile_ids, num_q_heads: int, stack: int,
              budget: int = DEFAULT_SCHEDULE_BYTES, sub_grid: tuple[int, int] = (1, 1)) -> StepLists:
  """Steps of the forward and dQ passes: for each query block, its non-empty key blocks.

  Args:
    bm: the BlockMask.
    tile_ids: ``PartialTiles.kv_tile_ids`` when kernels read tiles, else None.
    num_q_heads: global number of query heads.
    stack: query heads per grid unit (GQA heads stacked into one operand; only for masks that
      do not depend on the head).
    sub_grid: compute sub-blocks per tile (query chunks, key chunks) that the kernels run in
      turn; with more than one, each entry carries their kinds (:func:`sub_kinds`).
  """
  lists = []
  for m in range(bm.num_masks):
    s, e = bm.kv_ptr[m, 0], bm.kv_ptr[m, -1]
    entries = {"row": bm.entry_rows(m).astype(np.int64), "col": bm.kv_cols[s:e].astype(np.int64),
               "kind": bm.kv_kinds[s:e].astype(np.int64)}
    if tile_ids is not None:
      entries["tile"] = tile_ids[s:e].astype(np.int64)
    if sub_grid != (1, 1):
      entries["sub"] = sub_kinds(bm, entries["row"], entries["col"], entries["kind"], sub_grid,
                                 structure_mask(bm, m))
    lists.append(entries)
  unit_map = [_struct_of_head(bm, u * stack) for u in range(num_q_heads // stack)]
  n_tiles = 1 if tile_ids is None or len(tile_ids) == 0 else int(tile_ids.max()) + 1
  return _steps(lists, unit_map, bm.num_q_blocks, bm.num_kv_blocks, 1, n_tiles, budget, "forward/dQ",
                sub_grid)


def col_steps(bm: block_mask_lib.BlockMask, tile_ids, num_q_heads: int, group: int, stack: int,
              budget: int = DEFAULT_SCHEDULE_BYTES, sub_grid: tuple[int, int] = (1, 1)) -> StepLists:
  """Steps of the dK/dV pass: for each key block, the non-empty query blocks of every query head
  of its group (``group`` query heads share a K/V head; ``stack`` of them per step).

  Units are K/V heads; a unit's list merges its ``group // stack`` sub-groups, entry field ``g``
  naming the sub-group.
  """
  subs = group // stack
  signatures = [tuple(_struct_of_head(bm, u * group + g * stack) for g in range(subs))
                for u in range(num_q_heads // group)]
  distinct = list(dict.fromkeys(signatures))
  lists = []
  for sig in distinct:
    parts = []
    for g, m in enumerate(sig):
      s, e = bm.q_ptr[m, 0], bm.q_ptr[m, -1]
      part = {"row": bm.entry_cols(m).astype(np.int64), "col": bm.q_rows[s:e].astype(np.int64),
              "kind": bm.q_kinds[s:e].astype(np.int64), "g": np.full(e - s, g, np.int64)}
      if tile_ids is not None:
        part["tile"] = tile_ids[s:e].astype(np.int64)
      if sub_grid != (1, 1):
        part["sub"] = sub_kinds(bm, part["col"], part["row"], part["kind"], sub_grid,
                                structure_mask(bm, m))
      parts.append(part)
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((merged["col"], merged["g"], merged["row"]))
    lists.append({k: v[order] for k, v in merged.items()})
  unit_map = [distinct.index(sig) for sig in signatures]
  n_tiles = 1 if tile_ids is None or len(tile_ids) == 0 else int(tile_ids.max()) + 1
  return _steps(lists, unit_map, bm.num_kv_blocks, bm.num_q_blocks, subs, n_tiles, budget, "dK/dV",
                sub_grid)


def gpu_lists(bm: block_mask_lib.BlockMask, tile_ids, transposed: bool):
  """``(head_map, ptr, idx, kinds, tile_ids)`` int32 host arrays of the sparse rows (or columns)."""
  if transposed:
    ptr, idx, kinds = bm.q_ptr, bm.q_rows, bm.q_kinds
  else:
    ptr, idx, kinds = bm.kv_ptr, bm.kv_cols, bm.kv_kinds
  if tile_ids is None:
    tile_ids = np.zeros(len(idx), np.int32)
  if len(idx) == 0:
    # Zero-size arrays cannot be kernel operands; a dummy entry is never read (all counts are 0).
    idx, kinds, tile_ids = np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.int32)
  return (bm.head_to_mask.astype(np.int32), ptr.reshape(-1).astype(np.int32), idx.astype(np.int32),
          kinds.astype(np.int32), np.asarray(tile_ids, np.int32))
