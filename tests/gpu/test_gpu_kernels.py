"""The GPU kernels for real (not interpret mode) against the reference: needs an NVIDIA GPU.

Selected with ``--gpu`` (``tests/conftest.py`` deselects the ``gpu`` marker otherwise, so the
CPU-only CI command leaves them out by name, and its summary counts them as deselected)::

    python -m pytest --gpu -m gpu tests/gpu          # or: bash experiments/gpu_check.sh

With ``--gpu`` on a machine without a GPU every test here is skipped with that reason.
Covers every Pallas GPU kernel (softmax flash forward / dQ / dK-dV, neighborhood attention on
them, the chunked linear-attention kernels) and the cudnn backend, forward and backward, bf16 and
float32 (cuDNN: bf16 and f16), on shapes whose BlockMasks have FULL, PARTIAL and EMPTY tiles at
the kernels' default block sizes, plus one 32k-token causal case per softmax kernel.

float32 tolerance on the GPU kernels: Pallas's Triton lowering turns a float32 dot of DEFAULT
precision into a TF32 tensor-core dot (10-bit mantissa; ``jax/_src/pallas/triton/lowering.py``,
``_TF32_PRECISIONS``), so float32 results are compared at ``TF32_FACTOR`` times the float32
tolerance (2e-3 of max|ref|), still tight enough to catch an indexing or masking error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import masks
from tests import tolerances
from tests.linear import helpers as linear_helpers
from tests.softmax import helpers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu",
                       reason=f"needs an NVIDIA GPU; jax's default backend is {jax.default_backend()!r}"),
]

TF32_FACTOR = 100.0


def _factor(dtype):
  return TF32_FACTOR if jnp.dtype(dtype) == jnp.float32 else 1.0


def _segments(batch, length, cuts):
  ids = np.zeros((batch, length), np.int32)
  for c in cuts:
    ids[:, c:] += 1
  return jnp.asarray(ids)


_LAYOUT = masks.block_layout(np.random.RandomState(3).rand(10, 18) < 0.5, 64, 64)
_PER_HEAD = masks.from_fn(lambda q, k, h: (k <= q + 64 * h) & (k >= q - 300), name="per-head band")

# name: (mask, batch, q_len, kv_len, hq, hkv, d, dv, sinks, soft_cap, segments)
PALLAS_CASES = {
    "causal_gqa_sinks_1000": (masks.causal(), 2, 1000, 1000, 8, 2, 128, 128, True, None, False),
    "window_sinks_cap_segments_d64": (masks.sliding_window(255) | masks.sink_tokens(4), 1, 1024, 1024,
                                      4, 1, 64, 64, True, 30.0, True),
    "block_layout_cross_dv_ne_d": (_LAYOUT, 1, 640, 1152, 4, 2, 128, 64, False, None, False),
    "causal_cross_33_of_1030": (masks.causal(), 2, 33, 1030, 4, 4, 64, 64, True, None, False),
    "per_head_tiles": (_PER_HEAD, 1, 512, 512, 4, 2, 64, 64, False, None, False),
}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("case", list(PALLAS_CASES))
def test_pallas_gpu_softmax(case, dtype):
  mask, batch, tq, tk, hq, hkv, d, dv, sinks, cap, segments = PALLAS_CASES[case]
  q, k, v, s, d_out, d_lse = helpers.make_inputs(len(case), batch, tq, tk, hq, hkv, d, dv, dtype)
  kwargs = dict(mask=mask, logits_soft_cap=cap)
  if segments:
    kwargs["q_segment_ids"] = _segments(batch, tq, (300, 700))
  helpers.compare_backends("pallas_gpu", attn_jax.PallasGpuConfig(interpret=False), q, k, v,
                           s if sinks else None, d_out, d_lse, factor=_factor(dtype), **kwargs)


# The two 32k cases share one xdist worker (gpu_check.sh runs `-n 4 --dist loadgroup`), so that
# their references (each tens of GiB at the peak) never hold the GPU's memory at the same time.
@pytest.mark.xdist_group("32k")
@pytest.mark.parametrize("implementation", ["pallas_gpu", "cudnn"])
def test_causal_32k_tokens(implementation):
  """One long sequence per softmax kernel: 32768 tokens, causal, GQA, bf16, forward + backward
  (the reference materialises 2 x 32k x 32k float32 scores: about 8 GiB)."""
  q, k, v, _, d_out, d_lse = helpers.make_inputs(32, 1, 32768, 32768, 2, 1, 128, 128, jnp.bfloat16)
  config = attn_jax.PallasGpuConfig(interpret=False) if implementation == "pallas_gpu" else None
  if implementation == "cudnn":
    # cuDNN returns no LSE: output and gradients only.
    got = _out_and_grads(implementation, q, k, v, d_out, masks.causal())
    want = _out_and_grads("reference", q, k, v, d_out, masks.causal())
    _assert_all_close(got, want, jnp.bfloat16)
  else:
    helpers.compare_backends(implementation, config, q, k, v, None, d_out, d_lse, mask=masks.causal())


def _out_and_grads(implementation, q, k, v, d_out, mask):
  def loss(q, k, v):
    out = attn_jax.attention(q, k, v, mask=mask, implementation=implementation)
    return (out.astype(jnp.float32) * d_out).sum(), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _assert_all_close(got, want, dtype):
  tolerances.assert_close(got[0], want[0], dtype, "out")
  for name, a, b in zip(("dq", "dk", "dv"), got[1], want[1]):
    assert np.isfinite(np.asarray(a, np.float32)).all(), f"{name} has non-finite values"
    tolerances.assert_close(a, b, dtype, name)


# name: (mask, q_len, kv_len, hq, hkv, d). Even lengths: jax refuses odd ones under
# differentiation on the cuDNN path (tested below).
CUDNN_CASES = {
    "causal_self_gqa_d128": (masks.causal(), 1024, 1024, 8, 2, 128),
    "causal_prefill_768_of_1024": (masks.causal(), 768, 1024, 4, 4, 64),
    "causal_q_longer_1024_over_640": (masks.causal(), 1024, 640, 4, 1, 64),
    "window255_self": (masks.sliding_window(255), 1024, 1024, 4, 2, 128),
    "window127_cross_512_of_1024": (masks.sliding_window(127), 512, 1024, 4, 4, 64),
    "full_cross_256_by_1024": (None, 256, 1024, 4, 2, 128),
    "causal_d256": (masks.causal(), 512, 512, 2, 2, 256),
}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", list(CUDNN_CASES))
def test_cudnn_backend(case, dtype):
  mask, tq, tk, hq, hkv, d = CUDNN_CASES[case]
  q, k, v, _, d_out, _ = helpers.make_inputs(len(case), 2, tq, tk, hq, hkv, d, d, dtype)
  got = _out_and_grads("cudnn", q, k, v, d_out, mask)
  want = _out_and_grads("reference", q, k, v, d_out, mask)
  _assert_all_close(got, want, dtype)


def test_cudnn_decode_forward():
  q, k, v, *_ = helpers.make_inputs(1, 4, 1, 4097, 8, 1, 128, 128, jnp.bfloat16)
  for mask in (masks.causal(), masks.sliding_window(1023)):
    got = attn_jax.attention(q, k, v, mask=mask, implementation="cudnn")
    want = attn_jax.attention(q, k, v, mask=mask, implementation="reference")
    tolerances.assert_close(got, want, jnp.bfloat16, f"out {mask!r}")


def test_dispatch_picks_cudnn_then_falls_through(monkeypatch):
  calls = []
  helpers.spy_registry(monkeypatch, calls)
  q, k, v, sinks, d_out, _ = helpers.make_inputs(7, 1, 512, 512, 4, 2, 64, 64, jnp.bfloat16)
  attn_jax.attention(q, k, v, mask=masks.causal())
  assert calls == ["cudnn"]
  calls.clear()
  attn_jax.attention(q, k, v, mask=masks.causal(), sinks=sinks)
  assert calls == ["cudnn", "pallas_gpu"]
  calls.clear()
  # float32 is refused by cuDNN, served by the Pallas kernel.
  attn_jax.attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask=masks.causal())
  assert calls == ["cudnn", "pallas_gpu"]
  calls.clear()
  # Odd lengths under differentiation: jax's cuDNN path refuses at trace time; dispatch moves on.
  q, k, v, _, d_out, _ = helpers.make_inputs(8, 1, 63, 63, 2, 2, 64, 64, jnp.bfloat16)
  got = _out_and_grads(None, q, k, v, d_out, masks.causal())
  assert calls[:2] == ["cudnn", "pallas_gpu"]
  _assert_all_close(got, _out_and_grads("reference", q, k, v, d_out, masks.causal()), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="jax's cuDNN path refused the call"):
    _out_and_grads("cudnn", q, k, v, d_out, masks.causal())


def test_cudnn_refuses_float32():
  q, k, v, *_ = helpers.make_inputs(9, 1, 64, 64, 2, 2, 64, 64, jnp.float32)
  with pytest.raises(NotImplementedError, match="bfloat16 or float16"):
    attn_jax.attention(q, k, v, mask=masks.causal(), implementation="cudnn")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("grid,kernel,stride,dilation,causal", [
    ((4096,), 255, 1, 1, False), ((48, 64), (13, 9), (1, 2), (1, 2), (False, True))],
    ids=["1d", "2d_dilated_causal"])
def test_pallas_gpu_neighborhood(grid, kernel, stride, dilation, causal, dtype):
  ks = jax.random.split(jax.random.PRNGKey(11), 5)
  shape = (1,) + grid + (4,)
  q = jax.random.normal(ks[0], shape + (64,), dtype)
  k = jax.random.normal(ks[1], shape[:-1] + (2, 64), dtype)
  v = jax.random.normal(ks[2], shape[:-1] + (2, 64), dtype)
  sinks = jax.random.normal(ks[3], (4,), jnp.float32)
  d_out = jax.random.normal(ks[4], shape + (64,), jnp.float32)

  def run(implementation):
    def loss(q, k, v, sinks):
      out = attn_jax.neighborhood_attention(q, k, v, kernel, stride, dilation, causal, sinks=sinks,
                                            implementation=implementation)
      return (out.astype(jnp.float32) * d_out).sum(), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, sinks)
    return out, grads

  got, want = run("pallas_gpu"), run("reference")
  tolerances.assert_close(got[0], want[0], dtype, "out", _factor(dtype))
  for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got[1], want[1]):
    tolerances.assert_close(a, b, dtype, name, _factor(dtype))


# name: (decay, seq, hq, hkv, d, dv, normalize, dtype, chunk)
LINEAR_CASES = {
    "fixed_gqa_f32": ("fixed", 1000, 4, 2, 64, 64, False, jnp.float32, None),
    "scalar_normalize_bf16": ("scalar", 1024, 4, 4, 64, 64, True, jnp.bfloat16, None),
    "gla_channel_bf16": ("channel", 777, 4, 2, 64, 64, False, jnp.bfloat16, 64),
    "gla_channel_f32": ("channel", 512, 2, 2, 128, 64, False, jnp.float32, None),
    # Head dim 256: four 64-channel key blocks in the forward and backward kernels.
    "fixed_mqa_d256_bf16": ("fixed", 300, 2, 1, 256, 128, False, jnp.bfloat16, None),
}


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_pallas_gpu_linear(case):
  decay, seq, hq, hkv, d, dv, normalize, dtype, chunk = LINEAR_CASES[case]
  inputs, d_out, d_state = linear_helpers.make_inputs(len(case), 2, seq, hq, hkv, d, dv, dtype, decay=decay,
                                                      normalize=normalize, initial_state=True)
  linear_helpers.compare("pallas_gpu", inputs, d_out, d_state, factor=_factor(dtype), chunk_size=chunk,
                         normalize=normalize, feature_map="elu_plus_one" if normalize else None)
