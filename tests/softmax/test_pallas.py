"""The Pallas flash kernels (TPU Mosaic and GPU Triton) in interpret mode, and their lowering.

On this CPU both kernels run in Pallas interpret mode through the public API
(``implementation="pallas_tpu" | "pallas_gpu"``) and are compared with the reference: outputs,
LSE and every gradient. Separately, each kernel is lowered for its real platform (Mosaic for TPU,
Triton for CUDA), which rejects operations and block shapes the hardware compilers do not take.
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import attn_jax
from attn_jax import block_mask as bm_lib
from attn_jax import dispatch
from attn_jax import masks
from tests.softmax import helpers

PLATFORMS = {
    "tpu": ("pallas_tpu", attn_jax.PallasTpuConfig),
    "gpu": ("pallas_gpu", attn_jax.PallasGpuConfig),
}

_LAYOUT = masks.block_layout(np.random.RandomState(4).rand(5, 5) < 0.5, 17, 17)
_PER_HEAD = masks.from_fn(lambda q, k, h: (k <= q + 6 * h) & (k >= q - 20), name="per-head band")
_BAND = masks.from_fn(lambda q, k: (k <= q) & (k >= q - 9), name="band", in_kernel=True)
# One mask per query head: two heads share a window (one stored structure), one is causal, one
# a window with sinks; the pairs sharing a K/V head differ, so GQA heads are not stacked.
_PER_HEAD_MIX = masks.per_head([masks.sliding_window(7), masks.causal(), masks.sliding_window(7),
                                masks.sliding_window(20) | masks.sink_tokens(3)])

# name: (mask, batch, q_len, kv_len, hq, hkv, d, dv, dtype, sinks, soft_cap, segments). Grids are
# kept small: TPU interpret mode costs about 40 ms per grid step.
CASES = {
    "causal_gqa_sinks": (masks.causal(), 1, 63, 63, 4, 2, 16, 16, jnp.float32, True, None, False),
    "window_sinks_mqa_cap_segments": (masks.sliding_window(12) | masks.sink_tokens(3), 1, 70, 70,
                                      2, 1, 16, 8, jnp.bfloat16, True, 3.0, True),
    "causal_cross_dv_ne_d": (masks.causal(), 1, 37, 75, 2, 2, 64, 32, jnp.float32, False, None, False),
    "chunked_or_prefix": (masks.chunked_causal(20) | masks.prefix_lm(10), 1, 50, 50, 2, 1, 16, 16,
                          jnp.float32, True, None, False),
    "decode_q_len_1": (masks.causal(), 2, 1, 130, 2, 1, 16, 16, jnp.float16, True, None, False),
    "full_noncausal_cross": (None, 1, 33, 47, 2, 2, 16, 16, jnp.float32, False, 5.0, False),
    "block_layout_tiles": (_LAYOUT, 1, 65, 70, 2, 2, 16, 16, jnp.float32, True, None, False),
    "per_head_fn_tiles": (_PER_HEAD, 1, 40, 40, 2, 1, 16, 16, jnp.float32, False, None, False),
    "in_kernel_fn": (_BAND, 1, 45, 45, 2, 1, 16, 16, jnp.float32, False, None, False),
    "fully_masked_rows": (masks.causal(), 1, 40, 3, 2, 1, 16, 16, jnp.float32, True, None, False),
    "per_head_masks_gqa": (_PER_HEAD_MIX, 1, 50, 50, 4, 2, 16, 16, jnp.float32, True, None, False),
}


def _segments(batch, length, cuts):
  ids = np.zeros((batch, length), np.int32)
  for c in cuts:
    ids[:, c:] += 1
  return jnp.asarray(ids)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_kernel_matches_reference(platform, case):
  mask, batch, q_len, kv_len, hq, hkv, d, dv, dtype, sinks, cap, segments = CASES[case]
  implementation, config_type = PLATFORMS[platform]
  q, k, v, s, d_out, d_lse = helpers.make_inputs(len(case), batch, q_len, kv_len, hq, hkv, d, dv, dtype)
  kwargs = dict(mask=mask, logits_soft_cap=cap)
  if segments:
    kwargs["q_segment_ids"] = _segments(batch, q_len, (25, 50))
  helpers.compare_backends(implementation, config_type(block_q=16, block_kv=16), q, k, v,
                           s if sinks else None, d_out, d_lse, **kwargs)


@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_default_block_sizes(platform):
  implementation, _ = PLATFORMS[platform]
  inputs = helpers.make_inputs(1, 1, 100, 100, 2, 1, 16, 16, jnp.float32)
  helpers.compare_backends(implementation, None, *inputs, mask=masks.sliding_window(30))


def test_per_head_masks_on_the_xla_backend():
  q, k, v, s, d_out, d_lse = helpers.make_inputs(3, 1, 50, 50, 4, 2, 16, 16, jnp.float32)
  helpers.compare_backends("xla", attn_jax.XlaConfig(block_q=16, block_kv=16), q, k, v, s, d_out, d_lse,
                           mask=_PER_HEAD_MIX)
  with pytest.raises(ValueError, match="has 4 masks but the call has 2 query heads"):
    attn_jax.attention(q[:, :, :2], k[:, :, :1], v[:, :, :1], mask=_PER_HEAD_MIX, implementation="reference")


@pytest.mark.parametrize("fused", [True, False], ids=["fused_bwd", "split_bwd"])
def test_tpu_schedule_split_into_bands(fused):
  """A scalar-memory budget far below the schedule's size: each pass runs as several kernel calls
  over bands of whole rows, with the same results and still exactly one visit per non-empty tile."""
  from attn_jax.softmax import schedule
  mask = masks.sliding_window(20) | masks.sink_tokens(3)
  batch, length, hq, hkv, block = 1, 100, 2, 1, 8
  bm = bm_lib.make_block_mask(mask, length, length, block, block)
  budget = 32
  rows = schedule.row_steps(bm, None, hq, 2, budget)
  cols = schedule.col_steps(bm, None, hq, 2, 2, budget)
  assert rows.num_bands >= 3 and cols.num_bands >= 2
  visits = collections.Counter()

  def record(phase, b, h, i, j, evaluated):
    visits[(phase, int(b), int(h), int(i), int(j), bool(evaluated))] += 1

  inputs = helpers.make_inputs(5, batch, length, length, hq, hkv, 16, 16, jnp.float32)
  config = attn_jax.PallasTpuConfig(block_q=block, block_kv=block, max_schedule_bytes=budget,
                                    fused_backward=fused, record_visits=record)
  helpers.compare_backends("pallas_tpu", config, *inputs, mask=mask)
  kinds = bm.dense_kinds()
  expected = {(b, h, i, j, kinds[0, i, j] == bm_lib.PARTIAL)
              for b in range(batch) for h in range(hq) for i, j in bm.nonempty_pairs()}
  for phase in ("fwd", "dq", "dkv"):
    got = {key[1:] for key in visits if key[0] == phase}
    assert got == expected, phase


# Compute sub-blocks (the TPU default on hardware: 1024 x 1024 blocks computed in 512 x 512 parts),
# scaled down: 16 x 16 blocks in 8 x 8 parts. (rows, stacked) sub-blocks along both axes need one
# head per step; key sub-blocks alone keep a GQA group stacked. Masks reach EMPTY sub-blocks of
# PARTIAL tiles (skipped: above a causal diagonal, beside a sink column), FULL ones (run unmasked)
# and PARTIAL ones.
@pytest.mark.parametrize("mask_name,block_q_compute,fused", [
    ("causal", 8, True), ("causal", 8, False), ("window_sinks", 8, True), ("window_sinks", None, True),
    ("per_head", 8, False)])
def test_tpu_compute_sub_blocks_match_reference(mask_name, block_q_compute, fused):
  from attn_jax.softmax import schedule
  mask = {"causal": masks.causal(), "window_sinks": masks.sliding_window(20) | masks.sink_tokens(3),
          "per_head": _PER_HEAD_MIX}[mask_name]
  length, hq, hkv, block = 50, 4, 2, 16
  heads = hq if mask.depends_on_head else None
  bm = bm_lib.make_block_mask(mask, length, length, block, block, heads)
  grid = (block // (block_q_compute or block), 2)
  sub = set()
  for m in range(bm.num_masks):
    s, e = bm.kv_ptr[m, 0], bm.kv_ptr[m, -1]
    packed = schedule.sub_kinds(bm, bm.entry_rows(m), bm.kv_cols[s:e], bm.kv_kinds[s:e], grid,
                                schedule.structure_mask(bm, m))
    packed = packed[bm.kv_kinds[s:e] == bm_lib.PARTIAL]
    sub |= {int(x) for n in range(grid[0] * grid[1]) for x in (packed >> (2 * n)) & 3}
  # Halves of a 16-row tile along keys only have no FULL part in these masks.
  want = {bm_lib.EMPTY, bm_lib.PARTIAL} | ({bm_lib.FULL} if block_q_compute else set())
  assert sub == want, sub
  config = attn_jax.PallasTpuConfig(block_q=block, block_kv=block, block_kv_compute=8,
                                    block_q_compute=block_q_compute, fused_backward=fused)
  inputs = helpers.make_inputs(7, 1, length, length, hq, hkv, 16, 16, jnp.float32)
  helpers.compare_backends("pallas_tpu", config, *inputs, mask=mask)


_VISIT_CASES = [("gpu", "causal"), ("gpu", "window_sinks"), ("gpu", "layout"), ("tpu", "window_sinks"),
                ("tpu", "layout")]
_VISIT_MASKS = {"causal": masks.causal(), "window_sinks": masks.sliding_window(20) | masks.sink_tokens(2),
                "layout": _LAYOUT}


@pytest.mark.parametrize("platform,mask_name", _VISIT_CASES)
def test_kernels_visit_exactly_the_blockmask_tiles(platform, mask_name):
  """Every kernel (forward, dQ, dK/dV) visits each non-empty tile once per (batch, head) and
  evaluates the mask exactly on the PARTIAL ones; empty tiles are never touched."""
  implementation, config_type = PLATFORMS[platform]
  mask = _VISIT_MASKS[mask_name]
  visits = collections.Counter()

  def record(phase, b, h, i, j, evaluated):
    visits[(phase, int(b), int(h), int(i), int(j), bool(evaluated))] += 1

  batch, length, hq, hkv = 2, 56, 2, 1
  config = config_type(block_q=16, block_kv=16, record_visits=record)
  q, k, v, *_ = helpers.make_inputs(0, batch, length, length, hq, hkv, 16, 16, jnp.float32)
  grads = jax.grad(lambda q, k, v: attn_jax.attention(q, k, v, mask=mask, implementation=implementation,
                                                      config=config).sum(), argnums=(0, 1, 2))(q, k, v)
  jax.block_until_ready(grads)
  bm = bm_lib.make_block_mask(mask, length, length, 16, 16)
  kinds = bm.dense_kinds()
  expected = {(b, h, i, j, kinds[0, i, j] == bm_lib.PARTIAL)
              for b in range(batch) for h in range(hq) for i, j in bm.nonempty_pairs()}
  for phase in ("fwd", "dq", "dkv"):
    got = {key[1:]: n for key, n in visits.items() if key[0] == phase}
    assert set(got) == expected, phase
    assert set(got.values()) == {1}, f"{phase}: a tile was visited more than once"
  assert bm.num_nonempty < kinds.size


def test_gpu_kernels_take_their_own_blocks():
  """The GPU forward, dQ and dK/dV kernels run with their own block sizes (each backward kernel on
  the BlockMask of its blocks): each visits exactly its BlockMask's non-empty tiles, and the
  results match the reference."""
  mask = masks.sliding_window(20) | masks.sink_tokens(2)
  launches = {"fwd": (32, 16), "dq": (16, 32), "dkv": (16, 16)}
  visits = collections.Counter()

  def record(phase, b, h, i, j, evaluated):
    visits[(phase, int(b), int(h), int(i), int(j), bool(evaluated))] += 1

  config = attn_jax.PallasGpuConfig(record_visits=record,
                                    **{k: attn_jax.PallasGpuLaunch(bq, bk) for k, (bq, bk) in launches.items()})
  inputs = helpers.make_inputs(5, 1, 56, 56, 2, 1, 16, 16, jnp.float32)
  helpers.compare_backends("pallas_gpu", config, *inputs, mask=mask)
  for phase, (bq, bk) in launches.items():
    bm = bm_lib.make_block_mask(mask, 56, 56, bq, bk)
    expected = {(0, h, i, j, bm.dense_kinds()[0, i, j] == bm_lib.PARTIAL) for h in range(2) for i, j in bm.nonempty_pairs()}
    assert {key[1:] for key in visits if key[0] == phase} == expected, phase


def test_gpu_launch_resolution():
  """Per-kernel overrides beat the config-wide fields, which beat the per-kernel defaults; default
  blocks are capped by the (power-of-two) sequence lengths."""
  from attn_jax.softmax import common
  from attn_jax.softmax import pallas as pallas_lib
  spec = common.Spec(masks.causal(), 1.0, None, 20, 1000, 2, 1, 100, 100, False, False)
  got = pallas_lib._gpu_launches(attn_jax.PallasGpuConfig(
      num_warps=4, dkv=attn_jax.PallasGpuLaunch(block_kv=16, num_warps=2)), spec, 2)
  assert got["fwd"] == (32, 32, 4, 2)  # default (128, 32) with block_q capped at 32 query tokens
  assert got["dkv"] == (32, 16, 2, 2)
  assert pallas_lib.gpu_launch_defaults("dkv", 128, 2) == (32, 32, 8, 2)
  assert pallas_lib.gpu_launch_defaults("dq", 64, 4) == (32, 32, 8, 2)
  with pytest.raises(ValueError, match="PallasGpuConfig.dq must be a PallasGpuLaunch or None"):
    attn_jax.PallasGpuConfig(dq=(16, 16))
  with pytest.raises(ValueError, match="PallasGpuLaunch.block_q must be a power of two >= 16"):
    attn_jax.PallasGpuLaunch(block_q=24)


# The shard_map wrapper is the adapter's and identical for both kernels; TPU interpret mode is
# slow on 8 devices, so it runs the harder case only (replicated K/V, per-head schedule slices).
@pytest.mark.parametrize("platform,heads,per_head", [("gpu", (4, 4), False), ("gpu", (8, 1), False),
                                                   ("gpu", (8, 2), True), ("tpu", (8, 1), False)],
                         ids=["gpu-mha", "gpu-mqa_head_fn", "gpu-gqa_per_head_masks", "tpu-mqa_head_fn"])
def test_sharded_equals_unsharded(platform, heads, per_head):
  """shard_map over batch x heads on 8 fake CPU devices gives the unsharded results; with
  head-dependent masks each shard uses its own heads' masks."""
  assert jax.device_count() == 8
  implementation, config_type = PLATFORMS[platform]
  hq, hkv = heads
  if per_head:
    mask = masks.per_head([masks.causal() if h % 3 == 0 else masks.sliding_window(3 + 2 * h) for h in range(hq)])
  else:
    mask = masks.causal() if hkv == hq else masks.from_fn(lambda q, k, h: k <= q + 4 * h)
  q, k, v, s, d_out, _ = helpers.make_inputs(2, 2, 32, 32, hq, hkv, 16, 16, jnp.float32)
  axis_types = (AxisType.Explicit,) * 2 if hkv == hq else (AxisType.Auto,) * 2
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=axis_types)
  sharding = NamedSharding(mesh, P("data", None, "model", None))

  def run(config, q):
    def loss(q, k, v, s):
      out = attn_jax.attention(q, k, v, mask=mask, sinks=s, implementation=implementation, config=config)
      return (out * d_out).sum(), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, s)

  (_, out_sharded), grads_sharded = run(config_type(block_q=16, block_kv=16, sharding=sharding),
                                         jax.device_put(q, sharding))
  (_, out), grads = run(config_type(block_q=16, block_kv=16), q)
  assert out_sharded.sharding.spec == P("data", None, "model", None)
  np.testing.assert_allclose(out_sharded, out, atol=1e-6)
  for a, b in zip(grads_sharded, grads):
    np.testing.assert_allclose(a, b, atol=1e-5)


