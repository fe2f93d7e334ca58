"""Neighborhood attention on the Pallas kernels in layouts that produce FULL blocks.

FULL blocks are what the tiled token order is built to produce, yet the cases of test_pallas.py
have only PARTIAL and EMPTY blocks on their grids. Here aligned blocked attention (every visited
block FULL), strided windows and a dilated causal window (FULL and PARTIAL blocks) run in float32
and bfloat16 on both kernels (interpret mode), against the dense reference built from NATTEN's
definitions, and every kernel's visits are recorded: exactly the BlockMask's non-empty blocks (with
blocks of one grid tile), the mask evaluated exactly on the PARTIAL ones.
"""

import collections

import jax.numpy as jnp
import pytest

import attn_jax
from attn_jax import block_mask as bm_lib
from attn_jax.neighborhood import mask as nb_mask
from attn_jax.neighborhood import tiling
from tests import tolerances
from tests.neighborhood import dense_reference
from tests.neighborhood.test_attention import _inputs, _value_and_grads

# name: (spatial, kernel, stride, dilation, causal, sinks, (Hq, Hkv), tile, (FULL, PARTIAL) blocks)
CASES = {
    "2d_blocked_aligned": ((8, 8), (4, 4), (4, 4), (1, 1), (False, False), True, (2, 1), (4, 4), (4, 0)),
    "2d_strided_window": ((8, 16), (4, 8), (4, 4), (1, 1), (False, False), False, (2, 2), (4, 4), (12, 8)),
    "1d_dilated_causal_strided": ((96,), (40,), (8,), (2,), (True,), True, (2, 1), (16,), (4, 8)),
}
# A covering design: every case on both kernels, every kernel and every case in both dtypes.
RUNS = [("2d_blocked_aligned", "pallas_tpu", jnp.float32), ("2d_blocked_aligned", "pallas_gpu", jnp.bfloat16),
        ("2d_strided_window", "pallas_tpu", jnp.bfloat16), ("2d_strided_window", "pallas_gpu", jnp.float32),
        ("1d_dilated_causal_strided", "pallas_tpu", jnp.float32),
        ("1d_dilated_causal_strided", "pallas_gpu", jnp.bfloat16)]


@pytest.mark.parametrize("name,implementation,dtype", RUNS,
                         ids=[f"{n}-{i}-{jnp.dtype(d).name}" for n, i, d in RUNS])
def test_full_blocks_match_dense_reference_and_visit_the_blockmask(name, implementation, dtype):
  shape, kernel, stride, dilation, causal, with_sinks, (hq, hkv), tile, (n_full, n_partial) = CASES[name]
  layout = tiling.TileLayout(shape, dilation, tile)
  block = layout.tile_size
  bm = bm_lib.make_block_mask(nb_mask.NeighborhoodMask(layout, kernel, stride, causal),
                              layout.num_tokens, layout.num_tokens, block, block)
  assert (bm.num_full, bm.num_partial) == (n_full, n_partial)

  visits = collections.Counter()

  def record(phase, b, h, i, j, evaluated):
    visits[(phase, int(b), int(h), int(i), int(j), bool(evaluated))] += 1

  # The TPU kernel's blocks default to the tile (neighborhood api's backend_config); the GPU
  # kernels keep their own register-bound blocks unless asked, so the GPU runs ask for the tile.
  if implementation == "pallas_tpu":
    attention_config = attn_jax.PallasTpuConfig(record_visits=record)
  else:
    attention_config = attn_jax.PallasGpuConfig(block_q=block, block_kv=block, record_visits=record)
  config = attn_jax.NeighborhoodConfig(tile_shape=tile, attention_config=attention_config)

  q, k, v, _, _, sinks, d_out, d_lse = _inputs(5, shape, hq, hkv, 0, dtype, d=16, dv=16)
  args = {"q": q, "k": k, "v": v}
  if with_sinks:
    args["sinks"] = sinks
  dense = dense_reference.dense_mask(shape, kernel, stride, dilation, causal)

  def fast(args):
    return attn_jax.neighborhood_attention(
        args["q"], args["k"], args["v"], kernel, stride, dilation, causal, sinks=args.get("sinks"),
        return_lse=True, config=config)

  def ref(args):
    return dense_reference.dense_attention(args["q"], args["k"], args["v"], dense, sinks=args.get("sinks"))

  got = _value_and_grads(fast, args, d_out, d_lse)
  want = _value_and_grads(ref, args, d_out, d_lse)
  tolerances.assert_close(got[0], want[0], dtype, "out")
  # The TPU kernel folds scale * log2(e) into q and rounds it to the input dtype (an MXU operand),
  # as splash attention does: the LSE then carries that operand's rounding.
  rounded = dtype if implementation == "pallas_tpu" and dtype != jnp.float32 else None
  tolerances.assert_close_accumulated(got[1], want[1], "lse", rounded_operands=rounded)
  for key in args:
    tolerances.assert_close(got[2][key], want[2][key], dtype, f"d{key}")

  batch = q.shape[0]
  expected = {(b, h, i, j, bool(bm.dense_kinds()[0, i, j] == bm_lib.PARTIAL))
              for b in range(batch) for h in range(hq) for i, j in bm.nonempty_pairs()}
  for phase in ("fwd", "dq", "dkv"):
    seen = {key[1:]: n for key, n in visits.items() if key[0] == phase}
    assert set(seen) == expected, (phase, sorted(set(seen) ^ expected))
    assert set(seen.values()) == {1}, f"{phase}: a block was visited more than once"
