"""A BlockMask built on the device, inside ``jit``, from data: content-dependent block sparsity.

:mod:`attn_jax.block_mask` compiles a mask that depends on positions only into host NumPy lists,
once per shape. Mechanisms that choose their keys from the data (block top-k as in MoBA and NSA,
learned dynamic masks, routing) need the same lists computed from arrays that only exist inside
a traced computation. :class:`TracedBlockMask` is that structure: the same description the
kernels consume, as device arrays with static shapes.

Semantics. A query ``i`` may attend to key ``j`` iff its query block ``i // block_q`` selected
the key block ``j // block_kv`` *and* the static ``mask`` (causal, window, ...) allows the pair.
The selection works on blocks; the static mask keeps its token-level exactness on top of it.
Every selected entry carries the static mask's tile kind at these block sizes: FULL (every pair
visible, no predicate evaluated) or PARTIAL (the predicate is evaluated on the tile); blocks the
static mask marks EMPTY are never selected, whatever the scores say.

Layout (``Bm`` is 1 or the batch size, ``Hm`` is 1, the number of K/V heads (one selection per
GQA group) or the number of query heads):

* ``kv_indices, kv_kinds``: ``[Bm, Hm, nq, W]`` for each query block its selected key blocks in
  increasing order; entries past ``kv_counts`` repeat the last valid index (a pipelined kernel
  then fetches nothing new) with kind EMPTY. ``W``, the maximum number of key blocks per row, is
  static: it is what keeps every shape static while the data changes.
* ``kv_counts``: ``[Bm, Hm, nq]``.
* ``q_offsets``: ``[Bm, Hm, nk + 1]`` and ``q_indices, q_kinds``: ``[Bm, Hm, nq * W]``: the
  transposed lists for the dK/dV pass in compressed-row form: the query blocks that selected key
  block ``j`` are ``q_indices[..., q_offsets[j]:q_offsets[j + 1]]``, in increasing order.

Why the transposed lists are compressed rows and not ``[nk, Wq]`` padded rows like the static
BlockMask's: the selection is data-dependent, so the only bound on how many query blocks select
one key block that cannot overflow is ``nq`` (every row may choose the same block; in practice
the first block, the attention sink, is chosen by nearly every row). Padded rows of width ``nq``
are as large as a dense ``[nq, nk]`` table. The transposition of ``nq * W`` entries has at most
``nq * W`` entries, so compressed rows with that static capacity are exact and exactly as large
as the forward lists. They are built by one sort of the ``nq * W`` entries by (key block,
query block) and a ``searchsorted`` for the row offsets.

Construct with :func:`from_scores` (top-k of per-block scores, plus static ``keep`` blocks) or
:func:`from_indices` (explicit block indices, deduplicated and filtered by the static mask).
Pass to :func:`attn_jax.attention` as ``block_mask=``. Changing the data does not recompile:
the class is a pytree whose static part (lengths, block sizes, static mask) is its tree
structure.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attn_jax import block_mask as block_mask_lib
from attn_jax import masks as masks_lib

__all__ = ["TracedBlockMask", "Layout", "from_scores", "from_indices"]

EMPTY = block_mask_lib.EMPTY
PARTIAL = block_mask_lib.PARTIAL
FULL = block_mask_lib.FULL


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Layout:
  """The static part of a :class:`TracedBlockMask` (hashable; part of the pytree structure)."""

  q_len: int
  kv_len: int
  block_q: int
  block_kv: int
  mask: masks_lib.Mask

  @property
  def num_q_blocks(self) -> int:
    return _cdiv(self.q_len, self.block_q)

  @property
  def num_kv_blocks(self) -> int:
    return _cdiv(self.kv_len, self.block_kv)

  @property
  def static_block_mask(self) -> block_mask_lib.BlockMask:
    """The static mask's (host, memoised) BlockMask at these block sizes."""
    return block_mask_lib.make_block_mask(self.mask, self.q_len, self.kv_len, self.block_q, self.block_kv)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class TracedBlockMask:
  """Block lists computed on the device (see the module docstring for the layout).

  Attributes:
    kv_indices, kv_kinds: ``[Bm, Hm, nq, W]`` int32.
    kv_counts: ``[Bm, Hm, nq]`` int32.
    q_offsets: ``[Bm, Hm, nk + 1]`` int32.
    q_indices, q_kinds: ``[Bm, Hm, nq * W]`` int32.
    layout: the static :class:`Layout`.
  """

  kv_indices: jax.Array
  kv_kinds: jax.Array
  kv_counts: jax.Array
  q_offsets: jax.Array
  q_indices: jax.Array
  q_kinds: jax.Array
  layout: Layout

  def tree_flatten(self):
    return ((self.kv_indices, self.kv_kinds, self.kv_counts, self.q_offsets, self.q_indices,
             self.q_kinds), self.layout)

  @classmethod
  def tree_unflatten(cls, layout, children):
    return cls(*children, layout)

  @property
  def mask(self) -> masks_lib.Mask:
    return self.layout.mask

  @property
  def block_q(self) -> int:
    return self.layout.block_q

  @property
  def block_kv(self) -> int:
    return self.layout.block_kv

  @property
  def num_batch(self) -> int:
    """``Bm``: 1 (one selection for every batch row) or the batch size."""
    return self.kv_indices.shape[0]

  @property
  def num_heads(self) -> int:
    """``Hm``: 1, the number of K/V heads, or the number of query heads."""
    return self.kv_indices.shape[1]

  @property
  def width(self) -> int:
    """``W``: the static maximum number of key blocks per query block."""
    return self.kv_indices.shape[3]

  def dense_kinds(self) -> jax.Array:
    """``[Bm, Hm, nq, nk]`` int32 kinds (EMPTY where not selected), built on the device.

    For the reference backend, tests and plots: ``O(nq * nk)`` memory per (batch, head).
    """
    bm, hm, nq, w = self.kv_indices.shape
    nk = self.layout.num_kv_blocks
    valid = jnp.arange(w) < self.kv_counts[..., None]
    cols = jnp.where(valid, self.kv_indices, nk)
    dense = jnp.zeros((bm, hm, nq, nk + 1), jnp.int32)
    b = jnp.arange(bm)[:, None, None, None]
    h = jnp.arange(hm)[None, :, None, None]
    i = jnp.arange(nq)[None, None, :, None]
    dense = dense.at[b, h, i, cols].max(jnp.where(valid, self.kv_kinds, EMPTY))
    return dense[..., :nk]

  def token_visibility(self) -> jax.Array:
    """``[Bm, Hm, q_len, kv_len]`` bool: selected block and static mask, token by token."""
    lay = self.layout
    selected = self.dense_kinds() != EMPTY
    qb = jnp.arange(lay.q_len) // lay.block_q
    kb = jnp.arange(lay.kv_len) // lay.block_kv
    tokens = selected[:, :, qb][:, :, :, kb]
    ctx = masks_lib.MaskContext(lay.q_len, lay.kv_len)
    static = lay.mask.evaluate(jnp.arange(lay.q_len)[:, None], jnp.arange(lay.kv_len)[None, :], None, ctx, jnp)
    return tokens & static

  def check_compatible(self, batch: int, q_len: int, kv_len: int, num_q_heads: int, num_kv_heads: int):
    """ValueError naming ``block_mask`` unless it fits q ``[batch, q_len, Hq, D]`` and k ``[batch, kv_len, Hkv, D]``."""
    lay = self.layout
    if (lay.q_len, lay.kv_len) != (q_len, kv_len):
      raise ValueError(f"block_mask was built for q_len={lay.q_len}, kv_len={lay.kv_len}; the call has "
                       f"q_len={q_len}, kv_len={kv_len}: expected equal lengths")
    if self.num_batch not in (1, batch):
      raise ValueError(f"block_mask has batch dimension {self.num_batch}: expected 1 or the batch size {batch}")
    heads = sorted({1, num_kv_heads, num_q_heads})
    if self.num_heads not in heads:
      raise ValueError(f"block_mask has {self.num_heads} heads: expected one of {heads} (1, the K/V heads "
                       f"or the query heads)")
    shapes = {"kv_indices": (lay.num_q_blocks, self.width), "kv_kinds": (lay.num_q_blocks, self.width),
              "kv_counts": (lay.num_q_blocks,), "q_offsets": (lay.num_kv_blocks + 1,),
              "q_indices": (lay.num_q_blocks * self.width,), "q_kinds": (lay.num_q_blocks * self.width,)}
    for name, tail in shapes.items():
      got = tuple(getattr(self, name).shape)
      if got != (self.num_batch, self.num_heads) + tail:
        raise ValueError(f"block_mask.{name} has shape {got}: expected {(self.num_batch, self.num_heads) + tail}")

  def __repr__(self):
    lay = self.layout
    return (f"TracedBlockMask(mask={lay.mask!r}, q_len={lay.q_len}, kv_len={lay.kv_len}, block_q={lay.block_q}, "
            f"block_kv={lay.block_kv}, batch={self.num_batch}, heads={self.num_heads}, width={self.width})")


