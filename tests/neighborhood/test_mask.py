"""NeighborhoodMask and the token permutation against dense masks built from the definitions;
block classification (exact, sound, counts) and the tile heuristic."""

import math
import types

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import block_mask as bm_lib
from attn_jax import masks
from attn_jax.neighborhood import api
from attn_jax.neighborhood import tiling
from tests.neighborhood import dense_reference
from tests.test_block_mask import brute_kinds


@st.composite
def configs(draw, max_side=8):
  n = draw(st.integers(1, 3))
  shape, kernel, stride, dilation, causal, tile = [], [], [], [], [], []
  for _ in range(n):
    length = draw(st.integers(2, max_side if n < 3 else 6))
    d = draw(st.integers(1, max(1, length // 2)))
    k = draw(st.integers(2, length // d))
    shape.append(length)
    dilation.append(d)
    kernel.append(k)
    stride.append(draw(st.integers(1, k)))
    causal.append(draw(st.booleans()))
    tile.append(draw(st.integers(1, 4)))
  extra = draw(st.integers(0, 3))
  return tuple(shape), tuple(kernel), tuple(stride), tuple(dilation), tuple(causal), tuple(tile), extra


def _mask(shape, kernel, stride, dilation, causal, tile):
  layout = tiling.TileLayout(shape, dilation, tile)
  return attn_jax.NeighborhoodMask(layout, kernel, stride, causal), layout


@hypothesis.given(configs())
def test_permuted_mask_matches_definition(config):
  shape, kernel, stride, dilation, causal, tile, extra = config
  mask, layout = _mask(shape, kernel, stride, dilation, causal, tile)
  n = layout.num_tokens
  dense = mask.materialize(n, n + extra)
  perm = layout.permutation()
  want = dense_reference.dense_mask(shape, kernel, stride, dilation, causal)
  np.testing.assert_array_equal(dense[np.ix_(perm, perm)], want)
  padding = np.ones(n, bool)
  padding[perm] = False
  assert not dense[:, :n][:, padding].any(), "a padding key is visible"
  assert dense[:, n:].all(), "an additional key is hidden"


@hypothesis.given(configs(), st.integers(1, 9), st.integers(1, 9))
def test_block_classification_is_exact_for_tiles_and_sound_for_any_blocks(config, bq, bk):
  shape, kernel, stride, dilation, causal, tile, extra = config
  mask, layout = _mask(shape, kernel, stride, dilation, causal, tile)
  n = layout.num_tokens
  dense = mask.materialize(n, n + extra)[None]
  t = layout.tile_size
  # Tile-aligned blocks (and multiples of tiles that form boxes) are classified from the bounds
  # alone, which is right only if the exactness claims are; other block sizes go through the
  # element-wise refinement, which is right only if the bounds are sound.
  for block_q, block_kv in ((t, t), (2 * t, 3 * t), (bq, bk)):
    bm = bm_lib.make_block_mask(mask, n, n + extra, block_q, block_kv)
    np.testing.assert_array_equal(bm.dense_kinds(), brute_kinds(dense, block_q, block_kv))


@hypothesis.given(configs())
def test_per_axis_tile_counts_give_the_block_mask_counts(config):
  shape, kernel, stride, dilation, causal, tile, _ = config
  mask, layout = _mask(shape, kernel, stride, dilation, causal, tile)
  bm = bm_lib.make_block_mask(mask, layout.num_tokens, layout.num_tokens, layout.tile_size,
                              layout.tile_size)
  counts = [tiling.axis_tile_counts(*args) for args in zip(shape, dilation, kernel, stride, causal, tile)]
  assert bm.num_nonempty == math.prod(c[0] for c in counts)
  assert bm.num_full == math.prod(c[1] for c in counts)


def test_docstring_worked_example():
  expected = {  # (kernel, stride, dilation, causal): {query: keys}, 1-D with L = 8
      (3, 1, 1, False): {0: {0, 1, 2}, 3: {2, 3, 4}, 7: {5, 6, 7}},
      (4, 1, 1, False): {3: {1, 2, 3, 4}},
      (3, 2, 1, False): {0: {0, 1, 2}, 1: {0, 1, 2}, 2: {2, 3, 4}, 3: {2, 3, 4}, 6: {5, 6, 7},
                         7: {5, 6, 7}},
      (3, 1, 2, False): {0: {0, 2, 4}, 5: {3, 5, 7}, 6: {2, 4, 6}},
      (3, 1, 1, True): {0: {0}, 1: {0, 1}, 5: {3, 4, 5}},
  }
  for (k, s, d, c), rows in expected.items():
    want = dense_reference.dense_mask((8,), (k,), (s,), (d,), (c,))
    mask, layout = _mask((8,), (k,), (s,), (d,), (c,), (3,))
    got = mask.materialize(layout.num_tokens, layout.num_tokens)
    perm = layout.permutation()
    got = got[np.ix_(perm, perm)]
    for query, keys in rows.items():
      assert set(np.nonzero(want[query])[0]) == keys, (k, s, d, c, query)
      assert set(np.nonzero(got[query])[0]) == keys, (k, s, d, c, query)
  want_2d = dense_reference.dense_mask((5, 5), (3, 3), (1, 1), (1, 1), (False, False))
  keys = {divmod(int(j), 5) for j in np.nonzero(want_2d[0 * 5 + 2])[0]}
  assert keys == {(r, c) for r in (0, 1, 2) for c in (1, 2, 3)}


def test_permute_unpermute_round_trip():
  layout = tiling.TileLayout((5, 7, 3), (2, 1, 3), (2, 4, 1))
  x = jnp.arange(2 * 5 * 7 * 3 * 2, dtype=jnp.float32).reshape(2, 5, 7, 3, 2, 1)
  y = layout.permute(x)
  assert y.shape == (2, layout.num_tokens, 2, 1)
  np.testing.assert_array_equal(layout.unpermute(y), x)
  # Every grid token appears once; the rest is zero padding.
  assert int((np.asarray(y) != 0).sum()) == x.size - 1


def test_evaluate_uses_only_kernel_friendly_operations():
  # Kernels evaluate the predicate in-kernel when it is integer arithmetic and comparisons with
  # xp.minimum / xp.maximum / xp.where only: give evaluate a namespace with nothing else.
  mask, layout = _mask((7, 9, 6), (3, 4, 2), (2, 1, 2), (2, 1, 3), (False, True, False), (2, 4, 1))
  xp = types.SimpleNamespace(minimum=np.minimum, maximum=np.maximum, where=np.where)
  n = layout.num_tokens
  q, k = np.arange(n)[:, None], np.arange(n + 2)[None, :]
  ctx = masks.MaskContext(n, n + 2)
  np.testing.assert_array_equal(mask.evaluate(q, k, None, ctx, xp), mask.evaluate(q, k, None, ctx, np))
  # No captured arrays: the mask is made of Python ints and bools only.
  leaves = (layout.spatial_shape + layout.dilation + layout.tile_shape + mask.kernel_size
            + mask.stride + mask.is_causal)
  assert all(type(v) in (int, bool) for v in leaves)
  assert hash(mask) == hash(_mask((7, 9, 6), (3, 4, 2), (2, 1, 2), (2, 1, 3), (False, True, False), (2, 4, 1))[0])


@pytest.mark.parametrize("shape,kernel,dilation", [
    ((64,), 8, 1), ((32, 48), (8, 16), (1, 1)), ((32, 48), (4, 8), (2, 3)),
    ((8, 16, 24), (4, 8, 8), (1, 2, 1)), ((256, 256), (16, 16), (1, 1))])
def test_aligned_blocked_attention_has_zero_partial_blocks(shape, kernel, dilation):
  n = len(shape)
  kernel, stride, dilation, causal = api.check_arguments(shape, kernel, kernel, dilation, False)
  tile = tiling.choose_tile_shape(shape, kernel, stride, dilation, causal)
  mask, layout = _mask(shape, kernel, stride, dilation, causal, tile)
  bm = bm_lib.make_block_mask(mask, layout.num_tokens, layout.num_tokens, layout.tile_size,
                              layout.tile_size)
  assert bm.num_partial == 0, (tile, bm)
  # Exactly one window group per tile row of blocks: density = prod(kernel) / tokens.
  assert bm.num_full * layout.tile_size ** 2 == math.prod(shape) * math.prod(kernel)
  assert n == len(tile)


def test_2d_tiles_make_most_visited_blocks_full():
  # NATTEN's published 2-D configuration: 256x256 tokens, window 80x80.
  shape = (256, 256)
  kernel, stride, dilation, causal = api.check_arguments(shape, 80, 1, 1, False)
  tile = tiling.choose_tile_shape(shape, kernel, stride, dilation, causal)
  mask, layout = _mask(shape, kernel, stride, dilation, causal, tile)
  assert layout.tile_size == 128
  n = layout.num_tokens
  bm = bm_lib.make_block_mask(mask, n, n, 128, 128)
  assert bm.num_full / bm.num_nonempty > 0.45, bm
  # Visited blocks stay close to the FLOP bound (the fraction of pairs in the neighborhood).
  assert bm.density < 1.4 * (80 * 80) / (256 * 256), bm
  # With stride 16 (aligned with the tiles) every visited block is full.
  kernel, stride, dilation, causal = api.check_arguments(shape, 80, 16, 1, False)
  tile = tiling.choose_tile_shape(shape, kernel, stride, dilation, causal)
  mask, layout = _mask(shape, kernel, stride, dilation, causal, tile)
  bm = bm_lib.make_block_mask(mask, n, n, layout.tile_size, layout.tile_size)
  assert bm.num_partial == 0 and bm.num_full > 0, bm


def test_tiling_beats_row_major_order():
  # Row-major order (1x1 tiles) on a smaller grid, where its element-wise classification is
  # cheap: a 128-token block is two grid rows, never inside a 40-wide window.
  shape = (64, 64)
  kernel, stride, dilation, causal = api.check_arguments(shape, 40, 1, 1, False)
  tiled, layout = _mask(shape, kernel, stride, dilation, causal,
                        tiling.choose_tile_shape(shape, kernel, stride, dilation, causal))
  row_major, _ = _mask(shape, kernel, stride, dilation, causal, (1, 1))
  n = layout.num_tokens
  bm_tiled = bm_lib.make_block_mask(tiled, n, n, 128, 128)
  bm_rows = bm_lib.make_block_mask(row_major, n, n, 128, 128)
  assert bm_rows.num_full == 0
  assert bm_tiled.num_full > 0.3 * bm_tiled.num_nonempty, bm_tiled
  assert bm_tiled.num_nonempty < bm_rows.num_nonempty, (bm_tiled, bm_rows)


@pytest.mark.parametrize("shape,kernel", [((32768,), 2048), ((256, 256), 80), ((16, 64, 64), (7, 15, 15)),
                                          ((7, 9), 3), ((5, 6, 7), (2, 3, 3))])
def test_tile_heuristic_prefers_128_token_tiles_when_the_grid_allows(shape, kernel):
  kernel, stride, dilation, causal = api.check_arguments(shape, kernel, 1, 1, False)
  tile = tiling.choose_tile_shape(shape, kernel, stride, dilation, causal)
  if math.prod(shape) >= 1024:
    assert math.prod(tile) == 128, tile
  else:
    assert math.prod(tile) <= 128 and all(1 <= t <= s for t, s in zip(tile, shape)), tile


def test_exact_bounds_skip_the_elementwise_check(monkeypatch):
  calls = []
  evaluate = attn_jax.NeighborhoodMask.evaluate

  def counting(self, *args):
    calls.append(1)
    return evaluate(self, *args)

  monkeypatch.setattr(attn_jax.NeighborhoodMask, "evaluate", counting)
  # A configuration used by no other test, so that the memoised BlockMask is computed here.
  mask, layout = _mask((37, 23), (17, 15), (1, 2), (1, 1), (False, True), (4, 4))
  n, t = layout.num_tokens, layout.tile_size
  bm = bm_lib.make_block_mask(mask, n, n + 5, t, t)
  assert bm.num_partial > 0 and bm.num_full > 0 and not calls
  dense = mask.materialize(n, n + 5)[None]
  np.testing.assert_array_equal(bm.dense_kinds(), brute_kinds(dense, t, t))
  calls.clear()
  # Blocks that straddle tiles are not covered by the exactness claim: they get refined.
  bm_lib.make_block_mask(mask, n, n + 5, t + 8, t)
  assert calls
