"""Step schedules of the TPU kernels and sparse lists of the GPU kernels, against the BlockMask."""

import numpy as np
import pytest

from attn_jax import block_mask as bm_lib
from attn_jax import masks
from attn_jax.softmax import schedule
from pallas_kernels import flash_common as fc


@pytest.mark.parametrize("widths,word_bits", [
    ({"row": 3, "col": 3, "kind": 2}, (8,)),
    ({"row": 6, "col": 6, "kind": 2, "first": 1, "last": 1}, (16,)),
    ({"row": 13, "col": 13, "kind": 2, "first": 1, "last": 1}, (32,)),
    ({"row": 15, "col": 15, "kind": 2, "first": 1, "last": 1, "tile": 9}, (32, 16)),
    ({"row": 0, "col": 4, "kind": 2, "g": 0, "tile": 0}, (8,)),
])
def test_entry_layout_packs_into_the_smallest_words_and_round_trips(widths, word_bits):
  layout = fc.EntryLayout.make(widths)
  assert layout.word_bits == word_bits
  rng = np.random.RandomState(0)
  values = {k: rng.randint(0, 1 << w, size=257) for k, w in widths.items() if w}
  words = layout.pack(values)
  assert tuple(w.dtype.itemsize * 8 for w in words) == word_bits
  back = layout.unpack(words)
  for k, v in values.items():
    np.testing.assert_array_equal(back[k], v)
  with pytest.raises(ValueError, match="out of range"):
    layout.pack({k: np.full(3, 1 << w) for k, w in widths.items() if w})


def _decoded(sl: schedule.StepLists):
  """Per list: the (row, col, g, kind, tile) of every non-idle entry over all bands, in order,
  with a check that every row's entries sit in one band, first and last flags included."""
  out = []
  for l in range(sl.num_lists):
    rows = []
    for band in range(sl.num_bands):
      e = sl.entries(band, l)
      live = e["kind"] != fc.IDLE
      # Idle entries only pad the end of a band.
      assert not live[np.argmin(live):].any() or live.all()
      lo, hi = sl.band_starts[band], sl.band_starts[band + 1]
      get = lambda k: e.get(k, np.zeros_like(e["kind"]))[live]  # noqa: E731
      r = get("row")
      assert ((r >= lo) & (r < hi)).all()
      assert set(range(lo, hi)) == set(r.tolist()), "every row of the band appears"
      first, last = get("first"), get("last")
      np.testing.assert_array_equal(first, np.r_[1, r[1:] != r[:-1]])
      np.testing.assert_array_equal(last, np.r_[r[1:] != r[:-1], 1])
      rows += list(zip(r.tolist(), get("col").tolist(), get("g").tolist(), get("kind").tolist(),
                       get("tile").tolist()))
    out.append(rows)
  return out


_MASKS = {
    "causal": (masks.causal(), None),
    "window_sinks_cross": (masks.sliding_window(20) | masks.sink_tokens(3), None),
    "per_head": (masks.per_head([masks.causal(), masks.sliding_window(9), masks.causal(),
                                 masks.sliding_window(9) & masks.causal(offset=-30)]), 4),
    "layout_tiles": (masks.block_layout(np.random.RandomState(2).rand(7, 8) < 0.4, 10, 9), None),
}


