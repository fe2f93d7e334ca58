"""Compile a mask into a BlockMask: which key blocks each query block must visit.

The sequence is tiled into query blocks of ``block_q`` rows and key blocks of ``block_kv``
columns. Each (query block, key block) pair is

* ``EMPTY``: no visible pair; never visited.
* ``FULL``: every pair visible (for every valid query row and every key column, with no padded
  columns); visited without evaluating the mask.
* ``PARTIAL``: anything else; visited, and the mask predicate is evaluated on the tile.

The BlockMask stores only the non-empty tiles, in compressed sparse rows: for every query block
the increasing list of its non-empty key blocks with their kinds (what the forward and dQ passes
walk), and the same tiles by key block (what the dK/dV pass walks). Its size is proportional to
the number of visited tiles, never to ``heads * q_blocks * kv_blocks``.

Head-dependent masks are stored once per distinct block structure: ``head_to_mask[h]`` names the
structure of query head ``h``. A head-independent mask has one structure and ``head_to_mask =
[0]``.

Padding convention: rows of the last query block past ``q_len`` are "don't care" (their output
is discarded), so they neither make a block partial nor non-empty. Columns past ``kv_len`` are
invisible; a block that contains any of them is at best ``PARTIAL``.

Construction happens once per (mask, lengths, block sizes, heads) on the host and is memoised.
Blocks are classified hierarchically from the mask's analytic ``block_bounds``: the whole grid is
one rectangle of blocks, and a rectangle that is provably empty or provably full is settled at
once, while the others are split in four. Causal masks, windows, sinks, chunks and layouts thus
compile in time proportional to the number of non-empty tiles (up to a logarithm), not to the
number of blocks, let alone tokens. Blocks the bounds cannot settle (user functions) are
evaluated element-wise, vectorised in chunks.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from attn_jax import masks as masks_lib

__all__ = ["BlockMask", "PartialTiles", "make_block_mask", "partial_tiles", "from_kinds", "EMPTY",
           "PARTIAL", "FULL"]

EMPTY = 0
PARTIAL = 1
FULL = 2

# Upper bound on the number of mask elements evaluated at once while refining undecided blocks.
_REFINE_CHUNK_ELEMENTS = 1 << 22


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockMask:
  """Block structure of a mask for fixed lengths and block sizes, as sparse lists.

  ``M`` is the number of distinct block structures (1 unless the mask depends on the head),
  ``N`` the total number of non-empty tiles over the ``M`` structures. All arrays are host NumPy
  and read-only.

  Attributes:
    head_to_mask: ``[Hm]`` int32, the structure of each query head (``Hm`` is the number of query
      heads for a head-dependent mask, else 1).
    kv_ptr: ``[M, nq + 1]`` int64: the non-empty tiles of query block ``i`` in structure ``m``
      are the entries ``kv_ptr[m, i] : kv_ptr[m, i + 1]`` of ``kv_cols`` / ``kv_kinds``.
    kv_cols: ``[N]`` int32 key-block index, increasing within a row.
    kv_kinds: ``[N]`` int8, PARTIAL or FULL.
    q_ptr, q_rows, q_kinds: the same tiles listed by key block (``[M, nk + 1]``, ``[N]``,
      ``[N]``), query blocks increasing, for the dK/dV pass. ``q_ptr[m, 0] == kv_ptr[m, 0]``.
  """

  mask: masks_lib.Mask
  q_len: int
  kv_len: int
  block_q: int
  block_kv: int
  head_to_mask: np.ndarray
  kv_ptr: np.ndarray
  kv_cols: np.ndarray
  kv_kinds: np.ndarray
  q_ptr: np.ndarray
  q_rows: np.ndarray
  q_kinds: np.ndarray
  _cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  @property
  def num_q_blocks(self) -> int:
    return self.kv_ptr.shape[1] - 1

  @property
  def num_kv_blocks(self) -> int:
    return self.q_ptr.shape[1] - 1

  @property
  def mask_context(self) -> masks_lib.MaskContext:
    return masks_lib.MaskContext(self.q_len, self.kv_len)

  @property
  def num_heads(self) -> int:
    """``Hm``: the number of query heads for a head-dependent mask, else 1."""
    return len(self.head_to_mask)

  @property
  def num_masks(self) -> int:
    """``M``: the number of distinct block structures stored."""
    return self.kv_ptr.shape[0]

  def _per_mask_counts(self):
    if "counts" not in self._cache:
      full = np.zeros(self.num_masks, np.int64)
      part = np.zeros(self.num_masks, np.int64)
      for m in range(self.num_masks):
        k = self.kv_kinds[self.kv_ptr[m, 0]:self.kv_ptr[m, -1]]
        full[m] = int((k == FULL).sum())
        part[m] = len(k) - full[m]
      self._cache["counts"] = (full, part)
    return self._cache["counts"]

  @property
  def num_nonempty(self) -> int:
    """Number of (head, query block, key block) tiles a kernel visits."""
    return self.num_full + self.num_partial

  @property
  def num_partial(self) -> int:
    return int(self._per_mask_counts()[1][self.head_to_mask].sum())

  @property
  def num_full(self) -> int:
    return int(self._per_mask_counts()[0][self.head_to_mask].sum())

  @property
  def num_tiles(self) -> int:
    """Number of (head, query block, key block) tiles, empty ones included (``Hm * nq * nk``)."""
    return self.num_heads * self.num_q_blocks * self.num_kv_blocks

  @property
  def density(self) -> float:
    """Fraction of tiles visited."""
    return self.num_nonempty / self.num_tiles

  @property
  def nbytes(self) -> int:
    """Host memory of the lists (what grows with the sequence)."""
    return sum(a.nbytes for a in (self.head_to_mask, self.kv_ptr, self.kv_cols, self.kv_kinds,
                                  self.q_ptr, self.q_rows, self.q_kinds))

  def row_counts(self, m: int = 0) -> np.ndarray:
    """``[nq]`` number of non-empty tiles per query block of structure ``m``."""
    return np.diff(self.kv_ptr[m])

  def col_counts(self, m: int = 0) -> np.ndarray:
    """``[nk]`` number of non-empty tiles per key block of structure ``m``."""
    return np.diff(self.q_ptr[m])

  def row(self, head: int, i: int):
    """``(kv_blocks, kinds)`` of query block ``i`` for query head ``head`` (0 if head-independent)."""
    m = self.head_to_mask[head if self.num_heads > 1 else 0]
    s, e = self.kv_ptr[m, i], self.kv_ptr[m, i + 1]
    return self.kv_cols[s:e], self.kv_kinds[s:e]

  def col(self, head: int, j: int):
    """``(q_blocks, kinds)`` of key block ``j`` for query head ``head``."""
    m = self.head_to_mask[head if self.num_heads > 1 else 0]
    s, e = self.q_ptr[m, j], self.q_ptr[m, j + 1]
    return self.q_rows[s:e], self.q_kinds[s:e]

  def entry_rows(self, m: int = 0) -> np.ndarray:
    """``[n_m]`` query block of each entry of structure ``m`` (in ``kv_cols`` order)."""
    return np.repeat(np.arange(self.num_q_blocks, dtype=np.int32), self.row_counts(m))

  def entry_cols(self, m: int = 0) -> np.ndarray:
    """``[n_m]`` key block of each entry of structure ``m`` (in ``q_rows`` order)."""
    return np.repeat(np.arange(self.num_kv_blocks, dtype=np.int32), self.col_counts(m))

  def nonempty_pairs(self, head: int = 0) -> set[tuple[int, int]]:
    """The set of visited ``(q_block, kv_block)`` pairs for one head (0 if head-independent)."""
    m = self.head_to_mask[head if self.num_heads > 1 else 0]
    s, e = self.kv_ptr[m, 0], self.kv_ptr[m, -1]
    return set(zip(self.entry_rows(m).tolist(), self.kv_cols[s:e].tolist()))

  def padded_rows(self, m: int = 0):
    """``(kv_indices [nq, W], kv_kinds [nq, W], kv_counts [nq])`` of structure ``m`` as padded
    int32 rows (``W`` the longest row, at least 1): entries past a row's count repeat its last
    block (0 for an empty row) with kind EMPTY. O(nq * W) memory, for traced BlockMasks that
    extend these rows on device."""
    counts = self.row_counts(m).astype(np.int32)
    width = max(1, int(counts.max()) if len(counts) else 1)
    s = self.kv_ptr[m, 0]
    slot = np.arange(width)[None, :]
    valid = slot < counts[:, None]
    last = np.maximum(counts - 1, 0)[:, None]
    pos = self.kv_ptr[m, :-1, None] - s + np.where(valid, slot, last)
    cols = self.kv_cols[s:self.kv_ptr[m, -1]]
    kinds = self.kv_kinds[s:self.kv_ptr[m, -1]]
    if len(cols) == 0:
      return (np.zeros((len(counts), width), np.int32), np.zeros((len(counts), width), np.int32), counts)
    pos = np.minimum(pos, len(cols) - 1)
    idx = np.where(counts[:, None] > 0, cols[pos], 0).astype(np.int32)
    kind = np.where(valid, kinds[pos], EMPTY).astype(np.int32)
    return idx, kind, counts

  def dense_kinds(self) -> np.ndarray:
    """``[Hm, nq, nk]`` int32 dense classification, for tests and pictures.

    O(heads * q_blocks * kv_blocks) memory: never called by the backends.
    """
    out = np.zeros((self.num_masks, self.num_q_blocks, self.num_kv_blocks), np.int32)
    for m in range(self.num_masks):
      s, e = self.kv_ptr[m, 0], self.kv_ptr[m, -1]
      out[m, self.entry_rows(m), self.kv_cols[s:e]] = self.kv_kinds[s:e]
    return out[self.head_to_mask]

  def union_over_heads(self) -> "BlockMask":
    """A head-independent BlockMask that visits a tile if any head does.

    A tile is FULL only if it is FULL for every head; backends that batch all heads into one tile
    (the xla backend) use this and evaluate the head-dependent predicate on PARTIAL tiles.
    """
    if self.num_masks == 1:
      if self.num_heads == 1:
        return self
      return dataclasses.replace(self, head_to_mask=_frozen(np.zeros(1, np.int32)), _cache={})
    nk = self.num_kv_blocks
    keys, fulls = [], []
    for m in range(self.num_masks):
      s, e = self.kv_ptr[m, 0], self.kv_ptr[m, -1]
      key = self.entry_rows(m).astype(np.int64) * nk + self.kv_cols[s:e]
      keys.append(key)
      fulls.append(key[self.kv_kinds[s:e] == FULL])
    uniq = np.unique(np.concatenate(keys))
    full_keys, full_counts = np.unique(np.concatenate(fulls), return_counts=True)
    all_full = full_keys[full_counts == self.num_masks]
    kinds = np.where(np.isin(uniq, all_full), FULL, PARTIAL).astype(np.int8)
    rows, cols = uniq // nk, uniq % nk
    return _assemble(self.mask, self.q_len, self.kv_len, self.block_q, self.block_kv,
                     [(rows, cols, kinds)], np.zeros(1, np.int32))

  def __repr__(self):
    return (f"BlockMask(mask={self.mask!r}, q_len={self.q_len}, kv_len={self.kv_len}, "
            f"block_q={self.block_q}, block_kv={self.block_kv}, heads={self.num_heads}, "
            f"structures={self.num_masks}, tiles=({self.num_q_blocks}, {self.num_kv_blocks}), "
            f"full={self.num_full}, partial={self.num_partial}, density={self.density:.3f})")

  def to_string(self, head: int = 0) -> str:
    """ASCII picture: '#' full, '+' partial, '.' empty."""
    chars = np.array([".", "+", "#"])
    return "\n".join("".join(row) for row in chars[self.dense_kinds()[head]])


def _frozen(a):
  a.setflags(write=False)
  return a


def _sort_entries(rows, cols, kinds, nk):
  order = np.argsort(rows.astype(np.int64) * nk + cols, kind="stable")
  return rows[order], cols[order], kinds[order]


def _assemble(mask, q_len, kv_len, block_q, block_kv, structures, head_to_mask) -> BlockMask:
  """BlockMask from per-structure ``(rows, cols, kinds)`` entry arrays (any order, no repeats)."""
  nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)
  kv_ptr = np.zeros((len(structures), nq + 1), np.int64)
  q_ptr = np.zeros((len(structures), nk + 1), np.int64)
  kv_cols, kv_kinds, q_rows, q_kinds = [], [], [], []
  base = 0
  for m, (rows, cols, kinds) in enumerate(structures):
    rows, cols, kinds = _sort_entries(np.asarray(rows), np.asarray(cols), np.asarray(kinds), nk)
    kv_ptr[m, 0] = base
    kv_ptr[m, 1:] = base + np.cumsum(np.bincount(rows, minlength=nq))
    kv_cols.append(cols.astype(np.int32))
    kv_kinds.append(kinds.astype(np.int8))
    order = np.argsort(cols.astype(np.int64) * nq + rows, kind="stable")
    q_ptr[m, 0] = base
    q_ptr[m, 1:] = base + np.cumsum(np.bincount(cols, minlength=nk))
    q_rows.append(rows[order].astype(np.int32))
    q_kinds.append(kinds[order].astype(np.int8))
    base += len(rows)
  cat = lambda xs, dt: _frozen(np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
  return BlockMask(mask, q_len, kv_len, block_q, block_kv,
                   head_to_mask=_frozen(np.asarray(head_to_mask, np.int32)),
                   kv_ptr=_frozen(kv_ptr), kv_cols=cat(kv_cols, np.int32), kv_kinds=cat(kv_kinds, np.int8),
                   q_ptr=_frozen(q_ptr), q_rows=cat(q_rows, np.int32), q_kinds=cat(q_kinds, np.int8))


def _dedupe(structures, keys=None):
  """Unique structures and the index of each input's; ``keys`` (optional bytes per input) must
  also agree for two inputs to share a structure."""
  index: dict[bytes, int] = {}
  unique, which = [], []
  for n, (rows, cols, kinds) in enumerate(structures):
    key = rows.tobytes() + b"|" + cols.tobytes() + b"|" + kinds.tobytes()
    if keys is not None:
      key += b"|" + keys[n]
    if key not in index:
      index[key] = len(unique)
      unique.append((rows, cols, kinds))
    which.append(index[key])
  return unique, np.asarray(which, np.int32)


def from_kinds(kinds: np.ndarray, *, q_len: int, kv_len: int, block_q: int, block_kv: int,
               mask: masks_lib.Mask) -> BlockMask:
  """Builds a BlockMask from a precomputed dense ``[Hm, nq, nk]`` (or ``[nq, nk]``) classification.

  For callers that know their block structure as a table. ``mask`` must agree with ``kinds``:
  backends evaluate it on PARTIAL tiles.
  """
  kinds = np.asarray(kinds, np.int32)
  if kinds.ndim == 2:
    kinds = kinds[None]
  expected = (_cdiv(q_len, block_q), _cdiv(kv_len, block_kv))
  if kinds.ndim != 3 or kinds.shape[1:] != expected:
    raise ValueError(f"kinds must have shape [Hm, {expected[0]}, {expected[1]}], got {kinds.shape}")
  if not np.isin(kinds, (EMPTY, PARTIAL, FULL)).all():
    raise ValueError(f"kinds must hold only EMPTY, PARTIAL and FULL ({EMPTY}, {PARTIAL}, {FULL})")
  return _from_dense_kinds(mask, q_len, kv_len, block_q, block_kv, kinds)


def _from_dense_kinds(mask, q_len, kv_len, block_q, block_kv, kinds, keys=None) -> BlockMask:
  """BlockMask of a dense ``[Hm, nq, nk]`` classification, one structure per distinct head
  (``keys``: optional bytes per head that must also agree for two heads to share one)."""
  structures = []
  for h in range(kinds.shape[0]):
    rows, cols = np.nonzero(kinds[h])
    structures.append((rows.astype(np.int32), cols.astype(np.int32), kinds[h, rows, cols].astype(np.int8)))
  unique, which = _dedupe(structures, keys)
  if kinds.shape[0] == 1:
    which = np.zeros(1, np.int32)
  return _assemble(mask, q_len, kv_len, block_q, block_kv, unique, which)


class _Grid:
  """Token extents of rectangles of blocks (``[r0, r1) x [c0, c1)`` in block units)."""

  def __init__(self, q_len, kv_len, block_q, block_kv):
    self.q_len, self.kv_len, self.bq, self.bk = q_len, kv_len, block_q, block_kv
    self.nq, self.nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)

  def bounds(self, r0, r1, c0, c1):
    q_lo = r0 * self.bq
    q_hi = np.minimum(r1 * self.bq, self.q_len) - 1
    k_lo = c0 * self.bk
    k_hi = np.minimum(c1 * self.bk, self.kv_len) - 1
    return q_lo, q_hi, k_lo, k_hi


def _classify(mask, ctx, grid: _Grid):
  """Hierarchical classification of a mask's blocks from its analytic bounds.

  Returns ``(rects, tiles, undecided)``: FULL rectangles ``(r0, r1, c0, c1)`` (their key-padded
  blocks are fixed up later), PARTIAL single blocks ``(r, c)`` known from exact bounds, and the
  single blocks that need an element-wise check. Work is proportional to the number of
  rectangles the bounds cannot settle, not to ``nq * nk``.
  """
  nq, nk = grid.nq, grid.nk
  level = max(0, int(np.ceil(np.log2(max(nq, nk)))))
  gi = np.zeros(1, np.int64)
  gj = np.zeros(1, np.int64)
  rects, tiles, undecided = [], [], []
  while True:
    size = 1 << level
    r0, c0 = gi * size, gj * size
    keep = (r0 < nq) & (c0 < nk)
    gi, gj, r0, c0 = gi[keep], gj[keep], r0[keep], c0[keep]
    if len(gi) == 0:
      break
    r1, c1 = np.minimum(r0 + size, nq), np.minimum(c0 + size, nk)
    q_lo, q_hi, k_lo, k_hi = grid.bounds(r0, r1, c0, c1)
    may, must = mask.block_bounds(q_lo, q_hi, k_lo, k_hi, ctx)
    may = np.broadcast_to(np.asarray(may, bool), gi.shape)
    must = np.broadcast_to(np.asarray(must, bool), gi.shape) & may
    rects.append(np.stack([r0[must], r1[must], c0[must], c1[must]], 1))
    rest = may & ~must
    if level == 0:
      exact = np.broadcast_to(np.asarray(mask.block_bounds_exact(q_lo, q_hi, k_lo, k_hi, ctx), bool),
                              gi.shape)
      tiles.append(np.stack([r0[rest & exact], c0[rest & exact]], 1))
      undecided.append(np.stack([r0[rest & ~exact], c0[rest & ~exact]], 1))
      break
    gi, gj = gi[rest], gj[rest]
    gi = np.concatenate([2 * gi, 2 * gi, 2 * gi + 1, 2 * gi + 1])
    gj = np.concatenate([2 * gj, 2 * gj + 1, 2 * gj, 2 * gj + 1])
    level -= 1
  cat = lambda xs, w: np.concatenate(xs) if xs else np.zeros((0, w), np.int64)
  return cat(rects, 4), cat(tiles, 2), cat(undecided, 2)


def _expand_rects(rects):
  """FULL rectangles -> ``(rows, cols)`` of their blocks."""
  if len(rects) == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  r0, r1, c0, c1 = rects.T
  heights = r1 - r0
  # One segment per (rectangle, row), then one entry per (segment, column).
  seg = np.repeat(np.arange(len(rects)), heights)
  seg_row = r0[seg] + (np.arange(len(seg)) - np.repeat(np.cumsum(heights) - heights, heights))
  widths = (c1 - c0)[seg]
  ent = np.repeat(np.arange(len(seg)), widths)
  cols = c0[seg][ent] + (np.arange(len(ent)) - np.repeat(np.cumsum(widths) - widths, widths))
  return seg_row[ent], cols


def _tile_values(mask, ctx, grid: _Grid, tiles, head):
  """Mask values on whole tiles: ``[Hm, P, bq, bk]`` bool (``[1, ...]`` without heads), with padded
  query rows and key columns invisible."""
  bq, bk = grid.bq, grid.bk
  qi = tiles[:, 0, None, None].astype(np.int32) * bq + np.arange(bq, dtype=np.int32)[None, :, None]
  kj = tiles[:, 1, None, None].astype(np.int32) * bk + np.arange(bk, dtype=np.int32)[None, None, :]
  # Evaluate on clipped indices so that table lookups stay in range; padding is cleared after.
  values = mask.evaluate(np.minimum(qi, grid.q_len - 1), np.minimum(kj, grid.kv_len - 1), head, ctx, np)
  hm = 1 if head is None else len(head)
  values = np.broadcast_to(np.asarray(values, bool), (hm, len(tiles), bq, bk))
  return values, qi < grid.q_len, kj < grid.kv_len


def _refine_compiled(mask, ctx, grid: _Grid, tiles, num_heads, step):
  """:func:`_refine` with each chunk's predicate and reductions fused by XLA (several times
  faster than NumPy's one pass per operator), or None if the mask cannot be traced with jnp."""
  import jax
  import jax.numpy as jnp
  bq, bk, hm = grid.bq, grid.bk, num_heads or 1

  @jax.jit
  def chunk(t):
    qi = t[:, 0, None, None] * bq + jnp.arange(bq, dtype=jnp.int32)[None, :, None]
    kj = t[:, 1, None, None] * bk + jnp.arange(bk, dtype=jnp.int32)[None, None, :]
    head = jnp.arange(hm, dtype=jnp.int32)[:, None, None, None] if num_heads else None
    values = mask.evaluate(jnp.minimum(qi, grid.q_len - 1), jnp.minimum(kj, grid.kv_len - 1), head, ctx, jnp)
    values = jnp.broadcast_to(values, (hm,) + np.broadcast_shapes(qi.shape, kj.shape))
    q_valid, k_valid = qi < grid.q_len, kj < grid.kv_len
    any_ = (values & q_valid & k_valid).any((-1, -2))
    all_ = (values | ~q_valid).all((-1, -2)) & k_valid.all((-1, -2))
    return jnp.where(all_, FULL, jnp.where(any_, PARTIAL, EMPTY)).astype(jnp.int8)

  n = len(tiles)
  padded = np.concatenate([tiles, np.repeat(tiles[-1:], (-n) % step, 0)]).astype(np.int32)
  try:
    # Concrete evaluation even when the BlockMask is built while an outer function is traced.
    with jax.ensure_compile_time_eval():
      parts = [np.asarray(chunk(padded[s:s + step])) for s in range(0, len(padded), step)]
  except Exception:  # noqa: BLE001  e.g. a user function written for NumPy arrays only.
    return None
  return np.concatenate(parts, axis=1)[:, :n]