_LOWERING = {
    "causal_d128_bf16_gqa_sinks": dict(mask=masks.causal(), d=128, dv=128, hq=8, hkv=2, dtype=jnp.bfloat16, sinks=True),
    "window_sinks_cap_segments_d64": dict(mask=masks.sliding_window(200) | masks.sink_tokens(4), d=64, dv=64,
                                          cap=30.0, segments=True),
    "chunked_mqa_d256_f16": dict(mask=masks.chunked_causal(96), d=256, dv=256, hkv=1, dtype=jnp.float16),
    "layout_tiles_dv_ne_d": dict(mask=masks.block_layout(np.tril(np.ones((6, 6), bool)), 100, 100), d=128, dv=64),
    "per_head_tiles_f32": dict(mask=_PER_HEAD, d=64, dv=64, dtype=jnp.float32),
    "per_head_masks_split_bwd": dict(mask=masks.per_head([masks.causal(), masks.sliding_window(100)] * 2),
                                     fused=False),
}


@pytest.mark.parametrize("case", list(_LOWERING))
@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_kernels_lower_for_their_hardware(platform, case):
  """Forward and backward lower to Mosaic (TPU) / Triton (CUDA) with hardware block sizes."""
  c = dict(d=128, dv=128, hq=4, hkv=2, dtype=jnp.bfloat16, sinks=False, cap=None, segments=False)
  c.update(_LOWERING[case])
  implementation, config_type = PLATFORMS[platform]
  fused = c.get("fused", True)
  config = config_type(interpret=False, **({"fused_backward": fused} if platform == "tpu" else {}))
  length, batch = 512, 2
  sd = jax.ShapeDtypeStruct
  args = (sd((batch, length, c["hq"], c["d"]), c["dtype"]), sd((batch, length, c["hkv"], c["d"]), c["dtype"]),
          sd((batch, length, c["hkv"], c["dv"]), c["dtype"]), sd((c["hq"],), jnp.float32),
          sd((batch, length), jnp.int32))

  def loss(q, k, v, s, seg):
    out = attn_jax.attention(q, k, v, mask=c["mask"], sinks=s if c["sinks"] else None,
                             logits_soft_cap=c["cap"], q_segment_ids=seg if c["segments"] else None,
                             implementation=implementation, config=config)
    return out.astype(jnp.float32).sum()

  hardware = {"tpu": "tpu", "gpu": "cuda"}[platform]
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(
      lowering_platforms=(hardware,)).as_text()
  marker = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}[platform]
  # One kernel for the forward pass; for the backward pass two (dQ and dK/dV) on GPU, one fused
  # kernel on TPU.
  assert len(re.findall(re.escape(marker) + r"\b", text)) == (2 if platform == "tpu" and fused else 3)


