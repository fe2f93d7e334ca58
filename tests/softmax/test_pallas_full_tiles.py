"""What the kernel-vs-reference cases of test_pallas.py leave blind: segment ids on FULL tiles, and
visited tiles of head-dependent schedules, head by head.

A kernel that applied segment ids only on PARTIAL tiles passed every case there, because the only
case with segment ids had no FULL tile on its grid; the causal cases below put segment
boundaries inside FULL tiles, in float32 and bfloat16, forward and backward. The visit test of
test_pallas.py builds its expectation from head 0; here the mask depends on the head and every
head's visits are checked against that head's own BlockMask row.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import block_mask as bm_lib
from attn_jax import masks
from tests.softmax import helpers

PLATFORMS = {
    "tpu": ("pallas_tpu", attn_jax.PallasTpuConfig),
    "gpu": ("pallas_gpu", attn_jax.PallasGpuConfig),
}
BLOCK = 16


def _segments(batch, length, cuts):
  ids = np.zeros((batch, length), np.int32)
  for c in cuts:
    ids[:, c:] += 1
  return ids


def _full_tiles_crossing_segments(bm, seg):
  """The FULL tiles of ``bm`` (head 0) that hold a (query, key) pair of different segments."""
  out = []
  for i, j in zip(*np.nonzero(bm.dense_kinds()[0] == bm_lib.FULL)):
    rows = seg[i * bm.block_q:(i + 1) * bm.block_q]
    cols = seg[j * bm.block_kv:(j + 1) * bm.block_kv]
    if (rows[:, None] != cols[None, :]).any():
      out.append((int(i), int(j)))
  return out


# 63 causal tokens in 16-token blocks: 4 PARTIAL diagonal tiles and 6 FULL ones below them, with
# segment boundaries at 10 and 37 running through FULL tiles. GQA with learned sinks; the bf16
# case adds a soft-cap (its backward term multiplies every dS).
@pytest.mark.parametrize("dtype,cap", [(jnp.float32, None), (jnp.bfloat16, 3.0)], ids=["f32", "bf16_cap"])
@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_segment_ids_apply_on_full_tiles(platform, dtype, cap):
  implementation, config_type = PLATFORMS[platform]
  length, cuts = 63, (10, 37)
  seg = _segments(1, length, cuts)
  bm = bm_lib.make_block_mask(masks.causal(), length, length, BLOCK, BLOCK)
  crossing = _full_tiles_crossing_segments(bm, seg[0])
  assert bm.num_full == 6 and len(crossing) >= 3, crossing
  q, k, v, sinks, d_out, d_lse = helpers.make_inputs(3, 1, length, length, 4, 2, 16, 16, dtype)
  helpers.compare_backends(implementation, config_type(block_q=BLOCK, block_kv=BLOCK), q, k, v, sinks,
                           d_out, d_lse, mask=masks.causal(), logits_soft_cap=cap,
                           q_segment_ids=jnp.asarray(seg))


# Query head h sees keys in [q - 20, q + 8 h]: over 64 tokens, heads 0..3 have different sets of
# non-empty tiles and different PARTIAL / FULL kinds (heads 2 and 3 have FULL diagonal tiles), so
# each head walks its own lists (and the dK/dV pass of a GQA group walks those of both its heads).
_PER_HEAD = masks.from_fn(lambda q, k, h: (k <= q + 8 * h) & (k >= q - 20), name="per-head band",
                          in_kernel=True)


@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_head_dependent_schedule_visits_each_heads_tiles(platform):
  implementation, config_type = PLATFORMS[platform]
  batch, length, hq, hkv = 1, 64, 4, 2
  visits = collections.Counter()

  def record(phase, b, h, i, j, evaluated):
    visits[(phase, int(b), int(h), int(i), int(j), bool(evaluated))] += 1

  config = config_type(block_q=BLOCK, block_kv=BLOCK, record_visits=record)
  q, k, v, *_ = helpers.make_inputs(0, batch, length, length, hq, hkv, 16, 16, jnp.float32)
  grads = jax.grad(lambda q, k, v: attn_jax.attention(q, k, v, mask=_PER_HEAD, implementation=implementation,
                                                      config=config).sum(), argnums=(0, 1, 2))(q, k, v)
  jax.block_until_ready(grads)
  bm = bm_lib.make_block_mask(_PER_HEAD, length, length, BLOCK, BLOCK, num_heads=hq)
  assert bm.num_heads == hq
  per_head = [{(i, j, bool(bm.dense_kinds()[h, i, j] == bm_lib.PARTIAL)) for i, j in bm.nonempty_pairs(h)}
              for h in range(hq)]
  assert len({frozenset(s) for s in per_head}) == hq, "every head must have its own schedule"
  assert bm.num_full > 0 and bm.num_partial > 0
  expected = {(b, h, i, j, partial) for b in range(batch) for h in range(hq) for i, j, partial in per_head[h]}
  for phase in ("fwd", "dq", "dkv"):
    got = {key[1:]: n for key, n in visits.items() if key[0] == phase}
    assert set(got) == expected, (phase, sorted(set(got) ^ expected))
    assert set(got.values()) == {1}, f"{phase}: a tile was visited more than once"


# Causal cross attention from 40 queries to 3 keys (bottom-right aligned): queries 0..36 see no
# key, those of the first two 16-row blocks on an EMPTY row of the BlockMask, the others inside a
# PARTIAL tile. Without learned sinks their normaliser is 0: lse must be -inf and the output 0.
# (The fully_masked_rows case of test_pallas.py has sinks, which keep every normaliser >= 1.)
@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_rows_that_see_no_key_without_sinks(platform):
  implementation, config_type = PLATFORMS[platform]
  q, k, v, _, d_out, d_lse = helpers.make_inputs(4, 1, 40, 3, 2, 1, 16, 16, jnp.float32)
  got, _ = helpers.compare_backends(implementation, config_type(block_q=BLOCK, block_kv=BLOCK), q, k, v,
                                    None, d_out, d_lse, mask=masks.causal())
  lse = np.asarray(got[1])
  assert np.isneginf(lse[:, :37]).all() and np.isfinite(lse[:, 37:]).all()
  np.testing.assert_array_equal(np.asarray(got[0])[:, :37], 0.0)