# Below this many pairs, NumPy is quicker than compiling a fused evaluation.
_COMPILED_REFINE_MIN_ELEMENTS = 1 << 28


def _refine(mask, ctx, grid: _Grid, tiles, num_heads):
  """Exact kinds ``[Hm, P]`` of single blocks by element-wise evaluation, in chunks."""
  hm = num_heads or 1
  head = np.arange(hm, dtype=np.int32)[:, None, None, None] if num_heads else None
  out = np.zeros((hm, len(tiles)), np.int8)
  if len(tiles) == 0:
    return out
  if hm * len(tiles) * grid.bq * grid.bk >= _COMPILED_REFINE_MIN_ELEMENTS:
    # XLA fuses the chunk without materialising it, so chunks can be larger.
    step = max(1, 16 * _REFINE_CHUNK_ELEMENTS // (hm * grid.bq * grid.bk))
    compiled = _refine_compiled(mask, ctx, grid, tiles, num_heads, step)
    if compiled is not None:
      return compiled
  bq, bk = grid.bq, grid.bk
  # Tiles without padding (all but the last row and column of blocks) need no validity masks.
  edge = (tiles[:, 0] == grid.nq - 1) | (tiles[:, 1] == grid.nk - 1)
  step = max(1, _REFINE_CHUNK_ELEMENTS // (hm * bq * bk))
  for subset, padded in ((np.nonzero(~edge)[0], False), (np.nonzero(edge)[0], True)):
    for start in range(0, len(subset), step):
      idx = subset[start:start + step]
      values, q_valid, k_valid = _tile_values(mask, ctx, grid, tiles[idx], head)
      if padded:
        any_ = (values & q_valid & k_valid).any((-1, -2))
        all_ = (values | ~q_valid).all((-1, -2)) & k_valid.all((-1, -2))
      else:
        any_ = values.any((-1, -2))
        all_ = values.all((-1, -2))
      out[:, idx] = np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY))
  return out