def _check_positive(name, value):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


def _layout(q_len, kv_len, block_q, block_kv, mask) -> Layout:
  q_len, kv_len = _check_positive("q_len", q_len), _check_positive("kv_len", kv_len)
  block_q, block_kv = _check_positive("block_q", block_q), _check_positive("block_kv", block_kv)
  if mask is None:
    mask = masks_lib.full()
  if not isinstance(mask, masks_lib.Mask):
    raise ValueError(f"mask must be an attn_jax.masks.Mask or None, got {type(mask).__name__}")
  if mask.depends_on_head:
    raise ValueError(f"mask must not depend on the head for a traced block mask (the selection carries the "
                     f"per-head part), got {mask!r}")
  mask.validate(masks_lib.MaskContext(q_len, kv_len))
  return Layout(q_len, kv_len, block_q, block_kv, mask)


def _check_leading(name, x, lay: Layout, last: int | None, last_name: str):
  """Arrays are ``[Bm, Hm, nq, last]`` with ``nq`` fixed by the layout."""
  if not hasattr(x, "shape") or x.ndim != 4:
    shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
    raise ValueError(f"{name} must have shape [batch or 1, heads, num_q_blocks, {last_name}], got {shape}")
  nq = lay.num_q_blocks
  if x.shape[2] != nq or (last is not None and x.shape[3] != last):
    want = f"[batch or 1, heads, {nq}, {last if last is not None else last_name}]"
    raise ValueError(f"{name} must have shape {want} for q_len={lay.q_len}, kv_len={lay.kv_len}, "
                     f"block_q={lay.block_q}, block_kv={lay.block_kv}; got {tuple(x.shape)}")