@pytest.mark.parametrize("name", list(_MASKS))
@pytest.mark.parametrize("tight", [False, True])
def test_row_and_col_steps_round_trip(name, tight):
  """Decoding every band gives back exactly the BlockMask's tiles (plus one EMPTY_ROW entry per
  row without tiles); a small scalar-memory budget splits the lists into bands of whole rows."""
  mask, heads = _MASKS[name]
  q_len, kv_len = 61, 67
  hq = heads or 4
  bm = bm_lib.make_block_mask(mask, q_len, kv_len, 8, 8, num_heads=heads)
  pt = bm_lib.partial_tiles(bm) if not mask.in_kernel else None
  stack = 1 if mask.depends_on_head else 2

  def build(budget):
    return (schedule.row_steps(bm, None if pt is None else pt.kv_tile_ids, hq, stack, budget),
            schedule.col_steps(bm, None if pt is None else pt.q_tile_ids, hq, 2, stack, budget))

  rows, cols = build(1 << 20)
  assert rows.num_bands == cols.num_bands == 1
  if tight:
    # Room for twice the longest row: the lists split into several bands.
    longest = lambda sl: max(np.bincount(sl.entries(0, l)["row"][sl.entries(0, l)["kind"] != 0]).max()  # noqa: E731
                             for l in range(sl.num_lists)) * sl.num_lists * sl.layout.bytes_per_entry
    budget = 2 * max(longest(rows), longest(cols))
    rows, cols = build(budget)
    assert rows.num_bands > 1 and cols.num_bands > 1
    assert rows.band_bytes <= budget and cols.band_bytes <= budget
  dense = bm.dense_kinds()
  for u, l in enumerate(rows.unit_map):
    h = u * stack
    want = []
    for i in range(bm.num_q_blocks):
      cols_i = np.nonzero(dense[h if bm.num_heads > 1 else 0, i])[0]
      tid = lambda j: 0 if pt is None else pt.kv_tile_ids[bm.kv_ptr[bm.head_to_mask[h if bm.num_heads > 1 else 0], i] + list(cols_i).index(j)]  # noqa: E731
      want += [(i, j, 0, dense[h if bm.num_heads > 1 else 0, i, j], tid(j)) for j in cols_i] or [(i, 0, 0, fc.EMPTY_ROW, 0)]
    assert _decoded(rows)[l] == want
  for hk, l in enumerate(cols.unit_map):
    got = _decoded(cols)[l]
    for j in range(bm.num_kv_blocks):
      entries = [(i, g, kind) for r, i, g, kind, _ in got if r == j]
      want = sorted((i, g, dense[(hk * 2 + g) if bm.num_heads > 1 else 0, i, j])
                    for g in range(2 // stack) for i in np.nonzero(dense[(hk * 2 + g) if bm.num_heads > 1 else 0, :, j])[0])
      if not want:
        want = [(0, 0, fc.EMPTY_ROW)]
      assert sorted(entries) == want
  # Lists are stored once per distinct structure.
  assert rows.num_lists == bm.num_masks


def test_schedule_that_cannot_fit_names_the_sizes():
  bm = bm_lib.make_block_mask(masks.full(), 64, 64, 8, 8)
  with pytest.raises(ValueError, match=r"a row has 8 tiles x 1 distinct lists x 2 bytes = 16 bytes, "
                                       r"over max_schedule_bytes=10"):
    schedule.row_steps(bm, None, 1, 1, budget=10)


def test_gpu_lists_are_the_block_mask_rows():
  mask, heads = _MASKS["per_head"]
  bm = bm_lib.make_block_mask(mask, 40, 40, 8, 8, num_heads=heads)
  head_map, ptr, idx, kinds, _ = schedule.gpu_lists(bm, None, transposed=False)
  n = bm.num_q_blocks + 1
  for h in range(heads):
    for i in range(bm.num_q_blocks):
      s, e = ptr[head_map[h] * n + i], ptr[head_map[h] * n + i + 1]
      cols, k = bm.row(h, i)
      np.testing.assert_array_equal(idx[s:e], cols)
      np.testing.assert_array_equal(kinds[s:e], k)


@pytest.mark.parametrize("mask", [masks.causal(), masks.sliding_window(9) | masks.sink_tokens(2),
                                  _MASKS["per_head"][0]], ids=["causal", "window_sinks", "per_head"])
def test_sub_block_kinds_are_sound(mask):
  """EMPTY and FULL sub-block kinds are true for every head of the structure (PARTIAL is always
  safe), and the analytic bounds do find the empty quarter of causal diagonal tiles, the empty
  sink column and, per structure of a per-head mask, full sub-blocks."""
  heads = mask.num_heads
  q_len, kv_len, block = 61, 67, 16
  bm = bm_lib.make_block_mask(mask, q_len, kv_len, block, block, num_heads=heads)
  dense = mask.materialize(q_len, kv_len, heads)
  dense = dense if heads else dense[None]
  padded = np.zeros((dense.shape[0], bm.num_q_blocks * block, bm.num_kv_blocks * block), bool)
  padded[:, :q_len, :kv_len] = dense
  grid = (2, 4)
  rows, cols = block // grid[0], block // grid[1]
  found_empty = found_full = 0
  for m in range(bm.num_masks):
    heads_m = np.nonzero(bm.head_to_mask == m)[0] if heads else [0]
    s, e = bm.kv_ptr[m, 0], bm.kv_ptr[m, -1]
    qb, kb, kinds = bm.entry_rows(m), bm.kv_cols[s:e], bm.kv_kinds[s:e]
    # The structure's own bounds (what the schedules use) are sound for each of its heads.
    packed = schedule.sub_kinds(bm, qb, kb, kinds, grid, schedule.structure_mask(bm, m))
    for n in range(len(kinds)):
      for r in range(grid[0]):
        for c in range(grid[1]):
          kind = (packed[n] >> (2 * (r * grid[1] + c))) & 3
          q0 = qb[n] * block + r * rows
          k0 = kb[n] * block + c * cols
          sub = padded[heads_m, q0:q0 + rows, k0:k0 + cols][:, :max(0, min(rows, q_len - q0))]
          if kind == bm_lib.EMPTY:
            assert not sub.any()
            found_empty += 1
          elif kind == bm_lib.FULL:
            assert sub.all() and k0 + cols <= kv_len
            found_full += 1
  assert found_empty > 0
  if not isinstance(mask, masks.Or):  # a 10-key window has no fully visible 8 x 4 sub-block
    assert found_full > 0


def _default_tpu_steps(mask, length, heads, generation="v5e"):
  """The row and column step schedules the TPU adapter builds for a hardware call (default tiling
  of ``generation``, head dim 128), computed on the host without tracing or compiling."""
  from attn_jax.softmax import common
  from attn_jax.softmax import pallas as pallas_lib
  spec = common.Spec(mask, 1.0, None, length, length, heads, heads, 128, 128, False, False)
  blocks = pallas_lib._tpu_blocks(pallas_lib.PallasTpuConfig(interpret=False, generation=generation), spec,
                                  False, 1)
  bm = bm_lib.make_block_mask(mask, length, length, blocks.block_q, blocks.block_kv,
                              heads if mask.depends_on_head else None)
  return bm, blocks, (schedule.row_steps(bm, None, heads, blocks.stack, sub_grid=blocks.sub_grid),
                      schedule.col_steps(bm, None, heads, 1, blocks.stack, sub_grid=blocks.sub_grid))


@pytest.mark.parametrize("generation", ["v5e", "v6e"])
def test_long_context_schedules_fit_scalar_memory(generation):
  """Counts, not times: at 1M-4M tokens each kernel call's scalar-prefetched schedule stays
  within the 256 KiB budget (TPU v5e has 1 MiB of SMEM; the old int32 lists needed 3 MiB at
  262k tokens), by packing and, beyond that, by bands of whole rows."""
  budget = schedule.DEFAULT_SCHEDULE_BYTES
  # A 4096-token window at 1M tokens: one band, one 4-byte entry per visited tile.
  bm, blocks, (rows, cols) = _default_tpu_steps(masks.sliding_window(4095), 1 << 20, 2, generation)
  assert (blocks.block_q, blocks.block_kv, blocks.sub_grid) == (1024, 1024, (2, 2))
  # Query block i sees key blocks max(0, i - 4) .. i (4096 + 1023 tokens span 5 blocks).
  tiles = 1 + 2 + 3 + 4 + 5 * (1024 - 4)
  assert bm.num_nonempty == tiles and bm.num_masks == 1
  for sl in (rows, cols):
    assert sl.num_bands == 1 and sl.layout.bytes_per_entry == 4
    assert sl.band_bytes == 4 * tiles <= budget
  # Causal at 1M tokens: 524,800 tiles of 4 bytes = 2.0 MiB, cut into 9 bands of whole rows.
  bm, _, (rows, cols) = _default_tpu_steps(masks.causal(), 1 << 20, 1, generation)
  assert bm.num_nonempty == 1024 * 1025 // 2
  for sl in (rows, cols):
    assert sl.layout.bytes_per_entry == 4 and sl.num_entries == bm.num_nonempty
    assert sl.band_bytes <= budget and sl.capacity == budget // 4
    assert sl.num_bands == 9 and sl.band_starts[-1] == 1024
  # Window 4095 + 4 sinks at 4M tokens: the sink column makes rows one tile longer, still one band.
  bm, _, (rows, cols) = _default_tpu_steps(masks.sliding_window(4095) | masks.sink_tokens(4), 1 << 22, 1,
                                           generation)
  assert rows.num_bands == 1 and rows.band_bytes <= budget
  assert cols.num_bands >= 1 and cols.band_bytes <= budget
  # Per-head windows over 32 heads: the four distinct masks are stored once each.
  mask = masks.per_head([masks.sliding_window(1024 * (1 + h % 4) - 1) for h in range(32)])
  bm, _, (rows, cols) = _default_tpu_steps(mask, 1 << 17, 32, generation)
  assert bm.num_masks == rows.num_lists == cols.num_lists == 4
  assert rows.band_bytes <= budget and cols.band_bytes <= budget


def _spec(d):
  from attn_jax.softmax import common
  return common.Spec(masks.causal(), d ** -0.5, None, 4096, 4096, 4, 4, d, d, False, False)


def test_tpu_tiling_follows_the_generation_off_tpu(monkeypatch):
  """A deviceless compile for a v4 topology takes v4's tiling from $ATTN_JAX_TPU_GENERATION (set
  per target by the compile check): 512-row steps, and 512-key steps for rows wider than 512
  bytes, which v4's 16 MiB of scoped VMEM needs at head dim 256 in float32 (compiled: 13.9 MiB)."""
  import attn_jax
  from attn_jax.softmax import pallas as pallas_lib
  cfg = attn_jax.PallasTpuConfig(interpret=False)
  monkeypatch.delenv(pallas_lib.TPU_GENERATION_ENV, raising=False)
  assert (pallas_lib._tpu_blocks(cfg, _spec(256), False, 1, 4).block_kv,
          pallas_lib._tpu_blocks(cfg, _spec(256), False, 1, 4).block_q) == (1024, 1024)  # v5e's
  monkeypatch.setenv(pallas_lib.TPU_GENERATION_ENV, "v4")
  wide = pallas_lib._tpu_blocks(cfg, _spec(256), False, 1, 4)
  assert (wide.block_q, wide.block_kv) == (512, 512)
  assert pallas_lib._tpu_blocks(cfg, _spec(256), False, 1, 2).block_kv == 1024  # bf16 rows: 512 B
  assert pallas_lib._tpu_blocks(cfg, _spec(128), False, 1, 4).block_kv == 1024
  # An explicit generation wins over the environment; a bad one names the variable.
  assert pallas_lib._tpu_blocks(attn_jax.PallasTpuConfig(interpret=False, generation="v6e"), _spec(256), False, 1,
                                4).block_kv == 1024
  monkeypatch.setenv(pallas_lib.TPU_GENERATION_ENV, "v9")
  with pytest.raises(ValueError, match="ATTN_JAX_TPU_GENERATION must be one of"):
    pallas_lib._tpu_blocks(cfg, _spec(128), False, 1, 2)
