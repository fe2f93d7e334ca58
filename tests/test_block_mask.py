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
  for h in range(bm.num_heads):
    for i in range(bm.num_q_blocks):
      expected = np.nonzero(bm.kinds[h, i])[0]
      n = bm.kv_counts[h, i]
      assert n == len(expected)
      np.testing.assert_array_equal(bm.kv_indices[h, i, :n], expected)
      np.testing.assert_array_equal(bm.kv_kinds[h, i, :n], bm.kinds[h, i, expected])
      assert (bm.kv_kinds[h, i, n:] == bm_lib.EMPTY).all()
      # Padding entries repeat the last visited block so a pipelined kernel does not refetch.
      if n:
        assert (bm.kv_indices[h, i, n:] == expected[-1]).all()
    for j in range(bm.num_kv_blocks):
      expected = np.nonzero(bm.kinds[h, :, j])[0]
      n = bm.q_counts[h, j]
      np.testing.assert_array_equal(bm.q_indices[h, j, :n], expected)
      np.testing.assert_array_equal(bm.q_kinds[h, j, :n], bm.kinds[h, expected, j])


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
  np.testing.assert_array_equal(bm.kinds, brute_kinds(dense, block_q, block_kv))
  check_lists(bm)


def test_head_dependent_mask_and_union():
  mask = masks.causal() & masks.from_fn(lambda q, k, h: (k % (h + 1)) == 0)
  bm = bm_lib.make_block_mask(mask, 24, 24, 4, 4, num_heads=3)
  dense = mask.materialize(24, 24, num_heads=3)
  np.testing.assert_array_equal(bm.kinds, brute_kinds(dense, 4, 4))
  check_lists(bm)
  union = bm.union_over_heads()
  assert union.num_heads == 1
  np.testing.assert_array_equal(union.kinds[0] != bm_lib.EMPTY, (bm.kinds != bm_lib.EMPTY).any(0))
  np.testing.assert_array_equal(union.kinds[0] == bm_lib.FULL, (bm.kinds == bm_lib.FULL).all(0))
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
  np.testing.assert_array_equal(bm.kinds, brute_kinds(mask.materialize(q_len, kv_len)[None], block_q, block_kv))
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
    for i in range(bm.num_q_blocks):
      for t in range(bm.kv_counts[h, i]):
        j, kind = bm.kv_indices[h, i, t], bm.kv_kinds[h, i, t]
        want = padded[h, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].copy()
        want[max(0, q_len - i * bq):] = False  # padded query rows are stored as invisible
        if kind == bm_lib.PARTIAL:
          np.testing.assert_array_equal(pt.tiles[pt.kv_tile_ids[h, i, t]], want)
        else:
          assert want[:max(0, min(bq, q_len - i * bq))].all()
    for j in range(bm.num_kv_blocks):
      for t in range(bm.q_counts[h, j]):
        i = bm.q_indices[h, j, t]
        if bm.q_kinds[h, j, t] == bm_lib.PARTIAL:
          assert pt.q_tile_ids[h, j, t] == pt.kv_tile_ids[h, i, list(bm.kv_indices[h, i]).index(j)]
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
