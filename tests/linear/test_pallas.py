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
from tests.linear import helpers

# name: (platform, decay, seq, hq, hkv, d, dv, normalize, segments, dtype, decay_heads, chunk).
# Grids stay small: TPU interpret mode costs tens of milliseconds per grid step.
CASES = {
    "tpu-scalar-gqa-segments": ("tpu", "scalar", 37, 4, 2, 8, 8, False, True, jnp.float32, None, 16),
    "tpu-none-normalize-bf16": ("tpu", "none", 40, 2, 1, 8, 8, True, False, jnp.bfloat16, None, 16),
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


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_per_channel_decay_is_refused_by_name_and_falls_back(platform, monkeypatch):
  inputs, _, _ = helpers.make_inputs(2, 1, 16, 2, 2, 8, 8, jnp.float32, decay="channel")
  with pytest.raises(NotImplementedError, match="per-channel decay"):
    attn_jax.linear_attention(**inputs, implementation=f"pallas_{platform}")
  # With implementation=None on that platform, the dispatcher moves on to xla.
  monkeypatch.setattr(dispatch, "current_platform", lambda: platform)
  got = jax.jit(lambda i: attn_jax.linear_attention(**i))(inputs)
  want = jax.jit(lambda i: attn_jax.linear_attention(**i, implementation="xla"))(inputs)
  np.testing.assert_array_equal(got, want)


_LOWERING = {
    "scalar_decay_segments_gqa": dict(decay=True, segments=True, hq=4, hkv=2),
    "plain_mha": dict(decay=False, segments=False, hq=2, hkv=2),
}


@pytest.mark.parametrize("case", list(_LOWERING))
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_kernels_lower_for_their_hardware(platform, case):
  """Forward and backward lower to Mosaic (TPU) / Triton (CUDA) with hardware chunk sizes."""
  c = _LOWERING[case]
  batch, length, d = 2, 512, 128
  sd = jax.ShapeDtypeStruct
  args = (sd((batch, length, c["hq"], d), jnp.bfloat16), sd((batch, length, c["hkv"], d), jnp.bfloat16),
          sd((batch, length, c["hkv"], d), jnp.bfloat16), sd((batch, length, c["hkv"]), jnp.float32),
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


@pytest.mark.parametrize("implementation", ["pallas_gpu", "xla"])
def test_sharded_over_batch_and_heads_equals_unsharded(implementation):
  """8 fake CPU devices: the Pallas adapter's shard_map (batch x heads) and XLA's own partitioning
  of the xla backend give the unsharded outputs, final state and gradients."""
  assert jax.device_count() == 8
  inputs, d_out, d_state = helpers.make_inputs(4, 2, 24, 4, 2, 8, 8, jnp.float32, decay="scalar",
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
  for name in want[2]:
    np.testing.assert_allclose(got[2][name], want[2][name], atol=1e-5, err_msg=name)


def test_sharding_errors():
  inputs, _, _ = helpers.make_inputs(2, 2, 16, 2, 2, 8, 8, jnp.float32)
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  by_seq = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data", None, None))
  with pytest.raises(NotImplementedError, match="sequence or feature sharding"):
    attn_jax.linear_attention(**inputs, config=attn_jax.LinearPallasGpuConfig(sharding=by_seq))
  by_heads = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "model", None))
  with pytest.raises(ValueError, match="state heads 2 .* are not divisible by the 4 shards"):
    attn_jax.linear_attention(**inputs, config=attn_jax.LinearPallasGpuConfig(sharding=by_heads))