def _compact(idx, valid, lay: Layout, width: int):
  """Rows of candidate key blocks -> sorted, deduplicated, EMPTY-free lists of ``width`` entries."""
  nk = lay.num_kv_blocks
  static = jnp.asarray(lay.static_block_mask.dense_kinds()[0])                      # [nq, nk]
  rows = jnp.arange(static.shape[0])[:, None]
  idx = idx.astype(jnp.int32)
  valid = valid & (idx >= 0) & (idx < nk)
  safe = jnp.clip(idx, 0, nk - 1)
  valid = valid & (static[rows, safe] != EMPTY)
  # Sorting with the sentinel nk for invalid entries puts the valid ones first, in increasing
  # order; duplicates become neighbours, are turned into sentinels, and a second sort drops them.
  key = jnp.sort(jnp.where(valid, safe, nk), axis=-1)
  dup = jnp.concatenate([jnp.zeros_like(key[..., :1], bool), key[..., 1:] == key[..., :-1]], axis=-1)
  key = jnp.sort(jnp.where(dup, nk, key), axis=-1)[..., :width]
  counts = (key < nk).sum(-1).astype(jnp.int32)
  slot = jnp.arange(width)
  in_list = slot < counts[..., None]
  last = jnp.take_along_axis(key, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  indices = jnp.where(in_list, key, jnp.where(counts[..., None] > 0, last, 0)).astype(jnp.int32)
  kinds = jnp.where(in_list, static[rows, indices], EMPTY).astype(jnp.int32)
  return indices, kinds, counts


def _transpose(indices, kinds, counts, nk: int):
  """Compressed-row transposed lists: ``(q_offsets [.., nk+1], q_indices, q_kinds [.., nq*W])``."""
  bm, hm, nq, w = indices.shape
  flat_j = indices.reshape(bm * hm, nq * w)
  flat_kind = kinds.reshape(bm * hm, nq * w)
  flat_i = jnp.broadcast_to(jnp.repeat(jnp.arange(nq, dtype=jnp.int32), w), flat_j.shape)
  valid = (jnp.arange(w) < counts[..., None]).reshape(bm * hm, nq * w)
  key_j = jnp.where(valid, flat_j, nk)
  # One sort by (key block, query block): the entries of key block j become a contiguous run, its
  # query blocks in increasing order; invalid entries (key nk) go last.
  key_j, q_idx, q_kind = lax.sort((key_j, flat_i, flat_kind), dimension=-1, num_keys=2)
  live = key_j < nk
  q_idx = jnp.where(live, q_idx, 0)
  q_kind = jnp.where(live, q_kind, EMPTY)
  bounds = jnp.arange(nk + 1, dtype=jnp.int32)
  offsets = jax.vmap(lambda row: jnp.searchsorted(row, bounds, side="left"))(key_j).astype(jnp.int32)
  shape = (bm, hm)
  return (offsets.reshape(shape + (nk + 1,)), q_idx.reshape(shape + (nq * w,)),
          q_kind.reshape(shape + (nq * w,)))


def _build(indices, kinds, counts, lay: Layout) -> TracedBlockMask:
  q_offsets, q_indices, q_kinds = _transpose(indices, kinds, counts, lay.num_kv_blocks)
  return TracedBlockMask(indices, kinds, counts, q_offsets, q_indices, q_kinds, lay)


def from_indices(indices, *, q_len: int, kv_len: int, block_q: int, block_kv: int, valid=None,
                 mask: masks_lib.Mask | None = None) -> TracedBlockMask:
  """A traced BlockMask from explicit key-block indices per query block.

  Args:
    indices: ``[Bm, Hm, nq, W]`` integer key-block indices (traced or not; any order; duplicates
      allowed). Entries outside ``[0, nk)``, where ``valid`` is False, or on blocks the static
      ``mask`` leaves EMPTY are dropped. ``W`` becomes the static width.
    q_len, kv_len, block_q, block_kv: lengths and block sizes (static).
    valid: optional ``[Bm, Hm, nq, W]`` bool.
    mask: the static mask the selection is combined with (None: full).

  Returns:
    The :class:`TracedBlockMask`; its lists are sorted and deduplicated.
  """
  lay = _layout(q_len, kv_len, block_q, block_kv, mask)
  indices = jnp.asarray(indices)
  _check_leading("indices", indices, lay, None, "W")
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f"indices must have an integer dtype, got {indices.dtype}")
  if indices.shape[3] < 1:
    raise ValueError(f"indices must have at least one entry per row (W >= 1), got shape {tuple(indices.shape)}")
  if valid is None:
    valid = jnp.ones(indices.shape, bool)
  else:
    valid = jnp.asarray(valid)
    if valid.shape != indices.shape or valid.dtype != jnp.bool_:
      raise ValueError(f"valid must be a bool array of the shape of indices {tuple(indices.shape)}, "
                       f"got {valid.dtype}{tuple(valid.shape)}")
  width = min(indices.shape[3], lay.num_kv_blocks)
  return _build(*_compact(indices, valid, lay, width), lay)


