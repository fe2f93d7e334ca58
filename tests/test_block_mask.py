"""BlockMask classification against brute-force tiling of the dense mask."""

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from attn_jax import block_mask as bm_lib
from attn_jax import masks


def brute_kinds(dense, block_q, block_kv):
  """Classify tiles from a dense [H, q_len, kv_len] mask; padded rows don't care."""
  h, q_len, kv_len = dense.shape
  nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
  kinds = np.zeros((h, nq, nk), np.int32)
  for i in range(nq):
    rows = dense[:, i * block_q:(i + 1) * block_q]
    for j in range(nk):
      tile = rows[:, :, j * block_kv:(j + 1) * block_kv]
      padded = (j + 1) * block_kv > kv_len
      anyv = tile.any((1, 2))
      allv = tile.all((1, 2)) & (not padded)
      kinds[:, i, j] = np.where(allv, bm_lib.FULL, np.where(anyv, bm_lib.PARTIAL, bm_lib.EMPTY))
  return kinds


def check_lists(bm):
  """The sparse row and column lists hold exactly the non-empty tiles of the dense picture."""
  kinds = bm.dense_kinds()
  for h in range(bm.num_heads):
    for i in range(bm.num_q_blocks):
      expected = np.nonzero(kinds[h, i])[0]
      cols, row_kinds = bm.row(h, i)
      np.testing.assert_array_equal(cols, expected)
      np.testing.assert_array_equal(row_kinds, kinds[h, i, expected])
    for j in range(bm.num_kv_blocks):
      expected = np.nonzero(kinds[h, :, j])[0]
      rows, col_kinds = bm.col(h, j)
      np.testing.assert_array_equal(rows, expected)
      np.testing.assert_array_equal(col_kinds, kinds[h, expected, j])
  for m in range(bm.num_masks):
    assert bm.q_ptr[m, 0] == bm.kv_ptr[m, 0] and bm.q_ptr[m, -1] == bm.kv_ptr[m, -1]


