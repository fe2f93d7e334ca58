"""What the block-sparse flash kernels of every platform share: schedules and the mask spec.

The kernels never see a mask object. They receive

* a schedule of the non-empty tiles of a BlockMask. Two forms:

  - :class:`Lists` (GPU): compressed sparse rows, one list of entries per query block (or key
    block), each entry a block index, a tile kind and, when the mask cannot be evaluated from
    iotas, the index of the entry's precomputed tile. A program loops over its row's entries.
  - :class:`Steps` (TPU): one grid step per entry, for every query block (or key block) in
    turn, so a row of two tiles costs two steps however long the longest row is. Each entry is
    packed into the smallest integers that hold it (:class:`EntryLayout`): the row and column
    block, the kind, first / last-of-row flags and the tile id. Distinct lists are stored once
    with a unit -> list map (one unit per head, or per group of heads). Lists longer than the
    scalar memory allows are cut into bands of whole rows, each band one kernel call.

* a static :class:`MaskSpec`: how to evaluate PARTIAL tiles (an iota predicate or tiles) and
  which tile kinds occur at all, so that kernels compile only the branches they need.

Tile kinds use the same integers as ``attn_jax.block_mask``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

EMPTY = 0
PARTIAL = 1
FULL = 2

# Kinds of a step entry: IDLE pads a band's list to the band's length (nothing runs, nothing is
# fetched: it repeats the previous entry's blocks); EMPTY_ROW stands for a row without tiles, so
# that its output (zeros, or the sink) is still written.
IDLE = 0
EMPTY_ROW = 3

# A masked logit is the float32 minimum rather than -inf, so that a running maximum over a row
# whose visible keys have not appeared yet stays finite and exp(m_old - m_new) is never NaN.
NEG_INF = -3.4028234663852886e38


class Lists(NamedTuple):
  """Compressed sparse rows of a BlockMask, as int32 device arrays (GPU kernels).

  Attributes:
    head_map: ``[Hq_local]`` the list of each (local) query head.
    ptr: ``[M * (n_rows + 1)]`` flattened ``[M, n_rows + 1]``: the entries of row ``r`` in list
      ``m`` are ``ptr[m * (n_rows + 1) + r] : ptr[m * (n_rows + 1) + r + 1]``.
    idx: ``[N]`` the other block of each entry (key block of a query row, or vice versa).
    kinds: ``[N]`` PARTIAL / FULL.
    tile_ids: ``[N]`` row of the tile table for PARTIAL entries when ``MaskSpec.use_tiles``.
  """

  head_map: jax.Array
  ptr: jax.Array
  idx: jax.Array
  kinds: jax.Array
  tile_ids: jax.Array


_DTYPES = ((8, np.int8), (16, np.int16), (32, np.int32))


@dataclasses.dataclass(frozen=True)
class EntryLayout:
  """Bit layout of packed step entries (static, hashable).

  Attributes:
    fields: ``(name, word, shift, bits)`` per field; a field lives in bits
      ``[shift, shift + bits)`` of word ``word``.
    word_bits: the integer width of each word array (8, 16 or 32).
  """

  fields: tuple[tuple[str, int, int, int], ...]
  word_bits: tuple[int, ...]

  @staticmethod
  def make(widths: dict[str, int]) -> "EntryLayout":
    """Packs fields of the given bit widths (0 = absent) into as few, as small words as possible."""
    fields, word_used = [], []
    for name, bits in widths.items():
      if bits == 0:
        continue
      if bits > 31:
        raise ValueError(f"schedule field {name} needs {bits} bits, more than 31")
      for w, used in enumerate(word_used):
        if used + bits <= 32:
          fields.append((name, w, used, bits))
          word_used[w] += bits
          break
      else:
        fields.append((name, len(word_used), 0, bits))
        word_used.append(bits)
    word_bits = tuple(next(b for b, _ in _DTYPES if used <= b) for used in word_used)
    return EntryLayout(tuple(fields), word_bits)

  @property
  def dtypes(self):
    return tuple(dict(_DTYPES)[b] for b in self.word_bits)

  @property
  def bytes_per_entry(self) -> int:
    return sum(b // 8 for b in self.word_bits)

  def has(self, name: str) -> bool:
    return any(f[0] == name for f in self.fields)

  def pack(self, values: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Host side: packs int arrays (missing fields are 0) into one array per word."""
    shape = np.shape(next(iter(values.values())))
    words = [np.zeros(shape, np.uint64) for _ in self.word_bits]
    for name, w, shift, bits in self.fields:
      v = np.asarray(values.get(name, 0), np.int64)
      if v.size and (v.min() < 0 or v.max() >= (1 << bits)):
        raise ValueError(f"schedule field {name} out of range for {bits} bits: [{v.min()}, {v.max()}]")
      words[w] |= (v.astype(np.uint64) << np.uint64(shift))
    out = []
    for word, bits, dtype in zip(words, self.word_bits, self.dtypes):
      unsigned = {8: np.uint8, 16: np.uint16, 32: np.uint32}[bits]
      out.append(word.astype(unsigned).view(dtype))
    return tuple(out)

  def unpack(self, words: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
    """Host side: the inverse of :meth:`pack` (for tests)."""
    out = {}
    for name, w, shift, bits in self.fields:
      unsigned = {8: np.uint8, 16: np.uint16, 32: np.uint32}[self.word_bits[w]]
      raw = np.asarray(words[w]).view(unsigned).astype(np.int64)
      out[name] = (raw >> shift) & ((1 << bits) - 1)
    return out

  def decode(self, refs, index) -> dict[str, Any]:
    """Kernel side: the fields of entry ``index`` of the word refs, as int32 scalars."""
    loaded = [refs[w][index].astype(jnp.int32) for w in range(len(self.word_bits))]
    out = {}
    for name, w, shift, bits in self.fields:
      v = loaded[w]
      if shift:
        v = lax.shift_right_logical(v, jnp.int32(shift))
      if shift + bits < 32:
        v = v & jnp.int32((1 << bits) - 1)
      out[name] = v
    return out


class Steps(NamedTuple):
  """A step schedule (TPU kernels), as device arrays.

  Attributes:
    words: one array per word of the layout, ``[num_bands, L * C]``: entry ``s`` of list ``l``
      in band ``b`` is at ``[b, l * C + s]``; each band is one kernel call. Fields: ``row`` (the block that owns the step: a query block for the
      forward and dQ passes, a key block for dK/dV), ``col`` (the other block), ``kind``,
      ``first`` / ``last`` (of the row), ``g`` (which sub-group of query heads, dK/dV only) and
      ``tile`` (tile table row).
    unit_map: ``[units_local]`` int32, the list of each grid unit (a query head, or a group).
  """

  words: tuple[jax.Array, ...]
  unit_map: jax.Array


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Static description of how kernels mask tiles.

  Attributes:
    predicate: ``f(q_idx, kv_idx, head) -> bool`` on int32 arrays (jnp ops only), evaluated
      in-kernel on PARTIAL tiles; None when ``use_tiles`` (or when no tile is partial).
    use_tiles: PARTIAL tiles read their precomputed tile from the tile table.
    per_head: the mask depends on the query head.
    has_full, has_partial: whether any FULL / PARTIAL entry exists; kernels compile only the
      branches that can run.
    head_group: with ``per_head``, query head ``h`` reads list row ``h // head_group`` (1: one
      list per query head; the GQA group size: one list per K/V head).
    per_batch: the lists have a batch axis folded into their rows: batch ``b`` reads rows
      ``b * list_heads + ...`` (traced BlockMasks, whose selection depends on the data).
    list_heads: number of head rows per batch entry (used with ``per_batch``).
    csr_transposed: the transposed lists are compressed rows (traced BlockMasks): ``q_counts``
      holds ``[rows, nk + 1]`` offsets and ``q_indices`` / ``q_kinds`` are ``[rows, nq * W]``;
      key block ``j`` walks entries ``q_counts[r, j] .. q_counts[r, j + 1] - 1``.
  """

  predicate: Callable[[Any, Any, Any], Any] | None
  use_tiles: bool
  per_head: bool
  has_full: bool
  has_partial: bool
  head_group: int = 1
  per_batch: bool = False
  list_heads: int = 1
  csr_transposed: bool = False

  def __post_init__(self):
    if self.has_partial and (self.predicate is None) == (not self.use_tiles):
      raise ValueError("a MaskSpec with partial tiles needs exactly one of predicate and use_tiles")


def list_row(mask: MaskSpec, b, h):
  """The schedule row that (batch ``b``, query head ``h``) reads."""
  row = h // mask.head_group if mask.per_head else 0
  if mask.per_batch:
    row = b * mask.list_heads + row
  return row