@functools.lru_cache(maxsize=64)
def _keep_lists(lay: Layout, keep: masks_lib.Mask):
  """Host lists of the blocks ``keep`` always selects (non-empty under keep and the static mask)."""
  kept = block_mask_lib.make_block_mask(keep & lay.mask, lay.q_len, lay.kv_len, lay.block_q, lay.block_kv)
  idx, _, counts = kept.padded_rows()
  return idx, counts, kept.dense_kinds()[0] != EMPTY


def from_scores(scores, top_k: int, *, q_len: int, kv_len: int, block_q: int, block_kv: int,
                mask: masks_lib.Mask | None = None, keep: masks_lib.Mask | None = None) -> TracedBlockMask:
  """Each query block keeps the ``top_k`` highest-scoring key blocks, plus the ``keep`` blocks.

  Args:
    scores: ``[Bm, Hm, nq, nk]`` float scores of (query block, key block) pairs, computed inside
      ``jit`` from the data (e.g. pooled queries times pooled keys). ``-inf`` and NaN entries are
      never selected; ties go to the lower block index (``lax.top_k``).
    top_k: number of key blocks chosen from the scores per row, an int in ``[0, nk]``. Rows with
      fewer eligible blocks keep all of them.
    q_len, kv_len, block_q, block_kv: lengths and block sizes (static).
    mask: static mask combined with the selection (e.g. ``masks.causal()``); blocks it leaves
      EMPTY are never chosen, so ``top_k`` counts eligible blocks only.
    keep: a static mask whose non-empty blocks are selected in every row on top of the
      ``top_k`` (e.g. the diagonal block under causal masking, or a block-aligned local window).
      It acts on blocks: a kept block's tokens are visible as far as ``mask`` allows.

  Returns:
    The :class:`TracedBlockMask`, with static width ``min(nk, top_k + max kept blocks per row)``.
    The selection is not differentiable (integer indices); gradients of attention flow through
    the selected keys only.
  """
  lay = _layout(q_len, kv_len, block_q, block_kv, mask)
  scores = jnp.asarray(scores)
  nk = lay.num_kv_blocks
  _check_leading("scores", scores, lay, nk, "num_kv_blocks")
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    raise ValueError(f"scores must have a floating dtype, got {scores.dtype}")
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= nk:
    raise ValueError(f"top_k must be an int in [0, num_kv_blocks={nk}], got {top_k!r}")
  top_k = int(top_k)
  if keep is not None and not isinstance(keep, masks_lib.Mask):
    raise ValueError(f"keep must be an attn_jax.masks.Mask or None, got {type(keep).__name__}")
  lead = scores.shape[:2]
  parts, valids = [], []
  eligible = jnp.asarray(lay.static_block_mask.dense_kinds()[0] != EMPTY)
  if keep is not None:
    keep_idx, keep_cnt, keep_dense = _keep_lists(lay, keep)
    eligible = eligible & ~jnp.asarray(keep_dense)
    wk = keep_idx.shape[-1]
    parts.append(jnp.broadcast_to(jnp.asarray(keep_idx), lead + keep_idx.shape))
    valids.append(jnp.broadcast_to(jnp.arange(wk) < jnp.asarray(keep_cnt)[:, None], lead + keep_idx.shape))
  if top_k > 0:
    candidates = jnp.where(eligible, scores.astype(jnp.float32), -jnp.inf)
    candidates = jnp.where(jnp.isnan(candidates), -jnp.inf, candidates)
    values, idx = lax.top_k(lax.stop_gradient(candidates), top_k)
    parts.append(idx)
    valids.append(values > -jnp.inf)
  if not parts:
    parts.append(jnp.zeros(lead + (lay.num_q_blocks, 1), jnp.int32))
    valids.append(jnp.zeros(lead + (lay.num_q_blocks, 1), bool))
  idx = jnp.concatenate(parts, axis=-1)
  valid = jnp.concatenate(valids, axis=-1)
  width = max(1, min(nk, idx.shape[-1]))
  return _build(*_compact(idx, valid, lay, width), lay)


