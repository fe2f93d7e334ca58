"""What the block-sparse flash kernels of every platform share: the schedule and the mask spec.

The kernels never see a mask object. They receive

* a :class:`Schedule`: integer arrays listing, for every query block, its non-empty key blocks
  (and the transposed lists for the dK/dV pass), each entry marked FULL or PARTIAL, plus, when
  the mask cannot be evaluated from iotas, the index of the entry's precomputed tile;
* a static :class:`MaskSpec`: how to evaluate PARTIAL tiles (an iota predicate or tiles) and
  which tile kinds occur at all, so that kernels compile only the branches they need.

Tile kinds use the same integers as ``attn_jax.block_mask``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax

EMPTY = 0
PARTIAL = 1
FULL = 2

# A masked logit is the float32 minimum rather than -inf, so that a running maximum over a row
# whose visible keys have not appeared yet stays finite and exp(m_old - m_new) is never NaN.
NEG_INF = -3.4028234663852886e38


class Schedule(NamedTuple):
  """Block lists of a BlockMask as device arrays (int32). ``Hm`` is 1 unless per-head.

  Attributes:
    kv_indices, kv_kinds, kv_tile_ids: ``[Hm, nq, Wk]``; kv_counts: ``[Hm, nq]``.
    q_indices, q_kinds, q_tile_ids: ``[Hm, nk, Wq]``; q_counts: ``[Hm, nk]``.
    tiles: ``[U, block_q, block_kv]`` int8 (1 = visible) when ``MaskSpec.use_tiles``, else a
      ``[1, 1, 1]`` placeholder that no kernel reads.
  """

  kv_indices: jax.Array
  kv_kinds: jax.Array
  kv_counts: jax.Array
  kv_tile_ids: jax.Array
  q_indices: jax.Array
  q_kinds: jax.Array
  q_counts: jax.Array
  q_tile_ids: jax.Array
  tiles: jax.Array


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Static description of how kernels mask tiles.

  Attributes:
    predicate: ``f(q_idx, kv_idx, head) -> bool`` on int32 arrays (jnp ops only), evaluated
      in-kernel on PARTIAL tiles; None when ``use_tiles`` (or when no tile is partial).
    use_tiles: PARTIAL tiles read their precomputed tile from ``Schedule.tiles``.
    per_head: the schedule has one set of lists per query head (head-dependent mask).
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