MASKS = [
    masks.full(),
    masks.causal(),
    masks.causal(offset=-3),
    masks.sliding_window(5),
    masks.sliding_window(3, 7),
    masks.sliding_window(16) | masks.sink_tokens(3),
    masks.sink_tokens(5),
    masks.chunked_causal(6),
    masks.prefix_lm(9),
    masks.causal() & ~masks.sliding_window(4),
    masks.from_fn(lambda q, k: (q // 5 + k // 3) % 2 == 0),
    masks.block_layout(np.random.RandomState(0).rand(8, 8) < 0.4, 7, 5),
]


@pytest.mark.parametrize("mask", MASKS, ids=repr)
@pytest.mark.parametrize("q_len,kv_len,block_q,block_kv", [
    (37, 37, 8, 8), (37, 29, 4, 8), (1, 40, 8, 16), (40, 1, 16, 8), (33, 33, 11, 3)])
def test_kinds_match_brute_force(mask, q_len, kv_len, block_q, block_kv):
  bm = bm_lib.make_block_mask(mask, q_len, kv_len, block_q, block_kv)
  dense = mask.materialize(q_len, kv_len)[None]
  np.testing.assert_array_equal(bm.dense_kinds(), brute_kinds(dense, block_q, block_kv))
  check_lists(bm)


def test_head_dependent_mask_and_union():
  mask = masks.causal() & masks.from_fn(lambda q, k, h: (k % (h + 1)) == 0)
  bm = bm_lib.make_block_mask(mask, 24, 24, 4, 4, num_heads=3)
  dense = mask.materialize(24, 24, num_heads=3)
  np.testing.assert_array_equal(bm.dense_kinds(), brute_kinds(dense, 4, 4))
  check_lists(bm)
  union = bm.union_over_heads()
  assert union.num_heads == 1
  np.testing.assert_array_equal(union.dense_kinds()[0] != bm_lib.EMPTY, (bm.dense_kinds() != bm_lib.EMPTY).any(0))
  np.testing.assert_array_equal(union.dense_kinds()[0] == bm_lib.FULL, (bm.dense_kinds() == bm_lib.FULL).all(0))
  with pytest.raises(ValueError, match="num_heads is required"):
    bm_lib.make_block_mask(mask, 24, 24, 4, 4)


def test_causal_structure_counts():
  bm = bm_lib.make_block_mask(masks.causal(), 64, 64, 16, 16)
  # 4 diagonal tiles are partial, the 6 below them full, the 6 above empty.
  assert (bm.num_partial, bm.num_full, bm.num_nonempty) == (4, 6, 10)
  assert bm.to_string() == "+...\n#+..\n##+.\n###+"
  # Blocks aligned with a block layout are never partial.
  layout = np.tril(np.ones((4, 4), bool))
  bm2 = bm_lib.make_block_mask(masks.block_layout(layout, 16, 16), 64, 64, 16, 16)
  assert bm2.num_partial == 0 and bm2.num_full == 10


def test_memoised_and_computed_without_dense_evaluation():
  bm_lib._make_block_mask_cached.cache_clear()
  a = bm_lib.make_block_mask(masks.causal(), 1 << 20, 1 << 20, 512, 512)
  b = bm_lib.make_block_mask(masks.causal(), 1 << 20, 1 << 20, 512, 512)
  assert a is b
  # A million-token causal mask compiles from analytic bounds: 2048 partial diagonal tiles.
  assert a.num_partial == 2048


def test_bad_arguments():
  with pytest.raises(ValueError, match="block_q must be a positive int"):
    bm_lib.make_block_mask(masks.causal(), 8, 8, 0, 4)
  with pytest.raises(TypeError, match="mask must be"):
    bm_lib.make_block_mask("causal", 8, 8, 4, 4)
  with pytest.raises(ValueError, match="kinds must have shape"):
    bm_lib.from_kinds(np.zeros((3, 3)), q_len=8, kv_len=8, block_q=4, block_kv=4, mask=masks.full())


def _mask_strategy():
  leaves = st.one_of(
      st.just(masks.full()),
      st.builds(masks.causal, st.one_of(st.none(), st.integers(-6, 6))),
      st.builds(masks.sliding_window, st.integers(0, 9), st.integers(0, 9)),
      st.builds(masks.sink_tokens, st.integers(0, 6)),
      st.builds(masks.chunked_causal, st.integers(1, 9)),
      st.builds(masks.prefix_lm, st.integers(0, 9)),
  )
  return st.recursive(
      leaves,
      lambda c: st.one_of(st.builds(lambda a, b: a & b, c, c), st.builds(lambda a, b: a | b, c, c),
                          st.builds(lambda a: ~a, c)),
      max_leaves=4)


@hypothesis.given(mask=_mask_strategy(), q_len=st.integers(1, 40), kv_len=st.integers(1, 40),
                  block_q=st.integers(1, 12), block_kv=st.integers(1, 12))
@hypothesis.settings(max_examples=150)
def test_hypothesis_kinds(mask, q_len, kv_len, block_q, block_kv):
  bm = bm_lib.make_block_mask(mask, q_len, kv_len, block_q, block_kv)
  np.testing.assert_array_equal(bm.dense_kinds(), brute_kinds(mask.materialize(q_len, kv_len)[None], block_q, block_kv))
  check_lists(bm)


@pytest.mark.parametrize("mask,heads", [
    (masks.causal(), None),
    (masks.sliding_window(5) | masks.sink_tokens(2), None),
    (masks.block_layout(np.random.RandomState(1).rand(6, 6) < 0.5, 7, 7), None),
    (masks.causal() & masks.from_fn(lambda q, k, h: (k + h) % 3 != 0), 2),
])
def test_partial_tiles_reproduce_the_dense_mask(mask, heads):
  q_len, kv_len, bq, bk = 37, 41, 8, 16
  bm = bm_lib.make_block_mask(mask, q_len, kv_len, bq, bk, num_heads=heads)
  pt = bm_lib.partial_tiles(bm)
  dense = mask.materialize(q_len, kv_len, heads)
  dense = dense if heads else dense[None]
  padded = np.zeros((dense.shape[0], bm.num_q_blocks * bq, bm.num_kv_blocks * bk), bool)
  padded[:, :q_len, :kv_len] = dense
  for h in range(bm.num_heads):
    m = bm.head_to_mask[h]
    for i in range(bm.num_q_blocks):
      for e in range(bm.kv_ptr[m, i], bm.kv_ptr[m, i + 1]):
        j, kind = bm.kv_cols[e], bm.kv_kinds[e]
        want = padded[h, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].copy()
        want[max(0, q_len - i * bq):] = False  # padded query rows are stored as invisible
        if kind == bm_lib.PARTIAL:
          np.testing.assert_array_equal(pt.tiles[pt.kv_tile_ids[e]], want)
        else:
          assert want[:max(0, min(bq, q_len - i * bq))].all()
    for j in range(bm.num_kv_blocks):
      for e in range(bm.q_ptr[m, j], bm.q_ptr[m, j + 1]):
        i = bm.q_rows[e]
        if bm.q_kinds[e] == bm_lib.PARTIAL:
          row = bm.kv_ptr[m, i] + list(bm.row(h, i)[0]).index(j)
          assert pt.q_tile_ids[e] == pt.kv_tile_ids[row]
  assert bm_lib.partial_tiles(bm) is pt
  # Deduplication: structured masks repeat a handful of distinct tiles.
  assert len(pt.tiles) <= bm.num_partial
  if mask == masks.causal():
    assert len(pt.tiles) <= 4 < bm.num_partial


def test_in_kernel_flags():
  assert (masks.causal() & (masks.sliding_window(3) | ~masks.sink_tokens(2))).in_kernel
  assert not (masks.causal() & masks.block_layout(np.ones((2, 2), bool), 4, 4)).in_kernel
  assert not masks.from_fn(lambda q, k: q >= k).in_kernel
  assert masks.from_fn(lambda q, k: q >= k, in_kernel=True).in_kernel


_WINDOWS = masks.per_head([masks.sliding_window(5), masks.causal(), masks.sliding_window(5),
                           masks.sliding_window(9) | masks.sink_tokens(2)])


def test_per_head_masks_match_brute_force_and_share_structures():
  bm = bm_lib.make_block_mask(_WINDOWS, 37, 37, 8, 8, num_heads=4)
  dense = _WINDOWS.materialize(37, 37, num_heads=4)
  np.testing.assert_array_equal(bm.dense_kinds(), brute_kinds(dense, 8, 8))
  check_lists(bm)
  # Heads 0 and 2 share one mask, hence one stored structure.
  assert bm.num_masks == 3 and bm.head_to_mask[0] == bm.head_to_mask[2]
  union = bm.union_over_heads()
  np.testing.assert_array_equal(union.dense_kinds()[0] != bm_lib.EMPTY, (bm.dense_kinds() != bm_lib.EMPTY).any(0))
  np.testing.assert_array_equal(union.dense_kinds()[0] == bm_lib.FULL, (bm.dense_kinds() == bm_lib.FULL).all(0))
  # Per-head masks combine with others and keep their per-head bounds.
  both = _WINDOWS & masks.causal(offset=-2)
  bm2 = bm_lib.make_block_mask(both, 37, 37, 8, 8, num_heads=4)
  np.testing.assert_array_equal(bm2.dense_kinds(), brute_kinds(both.materialize(37, 37, 4), 8, 8))


def test_per_head_bad_input():
  with pytest.raises(ValueError, match="has 4 masks but the call has 3 query heads"):
    bm_lib.make_block_mask(_WINDOWS, 16, 16, 8, 8, num_heads=3)
  with pytest.raises(ValueError, match=r"masks mixes shapes: masks\[0\] is a block layout of shape \(2, 2\), "
                                       r"masks\[1\] one of shape \(4, 4\)"):
    masks.per_head([masks.block_layout(np.ones((2, 2), bool), 8, 8), masks.block_layout(np.ones((4, 4), bool), 4, 4)])
  with pytest.raises(ValueError, match=r"masks\[1\] must be head-independent"):
    masks.per_head([masks.causal(), masks.from_fn(lambda q, k, h: q >= k)])
  with pytest.raises(ValueError, match="empty sequence"):
    masks.per_head([])


class _CountingMask(masks.Mask):
  """Wraps a mask and counts the token pairs evaluated on the host."""

  def __init__(self, inner):
    self.inner, self.pairs = inner, 0

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    out = self.inner.evaluate(q_idx, kv_idx, head, ctx, xp)
    self.pairs += int(np.broadcast_shapes(np.shape(q_idx), np.shape(kv_idx), np.shape(out)) and np.size(out))
    return out

  def block_bounds(self, *args):
    return self.inner.block_bounds(*args)

  def block_bounds_exact(self, *args):
    return self.inner.block_bounds_exact(*args)


@pytest.mark.parametrize("inner,length,block", [
    (masks.causal(), 1 << 20, 512),
    (masks.sliding_window(4095) | masks.sink_tokens(4), 1 << 22, 512),
    (masks.chunked_causal(8192) & masks.sliding_window(2048), 1 << 20, 512),
])
def test_long_masks_build_from_bounds_without_dense_arrays(inner, length, block):
  """Analytic masks at 1M-4M tokens: storage proportional to the visited tiles, and (for masks
  whose bounds are exact) next to no token pair evaluated on the host."""
  mask = _CountingMask(inner)
  bm = bm_lib.make_block_mask(mask, length, length, block, block)
  n = length // block
  # An int32 key block and an int8 kind per tile, in both orders, plus one offset per row and
  # per column: nothing grows with n * n (even an int8 [nq, nk] array would be n * n bytes).
  assert bm.nbytes == 10 * bm.num_nonempty + 16 * (n + 1) + 4
  if not isinstance(inner, masks.And):
    # Exact bounds settle every tile except the few where two partial operands meet (the first
    # blocks of window | sinks), which are evaluated.
    assert mask.pairs <= 4 * block * block
  for i in (0, 1, n // 2, n - 1):
    cols, kinds = bm.row(0, i)
    assert np.all(np.diff(cols) > 0) and np.all(kinds != bm_lib.EMPTY)
    if inner == masks.causal():
      np.testing.assert_array_equal(cols, np.arange(i + 1))
      assert (kinds[:-1] == bm_lib.FULL).all() and kinds[-1] == bm_lib.PARTIAL


def test_from_fn_head_mask_is_evaluated_in_chunks(monkeypatch):
  """User functions have no bounds: every tile is evaluated, in chunks of at most
  _REFINE_CHUNK_ELEMENTS pairs, with the same result whatever the chunk size."""
  fn = masks.from_fn(lambda q, k, h: (k <= q + 3 * h) & (k >= q - 11 * (h + 1)))
  want = bm_lib.make_block_mask(fn, 70, 70, 8, 8, num_heads=3)
  np.testing.assert_array_equal(want.dense_kinds(), brute_kinds(fn.materialize(70, 70, 3), 8, 8))
  calls = []
  original = bm_lib._tile_values

  def spy(mask, ctx, grid, tiles, head):
    calls.append(len(tiles) * (1 if head is None else len(head)) * grid.bq * grid.bk)
    return original(mask, ctx, grid, tiles, head)

  monkeypatch.setattr(bm_lib, "_tile_values", spy)
  monkeypatch.setattr(bm_lib, "_REFINE_CHUNK_ELEMENTS", 3 * 3 * 64)
  bm_lib._make_block_mask_cached.cache_clear()
  got = bm_lib.make_block_mask(fn, 70, 70, 8, 8, num_heads=3)
  np.testing.assert_array_equal(got.dense_kinds(), want.dense_kinds())
  assert max(calls) <= 3 * 3 * 64 and len(calls) > 20
  # Heads with equal block structures and equal partial tiles share one stored structure.
  assert got.num_masks <= 3
