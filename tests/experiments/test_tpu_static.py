"""The host side of experiments/tpu_static.py: the step counts its cycle estimates multiply (no
TPU compiler needed)."""

import pytest

import attn_jax
from experiments import tpu_static


def test_project_step_counts_skip_empty_tiles_and_empty_sub_blocks():
  """Causal at 8192 tokens in 1024 x 1024 blocks with 512 x 512 compute sub-blocks: one step per
  non-empty tile (28 FULL + 8 diagonal PARTIAL), and on each diagonal tile the quarter above the
  diagonal never runs and the quarter below it runs unmasked."""
  cfg = attn_jax.PallasTpuConfig(interpret=False, generation="v5e", block_q=1024, block_kv=1024,
                                 block_kv_compute=512)
  blocks, counts = tpu_static._project_counts(cfg, "causal", 8192, 1, 1)
  assert blocks.sub_grid == (2, 2)
  fwd = counts["fwd"]
  assert (fwd.steps, fwd.full, fwd.partial, fwd.rows) == (36, 28, 8, 8)
  # Sub-blocks (query chunk r, key chunk c) in order (0,0), (0,1), (1,0), (1,1): [PARTIAL, FULL].
  assert fwd.sub == [[8, 0], [0, 0], [0, 8], [8, 0]]
  assert counts["dkv"].full == 28 and counts["dkv"].partial == 8


def test_estimate_composes_the_bodies():
  body = tpu_static.KernelBody(total=1000, loop=950, tiles=[300, 500], parts=[[300], [100, 50, 100, 50]],
                               init=40, finalize=60)
  assert body.step_overhead == 950 - 800 - 100 and body.prologue == 50
  counts = tpu_static.StepCounts(steps=10, full=6, partial=4, rows=2, tile_rows=256, tile_cols=256,
                                 sub=[[4, 0], [0, 4]])
  got = tpu_static.estimate(body, counts)
  # A PARTIAL tile: its control (500 - 300) + the masked variant of sub-block 0 + the unmasked
  # variant of sub-block 1.
  partial = 4 * (200 + 100 + 50)
  assert got["cycles"] == 10 * 50 + 6 * 300 + partial + 2 * (40 + 60) + 50
  assert got["cycles_per_128x128_full"] == 75.0
  fewer = tpu_static.KernelBody(1000, 950, [300, 500], [[300], [100, 50]], 40, 60)
  with pytest.raises(ValueError, match="expected 4 sub-block variants"):
    tpu_static.estimate(fewer, counts)