def test_dispatch_order_and_explicit_choice():
  assert dispatch.platform_order("softmax", "tpu") == ("pallas_tpu", "xla")
  assert dispatch.platform_order("softmax", "gpu") == ("cudnn", "pallas_gpu", "xla")
  assert dispatch.platform_order("softmax", "cpu") == ("xla",)
  q, k, v, *_ = helpers.make_inputs(0, 1, 8, 8, 1, 1, 16, 16, jnp.float32)
  with pytest.raises(ValueError, match="config must be a PallasTpuConfig"):
    attn_jax.attention(q, k, v, implementation="pallas_tpu", config=attn_jax.PallasGpuConfig())
  # A config alone selects its backend.
  visits = []
  attn_jax.attention(q, k, v, config=attn_jax.PallasGpuConfig(
      block_q=16, block_kv=16, record_visits=lambda *a: visits.append(a)))
  assert visits and visits[0][0] == "fwd"


@pytest.mark.parametrize("call,error,match", [
    (lambda: attn_jax.PallasTpuConfig(block_q=100), ValueError, r"PallasTpuConfig.block_q must be a positive multiple of 8"),
    (lambda: attn_jax.PallasGpuConfig(block_kv=48), ValueError, r"PallasGpuConfig.block_kv must be a power of two >= 16"),
    (lambda: attn_jax.PallasGpuConfig(num_warps=0), ValueError, r"PallasGpuConfig.num_warps must be a positive int"),
])
def test_config_validation(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_bad_hardware_requests():
  q, k, v, *_ = helpers.make_inputs(0, 2, 8, 8, 2, 2, 16, 16, jnp.float32)
  with pytest.raises(ValueError, match="multiples of 128 on TPU hardware"):
    attn_jax.attention(q, k, v, implementation="pallas_tpu",
                       config=attn_jax.PallasTpuConfig(block_q=64, interpret=False))
  with pytest.raises(ValueError, match="record_visits is a debugging aid for interpret mode only"):
    attn_jax.attention(q, k, v, implementation="pallas_gpu",
                       config=attn_jax.PallasGpuConfig(interpret=False, record_visits=print))
  big = jnp.zeros((1, 8, 1, 512))
  with pytest.raises(NotImplementedError, match="head dims above 256"):
    attn_jax.attention(big, big, big, implementation="pallas_gpu")
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  seq_sharded = NamedSharding(mesh, P(None, "data", None, None))
  with pytest.raises(NotImplementedError, match="sequence or feature sharding"):
    attn_jax.attention(q, k, v, implementation="pallas_gpu", config=attn_jax.PallasGpuConfig(sharding=seq_sharded))
  with pytest.raises(ValueError, match="q heads 2 are not divisible by the 4 shards"):
    attn_jax.attention(q, k, v, implementation="pallas_gpu",
                       config=attn_jax.PallasGpuConfig(sharding=NamedSharding(mesh, P("data", None, "model", None))))
