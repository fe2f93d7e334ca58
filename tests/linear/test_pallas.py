"""The chunked Pallas kernels (TPU Mosaic and GPU Triton) in interpret mode, and their lowering.

On this CPU both kernels run in Pallas interpret mode through the public API
(``implementation="pallas_tpu" | "pallas_gpu"``) and are compared with the float32 reference:
outputs, final state and the gradients of q, k, v, the log decay and the initial state.
Separately, forward and backward are lowered for each kernel's real platform (Mosaic for TPU,
Triton for CUDA), which rejects operations and block shapes the hardware compilers do not take.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import dispatch
from tests import tolerances
from tests.linear import helpers

# name: (platform, decay, seq, hq, hkv, d, dv, normalize, segments, dtype, decay_heads, chunk).
# Grids stay small: TPU interpret mode costs tens of milliseconds per grid step.
CASES = {
    "tpu-scalar-gqa-segments": ("tpu", "scalar", 37, 4, 2, 8, 8, False, True, jnp.float32, None, 16),
    "tpu-none-normalize-bf16": ("tpu", "none", 40, 2, 1, 8, 8, True, False, jnp.bfloat16, None, 16),
    # float16 runs on float32 copies on TPU (Mosaic has no float16 vectors on v4).
    "tpu-fixed-f16": ("tpu", "fixed", 30, 2, 1, 8, 8, False, False, jnp.float16, None, 16),
    "gpu-fixed-qheads-segments": ("gpu", "fixed", 45, 4, 2, 8, 12, False, True, jnp.float32, 4, 16),
    "gpu-scalar-normalize-bf16": ("gpu", "scalar", 50, 2, 2, 16, 8, True, False, jnp.bfloat16, None, 16),
    "gpu-none-mqa-length1": ("gpu", "none", 1, 2, 1, 8, 8, False, False, jnp.float32, None, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case):
  platform, decay, seq, hq, hkv, d, dv, normalize, segments, dtype, decay_heads, chunk = CASES[case]
  inputs, d_out, d_state = helpers.make_inputs(1, 1, seq, hq, hkv, d, dv, dtype, decay=decay,
                                               decay_heads=decay_heads, normalize=normalize,
                                               initial_state=True)
  seg = None
  if segments:
    ids = np.zeros((1, seq), np.int32)
    ids[:, seq // 3:] = 1
    ids[:, (2 * seq) // 3:] = 0
    seg = jnp.asarray(ids)
  helpers.compare(f"pallas_{platform}", inputs, d_out, d_state, segment_ids=seg, chunk_size=chunk,
                  normalize=normalize, feature_map="elu_plus_one" if normalize else None)


# Per-channel decays (GLA gates): name: (platform, seq, hq, hkv, dtype, chunk, segments, strong,
# normalize, decay_heads). The chunks are cut in sub-chunks of 16 rows (8 on TPU when 16 does not
# divide the chunk): "sub8" has 5 blocks per chunk, the chunk-16 case one block (no off-diagonal
# sub-chunks), the others 2 and 4.
CHANNEL_CASES = {
    "tpu-gqa-segments-ragged": ("tpu", 37, 2, 1, jnp.float32, 32, True, False, False, None),
    "tpu-sub8-normalize-bf16": ("tpu", 40, 2, 2, jnp.bfloat16, 40, False, False, True, None),
    "tpu-strong-decay-segments": ("tpu", 70, 2, 1, jnp.float32, 64, True, True, False, None),
    "gpu-gqa-segments-chunk16": ("gpu", 45, 4, 2, jnp.float32, 16, True, False, False, None),
    "gpu-qheads-normalize-bf16": ("gpu", 30, 2, 1, jnp.bfloat16, None, False, False, True, 2),
    "gpu-strong-decay-mqa": ("gpu", 70, 2, 1, jnp.float32, 64, False, True, False, None),
}


@pytest.mark.parametrize("case", list(CHANNEL_CASES))
def test_per_channel_decay_matches_reference(case):
  platform, seq, hq, hkv, dtype, chunk, segments, strong, normalize, decay_heads = CHANNEL_CASES[case]
  inputs, d_out, d_state = helpers.make_inputs(2, 1, seq, hq, hkv, 8, 8, dtype, decay="channel",
                                               decay_heads=decay_heads, normalize=normalize,
                                               initial_state=True)
  if strong:
    # a_t = e^-3 .. e^-8 per step: a 16-token sub-chunk already decays by ~-88 and a 64-token
    # chunk by ~-350, so q exp(b) / k exp(-b) without sub-chunks would be 0 * inf.
    log_decay = np.random.default_rng(7).uniform(-8.0, -3.0, inputs["log_decay"].shape).astype(np.float32)
    assert np.cumsum(log_decay[:, :64], axis=1).min() < -2 * 88
    inputs["log_decay"] = jnp.asarray(log_decay)
  seg = None
  if segments:
    ids = np.zeros((1, seq), np.int32)
    ids[:, seq // 3:] = 1
    ids[:, (2 * seq) // 3:] = 0
    seg = jnp.asarray(ids)
  # Under the strong decay, the float32 decay gradient is ill-conditioned (a sum of large terms
  # that cancel): against a float64 recurrence, the xla backend's autodiff is off by 1.5e-5 and
  # the kernels' identity by 2.4e-5 of max|grad| (float32 tolerance 2e-5), every other array by
  # < 5e-7.
  got, _ = helpers.compare(f"pallas_{platform}", inputs, d_out, d_state, segment_ids=seg, chunk_size=chunk,
                           normalize=normalize, feature_map="elu_plus_one" if normalize else None,
                           grad_factors={"log_decay": 3.0} if strong else None)
  # The decay gradient is per channel and not trivially zero.
  assert got[2]["log_decay"].shape == inputs["log_decay"].shape
  assert float(jnp.abs(got[2]["log_decay"]).max()) > 1e-3


@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_gpu_key_and_value_blocks_match_reference(decay):
  """GPU programs over blocks of 16 value columns and 16 key channels (key dim 24 padded to 32,
  value dim 40 to 64): the state is split in 2 x 4 [16, 16] slices, the partial dQ / dK of the
  value blocks and the partial outputs / dV of the key blocks are summed; GQA, segments and an
  initial state included."""
  inputs, d_out, d_state = helpers.make_inputs(3, 1, 40, 4, 2, 24, 40, jnp.float32, decay=decay,
                                               initial_state=True)
  ids = np.zeros((1, 40), np.int32)
  ids[:, 25:] = 1
  kwargs = dict(segment_ids=jnp.asarray(ids), chunk_size=16)
  config = attn_jax.LinearPallasGpuConfig(block_v=16, block_k=16)
  got = helpers.value_and_grads(inputs, d_out, d_state, implementation="pallas_gpu", config=config, **kwargs)
  want = helpers.value_and_grads(inputs, d_out, d_state, implementation="reference", **kwargs)
  tolerances.assert_close(got[0], want[0], jnp.float32, "out")
  tolerances.assert_close(got[1], want[1], jnp.float32, "final_state")
  for name in want[2]:
    tolerances.assert_close(got[2][name], want[2][name], jnp.float32, f"d{name}")


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_per_channel_decay_dispatches_to_the_kernel(platform, monkeypatch):
  """With implementation=None on a TPU / GPU, per-channel decays are served by the kernel (the
  registry entry is wrapped to record the call and to force interpret mode on this CPU)."""
  inputs, _, _ = helpers.make_inputs(2, 1, 16, 2, 2, 8, 8, jnp.float32, decay="channel")
  name = f"pallas_{platform}"
  config = (attn_jax.LinearPallasTpuConfig if platform == "tpu" else attn_jax.LinearPallasGpuConfig)(interpret=True)
  table = dispatch._REGISTRY["linear"]
  calls = []

  def spy(backend):
    original = table[backend]

    def fn(*args, **kwargs):
      calls.append(backend)
      if backend == name:
        kwargs["config"] = config
      return original(*args, **kwargs)
    return fn

  for backend in dispatch.platform_order("linear", platform):
    monkeypatch.setitem(table, backend, spy(backend))
  monkeypatch.setattr(dispatch, "current_platform", lambda: platform)
  got = jax.jit(lambda i: attn_jax.linear_attention(**i))(inputs)
  assert calls == [name]
  want = attn_jax.linear_attention(**inputs, implementation="reference")
  tolerances.assert_close(got, want, jnp.float32, "out")


_LOWERING = {
    "scalar_decay_segments_gqa": dict(decay="scalar", segments=True, hq=4, hkv=2),
    "channel_decay_segments_gqa": dict(decay="channel", segments=True, hq=4, hkv=2),
    "plain_mha": dict(decay=None, segments=False, hq=2, hkv=2),
}


@pytest.mark.parametrize("case", list(_LOWERING))
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_kernels_lower_for_their_hardware(platform, case):
  """Forward and backward lower to Mosaic (TPU) / Triton (CUDA) with hardware chunk sizes."""
  c = _LOWERING[case]
  batch, length, d = 2, 512, 128
  sd = jax.ShapeDtypeStruct
  args = (sd((batch, length, c["hq"], d), jnp.bfloat16), sd((batch, length, c["hkv"], d), jnp.bfloat16),
          sd((batch, length, c["hkv"], d), jnp.bfloat16),
          sd((batch, length, c["hkv"]) + ((d,) if c["decay"] == "channel" else ()), jnp.float32),
          sd((batch, length), jnp.int32))
  config = attn_jax.LinearPallasTpuConfig(interpret=False) if platform == "tpu" else (
      attn_jax.LinearPallasGpuConfig(interpret=False))

  def loss(q, k, v, g, seg):
    out = attn_jax.linear_attention(q, k, v, log_decay=g if c["decay"] else None,
                                    segment_ids=seg if c["segments"] else None, config=config)
    return out.astype(jnp.float32).sum()

  hardware = {"tpu": "tpu", "gpu": "cuda"}[platform]
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(
      lowering_platforms=(hardware,)).as_text()
  marker = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}[platform]
  # One kernel for the forward pass, two (dQ and dK/dV) for the backward pass.
  assert len(re.findall(re.escape(marker) + r"\b", text)) == 3


def test_dispatch_order_and_config_errors():
  assert dispatch.platform_order("linear", "tpu") == ("pallas_tpu", "xla")
  assert dispatch.platform_order("linear", "gpu") == ("pallas_gpu", "xla")
  assert dispatch.platform_order("linear", "cpu") == ("xla",)
  with pytest.raises(ValueError, match="LinearPallasGpuConfig.chunk_size must be a power of two >= 16"):
    attn_jax.LinearPallasGpuConfig(chunk_size=24)
  with pytest.raises(ValueError, match="LinearPallasTpuConfig.chunk_size must be a positive multiple of 8"):
    attn_jax.LinearPallasTpuConfig(chunk_size=12)
  inputs, _, _ = helpers.make_inputs(2, 1, 16, 2, 2, 8, 8, jnp.float32)
  with pytest.raises(ValueError, match="config must be a LinearPallasTpuConfig"):
    attn_jax.linear_attention(**inputs, implementation="pallas_tpu", config=attn_jax.LinearXlaConfig())
  with pytest.raises(ValueError, match="chunk_size must be a power of two >= 16 for implementation='pallas_gpu'"):
    attn_jax.linear_attention(**inputs, implementation="pallas_gpu", chunk_size=24)


@pytest.mark.parametrize("implementation,decay", [("pallas_gpu", "scalar"), ("pallas_gpu", "channel"),
                                                  ("xla", "scalar")])
def test_sharded_over_batch_and_heads_equals_unsharded(implementation, decay):
  """8 fake CPU devices: the Pallas adapter's shard_map (batch x heads) and XLA's own partitioning
  of the xla backend give the unsharded outputs, final state and gradients."""
  assert jax.device_count() == 8
  inputs, d_out, d_state = helpers.make_inputs(4, 2, 24, 4, 2, 8, 8, jnp.float32, decay=decay,
                                               initial_state=True)
  seg = jnp.asarray(np.repeat([[0, 1], [3, 3]], [10, 14], axis=1))
  # The xla backend is partitioned by XLA (Auto axes); the Pallas adapter's shard_map also takes
  # Explicit axes.
  axis_type = jax.sharding.AxisType.Auto if implementation == "xla" else jax.sharding.AxisType.Explicit
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type,) * 2)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "model", None))
  kw = dict(segment_ids=seg, chunk_size=16)
  if implementation == "xla":
    got = helpers.value_and_grads({n: x if x is None or n == "initial_state" or x.ndim != 4 else
                                   jax.device_put(x, sharding) for n, x in inputs.items()},
                                  d_out, d_state, implementation="xla", **kw)
  else:
    got = helpers.value_and_grads(inputs, d_out, d_state, config=attn_jax.LinearPallasGpuConfig(sharding=sharding),
                                  **kw)
    assert got[0].sharding.spec == jax.sharding.PartitionSpec("data", None, "model", None)
  want = helpers.value_and_grads(inputs, d_out, d_state, implementation=implementation, **kw)
  np.testing.assert_allclose(got[0], want[0], atol=1e-5)
  np.testing.assert_allclose(got[1], want[1], atol=1e-5)
  # The decay gradient sums over batch and time: sharded partial sums add in another order, so
  # it gets a float32 relative tolerance on top of the absolute one.
  for name in want[2]:
    np.testing.assert_allclose(got[2][name], want[2][name], atol=1e-5, rtol=1e-5, err_msg=name)


def test_sharding_errors():
  inputs, _, _ = helpers.make_inputs(2, 2, 16, 2, 2, 8, 8, jnp.float32)
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  by_seq = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data", None, None))
  with pytest.raises(NotImplementedError, match="sequence or feature sharding"):
    attn_jax.linear_attention(**inputs, config=attn_jax.LinearPallasGpuConfig(sharding=by_seq))
  by_heads = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "model", None))
  with pytest.raises(ValueError, match="state heads 2 .* are not divisible by the 4 shards"):
    attn_jax.linear_attention(**inputs, config=attn_jax.LinearPallasGpuConfig(sharding=by_heads))