def _entries(rects, tiles, undecided, refined):
  """Entry arrays ``(rows, cols, kinds)`` of one structure from the classification pieces."""
  fr, fc = _expand_rects(rects)
  keep = refined != EMPTY
  rows = np.concatenate([fr, tiles[:, 0], undecided[keep, 0]])
  cols = np.concatenate([fc, tiles[:, 1], undecided[keep, 1]])
  kinds = np.concatenate([np.full(len(fr), FULL, np.int8), np.full(len(tiles), PARTIAL, np.int8),
                          refined[keep]])
  return rows.astype(np.int32), cols.astype(np.int32), kinds


def _fix_key_padding(entries, grid: _Grid):
  # A block with padded key columns is at best PARTIAL (the padding is invisible).
  rows, cols, kinds = entries
  if grid.kv_len % grid.bk:
    kinds = np.where((cols == grid.nk - 1) & (kinds == FULL), PARTIAL, kinds).astype(np.int8)
  return rows, cols, kinds


@functools.lru_cache(maxsize=256)
def _structure(mask, q_len, kv_len, block_q, block_kv):
  """Sorted entries of a head-independent mask (memoised: per-head masks share them)."""
  ctx = masks_lib.MaskContext(q_len, kv_len)
  grid = _Grid(q_len, kv_len, block_q, block_kv)
  rects, tiles, undecided = _classify(mask, ctx, grid)
  refined = _refine(mask, ctx, grid, undecided, None)[0]
  rows, cols, kinds = _fix_key_padding(_entries(rects, tiles, undecided, refined), grid)
  rows, cols, kinds = _sort_entries(rows, cols, kinds, grid.nk)
  return _frozen(rows), _frozen(cols), _frozen(kinds)


