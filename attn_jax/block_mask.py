"""Compile a mask into a BlockMask: which key blocks each query block must visit.

The sequence is tiled into query blocks of ``block_q`` rows and key blocks of ``block_kv``
columns. Each (query block, key block) pair is

* ``EMPTY``: no visible pair; never visited.
* ``FULL``: every pair visible (for every valid query row and every key column, with no padded
  columns); visited without evaluating the mask.
* ``PARTIAL``: anything else; visited, and the mask predicate is evaluated on the tile.

For every query block the BlockMask stores the ordered list of its non-empty key blocks with
their kinds, as integer arrays that a Pallas kernel can scalar-prefetch, and the transposed
lists (for every key block, its non-empty query blocks) that the dK/dV backward pass walks.

Padding convention: rows of the last query block past ``q_len`` are "don't care" (their output
is discarded), so they neither make a block partial nor non-empty. Columns past ``kv_len`` are
invisible; a block that contains any of them is at best ``PARTIAL``.

Compilation happens once per (mask, lengths, block sizes, heads) on the host and is memoised.
Most blocks are classified from the mask's analytic ``block_bounds``; only the undecided ones are
evaluated element-wise, so causal, windows, sinks, chunks and layouts compile in time
proportional to the number of blocks, not of tokens.
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
  """Block structure of a mask for fixed lengths and block sizes.

  All arrays are host NumPy int32. ``Hm`` is the number of query heads if the mask depends on the
  head, else 1.

  Attributes:
    kinds: ``[Hm, nq, nk]`` dense classification (EMPTY / PARTIAL / FULL).
    kv_indices: ``[Hm, nq, max_kv]`` for each query block, its non-empty key blocks in
      increasing order; entries past ``kv_counts`` repeat the last valid index (so that a
      pipelined kernel does not fetch a new block for them) or are 0 for an empty row.
    kv_kinds: ``[Hm, nq, max_kv]`` PARTIAL / FULL per entry, EMPTY for padding entries.
    kv_counts: ``[Hm, nq]`` number of valid entries per query block.
    q_indices, q_kinds, q_counts: the same for each key block's non-empty query blocks
      (``[Hm, nk, max_q]`` and ``[Hm, nk]``), for the dK/dV pass.
  """

  mask: masks_lib.Mask
  q_len: int
  kv_len: int
  block_q: int
  block_kv: int
  kinds: np.ndarray
  kv_indices: np.ndarray
  kv_kinds: np.ndarray
  kv_counts: np.ndarray
  q_indices: np.ndarray
  q_kinds: np.ndarray
  q_counts: np.ndarray
  _cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  @property
  def num_q_blocks(self) -> int:
    return self.kinds.shape[1]

  @property
  def num_kv_blocks(self) -> int:
    return self.kinds.shape[2]

  @property
  def num_heads(self) -> int:
    return self.kinds.shape[0]

  @property
  def num_nonempty(self) -> int:
    """Number of (head, query block, key block) tiles a kernel visits."""
    return int((self.kinds != EMPTY).sum())

  @property
  def num_partial(self) -> int:
    return int((self.kinds == PARTIAL).sum())

  @property
  def num_full(self) -> int:
    return int((self.kinds == FULL).sum())

  @property
  def density(self) -> float:
    """Fraction of tiles visited."""
    return self.num_nonempty / self.kinds.size

  def nonempty_pairs(self, head: int = 0) -> set[tuple[int, int]]:
    """The set of visited ``(q_block, kv_block)`` pairs for one head (0 if head-independent)."""
    qi, ki = np.nonzero(self.kinds[head if self.num_heads > 1 else 0] != EMPTY)
    return set(zip(qi.tolist(), ki.tolist()))

  def union_over_heads(self) -> "BlockMask":
    """A head-independent BlockMask that visits a tile if any head does.

    A tile is FULL only if it is FULL for every head; backends that batch all heads into one tile
    (the xla backend) use this and evaluate the head-dependent predicate on PARTIAL tiles.
    """
    if self.num_heads == 1:
      return self
    k = self.kinds
    merged = np.where((k == FULL).all(0), FULL, np.where((k == EMPTY).all(0), EMPTY, PARTIAL))
    return _from_kinds(self.mask, self.q_len, self.kv_len, self.block_q, self.block_kv,
                       merged[None].astype(np.int32))

  def __repr__(self):
    return (f"BlockMask(mask={self.mask!r}, q_len={self.q_len}, kv_len={self.kv_len}, "
            f"block_q={self.block_q}, block_kv={self.block_kv}, heads={self.num_heads}, "
            f"tiles={self.kinds[0].shape}, full={self.num_full}, partial={self.num_partial}, "
            f"density={self.density:.3f})")

  def to_string(self, head: int = 0) -> str:
    """ASCII picture: '#' full, '+' partial, '.' empty."""
    chars = np.array([".", "+", "#"])
    return "\n".join("".join(row) for row in chars[self.kinds[head]])


def _lists(kinds: np.ndarray):
  """Per-row ordered lists of the non-empty columns of ``kinds`` [H, R, C]."""
  h, r, c = kinds.shape
  nonempty = kinds != EMPTY
  counts = nonempty.sum(-1).astype(np.int32)
  width = max(1, int(counts.max()) if counts.size else 1)
  # A stable argsort on "is empty" puts the non-empty columns first, in increasing order.
  order = np.argsort(~nonempty, axis=-1, kind="stable")[..., :width].astype(np.int32)
  slot = np.arange(width)[None, None, :]
  valid = slot < counts[..., None]
  last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], -1)
  indices = np.where(valid, order, np.where(counts[..., None] > 0, last, 0)).astype(np.int32)
  kinds_list = np.where(valid, np.take_along_axis(kinds, indices, -1), EMPTY).astype(np.int32)
  return indices, kinds_list, counts


def _from_kinds(mask, q_len, kv_len, block_q, block_kv, kinds) -> BlockMask:
  kv_indices, kv_kinds, kv_counts = _lists(kinds)
  q_indices, q_kinds, q_counts = _lists(np.swapaxes(kinds, 1, 2))
  arrays = dict(kinds=kinds, kv_indices=kv_indices, kv_kinds=kv_kinds, kv_counts=kv_counts,
                q_indices=q_indices, q_kinds=q_kinds, q_counts=q_counts)
  for a in arrays.values():
    a.setflags(write=False)
  return BlockMask(mask, q_len, kv_len, block_q, block_kv, **arrays)


def from_kinds(kinds: np.ndarray, *, q_len: int, kv_len: int, block_q: int, block_kv: int,
               mask: masks_lib.Mask) -> BlockMask:
  """Builds a BlockMask from a precomputed ``[Hm, nq, nk]`` classification.

  For callers that know their block structure analytically (e.g. neighborhood attention after
  token permutation). ``mask`` must agree with ``kinds``: backends evaluate it on PARTIAL tiles.
  """
  kinds = np.asarray(kinds, np.int32)
  if kinds.ndim == 2:
    kinds = kinds[None]
  expected = (_cdiv(q_len, block_q), _cdiv(kv_len, block_kv))
  if kinds.ndim != 3 or kinds.shape[1:] != expected:
    raise ValueError(f"kinds must have shape [Hm, {expected[0]}, {expected[1]}], got {kinds.shape}")
  return _from_kinds(mask, q_len, kv_len, block_q, block_kv, kinds.copy())


@dataclasses.dataclass(frozen=True, eq=False)
class PartialTiles:
  """The dense content of a BlockMask's PARTIAL tiles, deduplicated.

  For masks a kernel cannot evaluate from iotas (block layouts, user tables), the kernel reads the
  tile of each PARTIAL entry instead. Causal, windowed and neighborhood patterns repeat a handful
  of distinct tiles, so the table stays small.

  Attributes:
    tiles: ``[U, block_q, block_kv]`` int8, 1 where visible (key padding and padded query rows 0).
    kv_tile_ids: ``[Hm, nq, max_kv]`` int32, for each entry of ``kv_indices`` the row of ``tiles``
      (0 for FULL and padding entries, which never read it).
    q_tile_ids: ``[Hm, nk, max_q]`` int32, the same for the transposed lists.
  """

  tiles: np.ndarray
  kv_tile_ids: np.ndarray
  q_tile_ids: np.ndarray


def partial_tiles(bm: BlockMask) -> PartialTiles:
  """Computes (once per BlockMask) the deduplicated dense tiles of its PARTIAL entries."""
  if "partial_tiles" in bm._cache:
    return bm._cache["partial_tiles"]
  ctx = masks_lib.MaskContext(bm.q_len, bm.kv_len)
  bq, bk = bm.block_q, bm.block_kv
  head_dep = bm.mask.depends_on_head
  pairs = np.argwhere(bm.kinds == PARTIAL)  # [P, 3]: head, q block, kv block
  tile_id = np.zeros(bm.kinds.shape, np.int32)
  unique: dict[bytes, int] = {}
  tiles = []
  rows = np.arange(bq)
  cols = np.arange(bk)
  step = max(1, _REFINE_CHUNK_ELEMENTS // (bq * bk))
  for start in range(0, len(pairs), step):
    chunk = pairs[start:start + step]
    qi = chunk[:, 1, None, None] * bq + rows[None, :, None]
    kj = chunk[:, 2, None, None] * bk + cols[None, None, :]
    head = chunk[:, 0, None, None] if head_dep else None
    values = bm.mask.evaluate(np.minimum(qi, bm.q_len - 1), np.minimum(kj, bm.kv_len - 1), head, ctx, np)
    values = np.broadcast_to(np.asarray(values, bool), (len(chunk), bq, bk))
    values = (values & (qi < bm.q_len) & (kj < bm.kv_len)).astype(np.int8)
    for (h, i, j), tile in zip(chunk, values):
      key = tile.tobytes()
      if key not in unique:
        unique[key] = len(tiles)
        tiles.append(tile)
      tile_id[h, i, j] = unique[key]
  if not tiles:
    tiles.append(np.zeros((bq, bk), np.int8))
  table = np.stack(tiles)
  kv_tile_ids = np.take_along_axis(tile_id, bm.kv_indices, axis=-1).astype(np.int32)
  q_tile_ids = np.take_along_axis(np.swapaxes(tile_id, 1, 2), bm.q_indices, axis=-1).astype(np.int32)
  for a in (table, kv_tile_ids, q_tile_ids):
    a.setflags(write=False)
  result = PartialTiles(table, kv_tile_ids, q_tile_ids)
  bm._cache["partial_tiles"] = result
  return result


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
  else:
    num_heads = None
  return _make_block_mask_cached(mask, int(q_len), int(kv_len), int(block_q), int(block_kv), num_heads)


@functools.lru_cache(maxsize=256)
def _make_block_mask_cached(mask, q_len, kv_len, block_q, block_kv, num_heads) -> BlockMask:
  ctx = masks_lib.MaskContext(q_len, kv_len)
  mask.validate(ctx)
  if isinstance(mask, masks_lib.ArrayMask):
    return _from_dense_array(mask, q_len, kv_len, block_q, block_kv, num_heads)
  nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)
  q_lo = (np.arange(nq) * block_q)[:, None]
  q_hi = np.minimum(q_lo + block_q, q_len) - 1
  k_lo = (np.arange(nk) * block_kv)[None, :]
  k_hi = np.minimum(k_lo + block_kv, kv_len) - 1
  k_padded = np.broadcast_to(k_lo + block_kv > kv_len, (nq, nk))

  may, must = mask.block_bounds(q_lo, q_hi, k_lo, k_hi, ctx)
  may = np.broadcast_to(np.asarray(may, bool), (nq, nk))
  must = np.broadcast_to(np.asarray(must, bool), (nq, nk)) & may
  # Masks whose bounds are exact on (some) rectangles classify those as partial without the
  # element-wise check below, which dominates compile time for large grids.
  exact = np.broadcast_to(np.asarray(mask.block_bounds_exact(q_lo, q_hi, k_lo, k_hi, ctx), bool), (nq, nk))
  hm = num_heads or 1
  known_partial = must | (may & exact)
  kinds = np.where(must & ~k_padded, FULL, np.where(known_partial, PARTIAL, EMPTY)).astype(np.int32)
  kinds = np.repeat(kinds[None], hm, axis=0)

  undecided = np.argwhere(may & ~must & ~exact)
  rows = np.arange(block_q)
  cols = np.arange(block_kv)
  head = np.arange(hm)[:, None, None, None] if num_heads else None
  per_pair = hm * block_q * block_kv
  step = max(1, _REFINE_CHUNK_ELEMENTS // per_pair)
  for start in range(0, len(undecided), step):
    pairs = undecided[start:start + step]
    qi = pairs[:, 0, None, None] * block_q + rows[None, :, None]   # [P, bq, 1]
    kj = pairs[:, 1, None, None] * block_kv + cols[None, None, :]  # [P, 1, bk]
    q_valid = qi < q_len
    k_valid = kj < kv_len
    # Evaluate on clipped indices so that table lookups (block layouts, user tables) stay in
    # range; the validity masks then discard the clipped positions.
    values = mask.evaluate(np.minimum(qi, q_len - 1), np.minimum(kj, kv_len - 1), head, ctx, np)
    values = np.broadcast_to(np.asarray(values, bool), (hm,) + np.broadcast_shapes(qi.shape, kj.shape))
    any_ = (values & q_valid & k_valid).any((-1, -2))                    # [Hm, P]
    all_ = (values | ~q_valid).all((-1, -2)) & k_valid.all((-1, -2))     # [Hm, P]
    kind = np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY))
    kinds[:, pairs[:, 0], pairs[:, 1]] = kind
  return _from_kinds(mask, q_len, kv_len, block_q, block_kv, kinds)


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
  return _from_kinds(mask, q_len, kv_len, block_q, block_kv, kinds)
