"""Context-parallel softmax attention equals the unsharded reference (outputs, LSE, every
gradient) on sequence-sharded inputs, for ring and all-gather, contiguous and zig-zag layouts,
every mask family, sinks, soft-cap, segments crossing shard boundaries, GQA / MQA, causal cross
attention, head sharding and the Pallas kernels in interpret mode; the schedule skips the
empty ring steps (counted, and checked against the tiles the backend visits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import masks
from attn_jax import sharding
from attn_jax.context_parallel import shifted
from attn_jax.context_parallel import softmax as cp_softmax
from attn_jax.softmax import common
from tests import tolerances
from tests.softmax import helpers

# Meshes over the 8 fake CPU devices: batch over "data", the sequence over 4 (or 2) devices.
MESH = sharding.make_mesh(data=2, sequence=4)
MESH2 = sharding.make_mesh(data=4, sequence=2)
MESH2_SMALL = sharding.make_mesh(data=2, sequence=2, devices=jax.devices()[:4])
HEADS_MESH = sharding.make_mesh(data=2, sequence=2, tensor=2)
_PER_HEAD = masks.from_fn(lambda q, k, h: (k <= q + 8 * h) | (k < 2), name="k<=q+8h|k<2")
_LAYOUT = masks.block_layout(np.random.RandomState(3).rand(6, 6) < 0.5, 11, 11)


def _segments(batch, length, seed):
  """Document ids whose boundaries fall inside shards and across them."""
  rng = np.random.RandomState(seed)
  cuts = np.sort(rng.choice(np.arange(1, length), 3, replace=False))
  ids = np.searchsorted(cuts, np.arange(length), side="right")
  return jnp.asarray(np.stack([ids, (ids + 1) % 3] * (batch // 2)), jnp.int32)


def _run(cp, q, k, v, sinks, d_out, d_lse, implementation, config, **kwargs):
  return helpers.value_and_grads(implementation, config, q, k, v, sinks, d_out, d_lse,
                                 context_parallel=cp, **kwargs)


def _compare(cp, *, mask, q_len=64, kv_len=None, heads=(4, 2), sinks=True, segments=True, soft_cap=None,
             dtype=jnp.float32, implementation="xla", config=None, seed=0, batch=2):
  kv_len = kv_len or q_len
  q, k, v, s, d_out, d_lse = helpers.make_inputs(seed, batch, q_len, kv_len, heads[0], heads[1], 8, 8, dtype)
  kwargs = dict(mask=mask, logits_soft_cap=soft_cap)
  if segments:
    kwargs.update(q_segment_ids=_segments(batch, q_len, seed), kv_segment_ids=_segments(batch, kv_len, seed))
  got = _run(cp, q, k, v, s if sinks else None, d_out, d_lse, implementation, config, **kwargs)
  want = helpers.value_and_grads("reference", None, q, k, v, s if sinks else None, d_out, d_lse, **kwargs)
  lse_dtype = jnp.float32 if dtype == jnp.float32 else dtype
  tolerances.assert_close(got[0], want[0], dtype, "out")
  tolerances.assert_close(got[1], want[1], lse_dtype, "lse")
  for name, a, b in zip(["dq", "dk", "dv", "dsinks"], got[2], want[2]):
    assert a.dtype == b.dtype, name
    tolerances.assert_close(a, b, dtype, name)


CASES = {
    # name: (sequence devices, strategy, load_balance, mask, extra kwargs)
    "ring_causal_zigzag_softcap": (4, "ring", "auto", masks.causal(), dict(soft_cap=5.0)),
    "ring_window_sinks_contiguous": (4, "ring", "contiguous", masks.sliding_window(7) | masks.sink_tokens(3), {}),
    "ring_full_cross": (4, "ring", "auto", None, dict(kv_len=32, segments=False)),
    "gather_causal_cross": (4, "all_gather", "auto", masks.causal(), dict(q_len=64, kv_len=32)),
    "ring_chunked_prefix_bf16": (2, "ring", "zigzag", masks.chunked_causal(12) | masks.prefix_lm(5),
                                 dict(dtype=jnp.bfloat16)),
    "ring_layout_mqa": (2, "ring", "auto", _LAYOUT, dict(heads=(4, 1), sinks=False)),
    "ring_causal_cross": (2, "ring", "auto", masks.causal(), dict(q_len=32, kv_len=64)),
    "gather_window_lr": (2, "all_gather", "contiguous", masks.sliding_window(5, 9), {}),
}
# The same cases with the sequence over 4 devices: more distinct (step, device) branches to
# compile (a minute or so each on two shared cores).
SLOW = {name: (4,) + case[1:] for name, case in CASES.items() if case[0] == 2}


@pytest.mark.parametrize("name", sorted(CASES) + [pytest.param(f"{n}-4", marks=pytest.mark.slow) for n in sorted(SLOW)])
def test_matches_unsharded_reference(name):
  devices, strategy, balance, mask, extra = SLOW[name[:-2]] if name.endswith("-4") else CASES[name]
  cp = attn_jax.ContextParallel(MESH if devices == 4 else MESH2, "sequence", strategy, balance, batch_axes="data")
  _compare(cp, mask=mask, batch=4 if devices == 2 else 2, **extra)


def test_head_dependent_mask_with_head_sharding():
  # Head-dependent masks see global head indices through the shifted mask's head offset.
  cp = attn_jax.ContextParallel(HEADS_MESH, "sequence", batch_axes="data", head_axes="tensor")
  _compare(cp, mask=_PER_HEAD & masks.causal(), heads=(4, 2))


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
def test_pallas_kernels_on_local_tiles(implementation):
  # Contiguous halves keep the interpreted kernel calls few: the diagonal in the first step,
  # one full tile in the second (TPU interpret mode runs every branch on every device).
  cp = attn_jax.ContextParallel(MESH2_SMALL, "sequence", load_balance="contiguous", batch_axes="data")
  if implementation == "pallas_tpu":
    config, length = attn_jax.PallasTpuConfig(block_q=8, block_kv=8, interpret=True), 16
  else:
    config, length = attn_jax.PallasGpuConfig(block_q=16, block_kv=16, interpret=True), 32
  _compare(cp, mask=masks.causal(), q_len=length, implementation=implementation, config=config, soft_cap=4.0)


def _plan(mask, strategy="ring", balance="contiguous", q_len=64, kv_len=64, heads=4, mesh=MESH):
  spec = common.Spec(mask=mask or masks.full(), scale=1.0, logits_soft_cap=None, q_len=q_len, kv_len=kv_len,
                     num_q_heads=heads, num_kv_heads=heads, head_dim=8, v_head_dim=8, has_sinks=False,
                     has_segments=False)
  cp = attn_jax.ContextParallel(mesh, "sequence", strategy, balance)
  return cp_softmax.make_plan(spec, cp)


def test_skipped_ring_steps_are_counted():
  # Causal, contiguous: device i needs the K/V of devices 0..i, so of the 4 x 4 (step, device)
  # pairs, 6 do no attention; the diagonal, a full tile and "nothing" are the only branches.
  p = _plan(masks.causal())
  assert (p.num_steps, p.device_steps, p.skipped, len(p.branches)) == (4, 16, 6, 3)
  assert p.num_calls == 10
  # Zig-zag balances it: every device computes in every step, the same area (in chunk pairs):
  # three in the first step (two diagonals, one full), two full ones after.
  z = _plan(masks.causal(), balance="zigzag")
  assert (z.num_steps, z.skipped) == (4, 0)
  c = z.q_layout.chunk
  area = [sum((x.q_hi - x.q_lo) * (x.k_hi - x.k_lo) for x in z.branches[b]) // (c * c)
          for b in z.table[:, :, 0].ravel()]
  assert area == [3] * 4 + [2] * 12
  # "auto" picks zig-zag for causal and contiguous for a full mask.
  assert _plan(masks.causal(), balance="auto").q_layout.pieces == 2
  assert _plan(None, balance="auto").q_layout.pieces == 1
  # A window shorter than a shard needs two ring steps: K/V stop after one hop.
  w = _plan(masks.sliding_window(5))
  assert (w.num_steps, w.skipped) == (2, 16 - 7)
  # A window reaching forward only (left=0) never needs the previous shard.
  assert _plan(masks.sliding_window(0, 3)).num_steps == 4
  # All-gather: one step; a device with no visible key (sinks-free rows of a window far away)
  # would be skipped; here every device works.
  g = _plan(masks.causal(), strategy="all_gather")
  assert (g.num_steps, g.device_steps, g.skipped) == (1, 4, 0)


@pytest.mark.parametrize("balance", ["contiguous", "zigzag"])
def test_visited_tiles_equal_unsharded_block_mask(balance):
  # With chunks of whole backend blocks, the tiles the backend visits over all devices and ring
  # steps are exactly the unsharded BlockMask's non-empty tiles: empty steps are not computed.
  visits = []
  chunk = 64 // (4 * (2 if balance == "zigzag" else 1))
  config = attn_jax.XlaConfig(block_q=chunk, block_kv=chunk, record_visits=lambda *a: visits.append(a))
  cp = attn_jax.ContextParallel(MESH, "sequence", "ring", balance, batch_axes="data")
  q, k, v, *_ = helpers.make_inputs(0, 2, 64, 64, 4, 2, 8, 8, jnp.float32)
  out = jax.jit(lambda q, k, v: attn_jax.attention(q, k, v, mask=masks.causal(), config=config,
                                                   context_parallel=cp))(q, k, v)
  jax.block_until_ready(out)
  fwd = [a for a in visits if a[0] == "fwd"]
  bm = attn_jax.make_block_mask(masks.causal(), 64, 64, chunk, chunk)
  # Each tile is visited once per batch shard (the "data" axis has 2 devices).
  assert len(fwd) == 2 * bm.num_nonempty


def test_shifted_masks_equal_global_slices():
  ctx = masks.MaskContext(48, 40)
  for mask in [masks.causal(), masks.sliding_window(5, 2), masks.sink_tokens(7), masks.chunked_causal(8),
               masks.chunked_causal(7), masks.prefix_lm(9), ~masks.causal(offset=3) | masks.sink_tokens(2),
               _LAYOUT, _PER_HEAD]:
    dense = mask.materialize(48, 40, num_heads=4)
    for q0, k0, h0 in [(0, 0, 0), (16, 8, 2), (40, 24, 1)]:
      local = shifted.shift(mask, q0, k0, h0, ctx)
      got = local.materialize(8, 16, num_heads=2)
      want = dense[..., q0:q0 + 8, k0:k0 + 16]
      want = want[h0:h0 + 2] if mask.depends_on_head else want
      np.testing.assert_array_equal(got, want, err_msg=f"{mask!r} at {(q0, k0, h0)}")
      bm = attn_jax.make_block_mask(local, 8, 16, 4, 4, num_heads=2)
      for h in range(bm.num_heads):
        for i in range(2):
          for j in range(4):
            tile = got[..., 4 * i:4 * i + 4, 4 * j:4 * j + 4]
            tile = tile[h] if tile.ndim == 3 else tile
            kind = bm.dense_kinds()[h, i, j]
            assert kind == (2 if tile.all() else 1 if tile.any() else 0), (mask, q0, k0, i, j)
  # Equal relative positions give equal (shared) masks for the translation-invariant families.
  assert shifted.shift(masks.causal(), 16, 16, 0, ctx) == shifted.shift(masks.causal(), 32, 32, 0, ctx)
  assert shifted.shift(masks.sliding_window(4), 8, 0, 0, ctx) == masks.sliding_window(4, offset=8 - 8)
  assert isinstance(shifted.shift(_LAYOUT, 8, 0, 0, ctx), shifted.Shifted)
  # Given the tile's size, parts constant on the tile drop out: far below the diagonal only the
  # sink tokens of a window-plus-sinks mask remain, the same mask for every such tile.
  window_sinks = masks.sliding_window(4) | masks.sink_tokens(3)
  square = masks.MaskContext(48, 48)
  assert shifted.shift(window_sinks, 32, 0, 0, square, 8, 8) == masks.sink_tokens(3, causal=False)
  assert shifted.shift(window_sinks, 16, 16, 0, square, 8, 8) == masks.sliding_window(4, offset=0)
  assert shifted.shift(masks.causal() & masks.sink_tokens(40), 32, 0, 0, square, 8, 8) == masks.full()


def test_per_device_calls_run_without_the_sharding_rules():
  # Inside the shard_map the arrays are per-device shards: backends that consult the active
  # rules (cuDNN refuses a sequence split by them) must see none there.
  seen = []

  def visible(q, k):
    if isinstance(q, jax.core.Tracer):
      seen.append(sharding.current())
    return k <= q

  mask = masks.from_fn(visible, in_kernel=True)
  cp = attn_jax.ContextParallel(MESH, "sequence", batch_axes="data")
  q = jnp.zeros((2, 32, 2, 8))

  def f(q):
    with sharding.use_rules(MESH):
      return attn_jax.attention(q, q, q, mask=mask, context_parallel=cp)

  jax.jit(f).lower(q)
  assert seen and all(s is None for s in seen)


def test_bad_input_names_the_values():
  q = jnp.zeros((2, 62, 4, 8))
  cp = attn_jax.ContextParallel(MESH, "sequence", batch_axes="data")
  with pytest.raises(ValueError, match=r"q_len 62 must be divisible by the size 4 of mesh axis 'sequence'"):
    attn_jax.attention(q, q, q, context_parallel=cp)
  with pytest.raises(ValueError, match=r"block_q 16 \(= 128\)"):
    attn_jax.attention(jnp.zeros((2, 64, 4, 8)), jnp.zeros((2, 64, 4, 8)), jnp.zeros((2, 64, 4, 8)),
                       mask=masks.causal(), config=attn_jax.XlaConfig(block_q=16, block_kv=16),
                       context_parallel=cp)
  with pytest.raises(ValueError, match=r"axis_name 'seq' is not an axis of the mesh.*'sequence': 4"):
    attn_jax.ContextParallel(MESH, "seq")
  with pytest.raises(ValueError, match="strategy must be one of"):
    attn_jax.ContextParallel(MESH, "sequence", "tree")
  with pytest.raises(ValueError, match="batch_axes names 'batch'"):
    attn_jax.ContextParallel(MESH, "sequence", batch_axes="batch")
  with pytest.raises(ValueError, match="context_parallel must be an attn_jax.ContextParallel"):
    attn_jax.attention(q, q, q, context_parallel="sequence")
  config = attn_jax.PallasTpuConfig(interpret=True, sharding=jax.sharding.NamedSharding(MESH, jax.sharding.PartitionSpec()))
  with pytest.raises(ValueError, match="config.sharding must be None with context_parallel"):
    attn_jax.attention(jnp.zeros((2, 64, 4, 8)), jnp.zeros((2, 64, 4, 8)), jnp.zeros((2, 64, 4, 8)),
                       config=config, context_parallel=cp)