def _partial_content_keys(mask, ctx, grid, structures):
  """Per head, a digest of its PARTIAL tiles' contents (heads with equal block structures may
  differ inside partial tiles; kernels that read precomputed tiles must keep them apart)."""
  import hashlib
  keys = []
  for h, (rows, cols, kinds) in enumerate(structures):
    digest = hashlib.blake2b(digest_size=16)
    part = np.nonzero(kinds == PARTIAL)[0]
    step = max(1, _REFINE_CHUNK_ELEMENTS // (grid.bq * grid.bk))
    head = np.full((1, 1, 1, 1), h, np.int32)
    for start in range(0, len(part), step):
      idx = part[start:start + step]
      values, q_valid, k_valid = _tile_values(mask, ctx, grid, np.stack([rows[idx], cols[idx]], 1), head)
      digest.update(np.packbits(values & q_valid & k_valid).tobytes())
    keys.append(digest.digest())
  return keys


def make_block_mask(mask: masks_lib.Mask | None, q_len: int, kv_len: int, block_q: int,
                    block_kv: int, num_heads: int | None = None) -> BlockMask:
  """Compiles ``mask`` into a :class:`BlockMask` (memoised).

  Args:
    mask: the mask (``None`` means :func:`attn_jax.masks.full`).
    q_len, kv_len: unpadded sequence lengths.
    block_q, block_kv: tile sizes of the backend or kernel that will consume the BlockMask.
    num_heads: number of query heads; required if the mask depends on the head.

  Returns:
    The BlockMask. It is computed on the host with NumPy; calling this inside ``jax.jit`` is fine
    (all its inputs are static) and costs nothing after the first call for the same arguments.
  """
  if mask is None:
    mask = masks_lib.full()
  if not isinstance(mask, masks_lib.Mask):
    raise TypeError(f"mask must be an attn_jax.masks.Mask or None, got {type(mask).__name__}")
  for name, value in (("q_len", q_len), ("kv_len", kv_len), ("block_q", block_q), ("block_kv", block_kv)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if mask.depends_on_head:
    if num_heads is None or num_heads < 1:
      raise ValueError(f"num_heads is required for the head-dependent mask {mask!r}, got {num_heads!r}")
    masks_lib.check_heads(mask, int(num_heads))
    masks_lib.check_num_heads(mask, int(num_heads))
  else:
    num_heads = None
  return _make_block_mask_cached(mask, int(q_len), int(kv_len), int(block_q), int(block_kv),
                                 None if num_heads is None else int(num_heads))


@functools.lru_cache(maxsize=256)
def _make_block_mask_cached(mask, q_len, kv_len, block_q, block_kv, num_heads) -> BlockMask:
  ctx = masks_lib.MaskContext(q_len, kv_len)
  mask.validate(ctx)
  if isinstance(mask, masks_lib.ArrayMask):
    return _from_dense_array(mask, q_len, kv_len, block_q, block_kv, num_heads)
  args = (q_len, kv_len, block_q, block_kv)
  if num_heads is None:
    return _assemble(mask, *args, [_structure(mask, *args)], np.zeros(1, np.int32))

  per_head = [mask.for_head(h) for h in range(num_heads)]
  if all(m is not None for m in per_head):
    # Each head's mask is head-independent: one analytic build per distinct mask.
    distinct = list(dict.fromkeys(per_head))
    which = np.asarray([distinct.index(m) for m in per_head], np.int32)
    structures = [_structure(m, *args) for m in distinct]
    if mask.in_kernel:
      # Kernels evaluate the predicate with the head index, so only the block structure matters.
      structures, again = _dedupe(structures)
      which = again[which]
    return _assemble(mask, *args, structures, which)

  # A head-dependent predicate without per-head masks: bounds that hold for every head settle
  # what they can, the rest is evaluated for all heads at once.
  grid = _Grid(q_len, kv_len, block_q, block_kv)
  rects, tiles, undecided = _classify(mask, ctx, grid)
  refined = _refine(mask, ctx, grid, undecided, num_heads)
  structures = [_fix_key_padding(_entries(rects, tiles, undecided, refined[h]), grid)
                for h in range(num_heads)]
  structures = [_sort_entries(*s, grid.nk) for s in structures]
  keys = None if mask.in_kernel else _partial_content_keys(mask, ctx, grid, structures)
  unique, which = _dedupe(structures, keys)
  return _assemble(mask, *args, unique, which)


@dataclasses.dataclass(frozen=True, eq=False)
class PartialTiles:
  """The dense content of a BlockMask's PARTIAL tiles, deduplicated.

  For masks a kernel cannot evaluate from iotas (block layouts, user tables), the kernel reads the
  tile of each PARTIAL entry instead. Causal, windowed and neighborhood patterns repeat a handful
  of distinct tiles, so the table stays small.

  Attributes:
    tiles: ``[U, block_q, block_kv]`` int8, 1 where visible (key padding and padded query rows 0).
    kv_tile_ids: ``[N]`` int32, for each entry of ``kv_cols`` the row of ``tiles`` (0 for FULL
      entries, which never read it).
    q_tile_ids: ``[N]`` int32, the same for the entries of ``q_rows``.
  """

  tiles: np.ndarray
  kv_tile_ids: np.ndarray
  q_tile_ids: np.ndarray


def partial_tiles(bm: BlockMask) -> PartialTiles:
  """Computes (once per BlockMask) the deduplicated dense tiles of its PARTIAL entries."""
  if "partial_tiles" in bm._cache:
    return bm._cache["partial_tiles"]
  ctx = masks_lib.MaskContext(bm.q_len, bm.kv_len)
  grid = _Grid(bm.q_len, bm.kv_len, bm.block_q, bm.block_kv)
  nk = bm.num_kv_blocks
  head_dep = bm.mask.depends_on_head
  kv_ids = np.zeros(len(bm.kv_cols), np.int32)
  q_ids = np.zeros(len(bm.q_rows), np.int32)
  unique: dict[bytes, int] = {}
  tiles = []
  step = max(1, _REFINE_CHUNK_ELEMENTS // (bm.block_q * bm.block_kv))
  for m in range(bm.num_masks):
    # Heads that share a structure share its partial tiles' contents (make_block_mask keeps
    # heads apart otherwise), so any one of them stands for all.
    head = int(np.nonzero(bm.head_to_mask == m)[0][0])
    head_arr = np.full((1, 1, 1, 1), head, np.int32) if head_dep else None
    s, e = bm.kv_ptr[m, 0], bm.kv_ptr[m, -1]
    rows, cols, kinds = bm.entry_rows(m), bm.kv_cols[s:e], bm.kv_kinds[s:e]
    part = np.nonzero(kinds == PARTIAL)[0]
    for start in range(0, len(part), step):
      idx = part[start:start + step]
      values, q_valid, k_valid = _tile_values(bm.mask, ctx, grid, np.stack([rows[idx], cols[idx]], 1), head_arr)
      values = (values[0] & q_valid & k_valid).astype(np.int8)
      for n, tile in zip(idx, values):
        key = tile.tobytes()
        if key not in unique:
          unique[key] = len(tiles)
          tiles.append(tile)
        kv_ids[s + n] = unique[key]
    # The transposed lists hold the same tiles: find each one's entry in the row lists.
    key_rows = rows.astype(np.int64) * nk + cols
    qs, qe = bm.q_ptr[m, 0], bm.q_ptr[m, -1]
    key_cols = bm.q_rows[qs:qe].astype(np.int64) * nk + bm.entry_cols(m)
    q_ids[qs:qe] = kv_ids[s:e][np.searchsorted(key_rows, key_cols)]
  if not tiles:
    tiles.append(np.zeros((bm.block_q, bm.block_kv), np.int8))
  result = PartialTiles(_frozen(np.stack(tiles)), _frozen(kv_ids), _frozen(q_ids))
  bm._cache["partial_tiles"] = result
  return result


def _from_dense_array(mask: masks_lib.ArrayMask, q_len: int, kv_len: int, block_q: int, block_kv: int,
                      num_heads: int | None) -> BlockMask:
  """The BlockMask of a :func:`attn_jax.masks.from_array` mask, by block-reduced any / all.

  The array is padded to whole tiles and viewed as ``[Hm, nq, block_q, nk, block_kv]``; a tile is
  non-empty if any valid entry is visible and FULL if all are and it has no padded column. Padded
  query rows count as visible for "all" and invisible for "any" (they are don't-care rows).
  """
  array = mask.array if mask.array.ndim == 3 else mask.array[None]
  if num_heads is not None:
    masks_lib.check_heads(mask, num_heads)
  hm = array.shape[0]
  nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)
  visible = np.zeros((hm, nq * block_q, nk * block_kv), bool)
  visible[:, :q_len, :kv_len] = array
  any_ = visible.reshape(hm, nq, block_q, nk, block_kv).any(axis=(2, 4))
  visible[:, q_len:, :kv_len] = True
  all_ = visible.reshape(hm, nq, block_q, nk, block_kv).all(axis=(2, 4))
  kinds = np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY)).astype(np.int32)
  # Heads with one block structure may still differ inside PARTIAL tiles (which kernels read as
  # precomputed tiles): only heads with equal arrays share a structure.
  keys = [array[h].tobytes() for h in range(hm)] if hm > 1 else None
  return _from_dense_kinds(mask, q_len, kv_len, block_q, block_kv, kinds, keys)