def expand_heads(x, axis: int, num_q_heads: int, num_kv_heads: int):
  """Splits a list-head axis of size ``Hm`` (1, Hkv or Hq) into ``(Hkv or 1, G or 1)`` axes.

  The result broadcasts against arrays laid out ``[..., Hkv, G, ...]`` (queries of a GQA group
  next to each other), which is how the softmax backends view query heads.
  """
  hm = x.shape[axis]
  g = num_q_heads // num_kv_heads
  if hm == num_kv_heads:
    split = (hm, 1)
  elif hm == num_q_heads:
    split = (num_kv_heads, g)
  else:  # hm == 1
    split = (1, 1)
  return x.reshape(x.shape[:axis] + split + x.shape[axis + 1:])


def check_tile_config(owner: str, config, layout: Layout) -> None:
  """ValueError unless ``config``'s block sizes are None or the traced mask's own blocks.

  A traced BlockMask's lists index its blocks, so a backend serving it tiles with those blocks.
  """
  for name, want in (("block_q", layout.block_q), ("block_kv", layout.block_kv)):
    got = getattr(config, name)
    if got is not None and got != want:
      raise ValueError(f"{owner}.{name}={got} differs from the traced block_mask's {name}={want}: "
                       f"with block_mask= the tiles are the mask's blocks (leave {name} None)")
