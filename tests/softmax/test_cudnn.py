"""The ``cudnn`` backend on a CPU: its translation to ``jax.nn.dot_product_attention`` arguments,
its refusals, and dispatch falling through to the Pallas kernel.

cuDNN itself needs an NVIDIA GPU (``tests/gpu`` runs it there). Here the same translation
(:func:`attn_jax.softmax.cudnn.plan` + :func:`~attn_jax.softmax.cudnn.apply`) drives
``jax.nn.dot_product_attention(implementation="xla")``, which applies the same ``is_causal`` /
``local_window_size`` masks, and is compared with the reference, forward and backward, for every
kind of call the backend claims to serve.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import dispatch
from attn_jax import masks
from attn_jax import sharding
from attn_jax.neighborhood import api as nb_api
from attn_jax.softmax import common
from attn_jax.softmax import cudnn
from tests import tolerances
from tests.softmax import helpers

# name: (mask, q_len, kv_len, hq, hkv, d). Cross lengths use the project's default bottom-right
# alignment unless the mask gives an offset.
SERVED = {
    "full_self": (None, 40, 40, 2, 2, 16),
    "full_cross": (None, 24, 56, 2, 1, 16),
    "causal_self_gqa": (masks.causal(), 48, 48, 4, 2, 16),
    "causal_cross_prefill": (masks.causal(), 40, 56, 2, 2, 16),     # pads 16 query rows
    "causal_cross_q_longer": (masks.causal(), 56, 40, 2, 1, 8),     # first 16 rows see nothing
    "causal_decode_mqa": (masks.causal(), 1, 70, 4, 1, 16),         # no mask left at all
    "causal_top_left_cross": (masks.causal(offset=0), 20, 64, 2, 2, 16),  # keys 20.. never seen
    "window_self": (masks.sliding_window(7), 50, 50, 2, 2, 16),
    "window_cross": (masks.sliding_window(9), 30, 45, 2, 1, 16),    # keys trimmed, rows padded
    "window_decode": (masks.sliding_window(12), 1, 64, 2, 2, 16),   # 13 keys, no mask
    "causal_and_window_offsets": (masks.causal(offset=-2) & masks.sliding_window(5, 4, offset=-1), 36, 36, 2, 2, 16),
    "diagonal_only": (masks.sliding_window(0), 20, 20, 2, 2, 16),
}


def _spec(mask, q_len, kv_len, hq, hkv, d, dv=None, **kw):
  fields = dict(mask=masks.full() if mask is None else mask, scale=d ** -0.5, logits_soft_cap=None,
                q_len=q_len, kv_len=kv_len, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                v_head_dim=d if dv is None else dv, has_sinks=False, has_segments=False)
  fields.update(kw)
  return common.Spec(**fields)


def _grads(fn, q, k, v, d_out):
  """``fn(q, k, v)`` and the gradients of ``<fn(q, k, v), d_out>``, in one compiled call."""
  def loss(q, k, v):
    out = fn(q, k, v)
    return (out.astype(jnp.float32) * d_out).sum(), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


@pytest.mark.parametrize("case", list(SERVED))
def test_translation_matches_reference(case):
  """plan + apply on jax's xla implementation == the reference, output and dq, dk, dv (f32)."""
  mask, tq, tk, hq, hkv, d = SERVED[case]
  spec = _spec(mask, tq, tk, hq, hkv, d)
  plan = cudnn.plan(spec)
  # The call handed to cuDNN: a window only ever comes with is_causal (jax-ml/jax#39576), and a
  # causal call is square, so that top-left and bottom-right alignment agree.
  assert plan.window is None or plan.is_causal
  if plan.is_causal:
    assert plan.q_stop - plan.q_start + plan.pad_q == plan.kv_stop - plan.kv_start
  assert plan.useful_pairs == int(np.asarray(spec.mask.materialize(tq, tk)).sum())
  q, k, v, _, d_out, _ = helpers.make_inputs(len(case), 2, tq, tk, hq, hkv, d, d, jnp.float32)
  with jax.default_matmul_precision("highest"):
    got = _grads(lambda q, k, v: cudnn.apply(plan, q, k, v, scale=spec.scale, implementation="xla"),
                 q, k, v, d_out)
    want = _grads(lambda q, k, v: attn_jax.attention(q, k, v, mask=mask, implementation="reference"),
                  q, k, v, d_out)
  tolerances.assert_close(got[0], want[0], jnp.float32, "out")
  for name, a, b in zip(("dq", "dk", "dv"), got[1], want[1]):
    tolerances.assert_close(a, b, jnp.float32, name)


def test_plans_of_the_alignment_cases():
  # Chunked prefill: 40 queries at the end of 56 keys: 16 zero rows make a square causal call.
  p = cudnn.plan(_spec(masks.causal(), 40, 56, 2, 2, 16))
  assert (p.pad_q, p.is_causal, p.window, p.kv_stop) == (16, True, None, 56)
  # Decode: the single query sees every key; nothing is masked.
  p = cudnn.plan(_spec(masks.causal(), 1, 70, 2, 2, 16))
  assert (p.is_causal, p.window, p.kv_start, p.kv_stop) == (False, None, 0, 70)
  # Windowed decode reads only the window's keys.
  p = cudnn.plan(_spec(masks.sliding_window(12), 1, 64, 2, 2, 16))
  assert (p.is_causal, p.kv_start, p.kv_stop) == (False, 51, 64)
  # More queries than keys, bottom-right: the first 16 rows see no key and are not computed.
  p = cudnn.plan(_spec(masks.causal(), 56, 40, 2, 2, 16))
  assert (p.q_start, p.q_stop, p.pad_q, p.is_causal) == (16, 56, 0, True)


@pytest.mark.parametrize("case", ["causal_cross_prefill", "window_self", "causal_decode_mqa"])
def test_backend_through_the_api(case, monkeypatch):
  """attention(implementation="cudnn") end to end, with jax's xla implementation in cuDNN's place
  and the GPU check bypassed: bf16 output and gradients against the reference."""
  monkeypatch.setattr(cudnn, "_JAX_IMPLEMENTATION", "xla")
  monkeypatch.setattr(cudnn, "_check_nvidia_gpu", lambda: None)
  mask, tq, tk, hq, hkv, d = SERVED[case]
  q, k, v, _, d_out, _ = helpers.make_inputs(3, 1, tq, tk, hq, hkv, d, d, jnp.bfloat16)
  got = _grads(lambda q, k, v: attn_jax.attention(q, k, v, mask=mask, implementation="cudnn"), q, k, v, d_out)
  want = _grads(lambda q, k, v: attn_jax.attention(q, k, v, mask=mask, implementation="reference"), q, k, v, d_out)
  assert got[0].dtype == jnp.bfloat16
  tolerances.assert_close(got[0], want[0], jnp.bfloat16, "out")
  for name, a, b in zip(("dq", "dk", "dv"), got[1], want[1]):
    tolerances.assert_close(a, b, jnp.bfloat16, name)


_LAYOUT = masks.block_layout(np.tril(np.ones((4, 4), bool)), 8, 8)

# name: (attention kwargs beyond q, k, v, shapes (q_len, kv_len, hq, hkv, d, dv, dtype), match).
REFUSED = {
    "sinks": (dict(sinks=jnp.zeros((2,))), None, "sinks"),
    "soft_cap": (dict(logits_soft_cap=30.0), None, "logits_soft_cap"),
    "segments": (dict(q_segment_ids=jnp.zeros((1, 32), jnp.int32)), None, "segment ids"),
    "return_lse": (dict(return_lse=True), None, "return_lse"),
    "float32": ({}, (32, 32, 2, 2, 16, 16, jnp.float32), "bfloat16 or float16"),
    "dv_ne_d": ({}, (32, 32, 2, 2, 16, 8, jnp.bfloat16), "value head dim"),
    "head_dim_20": ({}, (32, 32, 2, 2, 20, 20, jnp.bfloat16), "head_dim 20"),
    "head_dim_512": ({}, (32, 32, 2, 2, 512, 512, jnp.bfloat16), "head_dim 512"),
    "sink_tokens": (dict(mask=masks.sliding_window(7) | masks.sink_tokens(4)), None, "unions of masks"),
    "sink_tokens_and": (dict(mask=masks.causal() & masks.sink_tokens(4)), None, "sink tokens"),
    "chunked": (dict(mask=masks.chunked_causal(8)), None, "chunked causal"),
    "prefix_lm": (dict(mask=masks.prefix_lm(8)), None, "prefix-LM"),
    "block_layout": (dict(mask=_LAYOUT), None, "block-sparse layouts"),
    "from_fn": (dict(mask=masks.from_fn(lambda q, k: k <= q)), None, "arbitrary masks"),
    "per_head": (dict(mask=masks.from_fn(lambda q, k, h: k <= q + h)), None, "per-head masks"),
    "negation": (dict(mask=~masks.causal()), None, "negated masks"),
    "two_sided_window": (dict(mask=masks.sliding_window(4, 3)), None, "run past the last key"),
    "left_only_window": (dict(mask=masks.sliding_window(4, 100)), None, "jax-ml/jax#39576"),
    "top_left_q_longer": (dict(mask=masks.causal(offset=0)), (48, 32, 2, 2, 16, 16, jnp.bfloat16),
                          "run past the last key"),
    "empty": (dict(mask=masks.causal(offset=-40)), None, "no query sees any key"),
    "work_ratio": (dict(mask=masks.causal()), (8, 64, 2, 2, 16, 16, jnp.bfloat16), "max_work_ratio"),
    "no_gpu": ({}, None, "cuDNN needs an NVIDIA GPU"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_name_the_feature(case):
  kwargs, shapes, match = REFUSED[case]
  tq, tk, hq, hkv, d, dv, dtype = shapes or (32, 32, 2, 2, 16, 16, jnp.bfloat16)
  q, k, v, *_ = helpers.make_inputs(0, 1, tq, tk, hq, hkv, d, dv, dtype)
  with pytest.raises(NotImplementedError, match=match):
    attn_jax.attention(q, k, v, implementation="cudnn", **kwargs)


def test_jax_refusals_are_named_and_other_errors_pass(monkeypatch):
  """jax's own NotImplementedError (e.g. odd lengths under differentiation) becomes a named
  refusal that dispatch can skip; other errors are not turned into refusals."""
  monkeypatch.setattr(cudnn, "_check_nvidia_gpu", lambda: None)
  q, k, v, *_ = helpers.make_inputs(0, 1, 16, 16, 2, 2, 16, 16, jnp.bfloat16)

  def raising(error):
    def apply(*args, **kwargs):
      raise error
    return apply
  monkeypatch.setattr(cudnn, "apply", raising(NotImplementedError("Unsupported sequence length Q 63, KV 63.")))
  with pytest.raises(NotImplementedError, match="jax's cuDNN path refused the call: Unsupported sequence length"):
    attn_jax.attention(q, k, v, mask=masks.causal(), implementation="cudnn")
  monkeypatch.setattr(cudnn, "apply", raising(RuntimeError("cuDNN not found.")))
  with pytest.raises(NotImplementedError, match="cuDNN is not usable in this installation"):
    attn_jax.attention(q, k, v, mask=masks.causal(), implementation="cudnn")
  monkeypatch.setattr(cudnn, "apply", raising(RuntimeError("out of memory")))
  with pytest.raises(RuntimeError, match="out of memory") as info:
    attn_jax.attention(q, k, v, mask=masks.causal(), implementation="cudnn")
  assert not isinstance(info.value, NotImplementedError)


def test_sequence_sharding_is_refused():
  q, k, v, *_ = helpers.make_inputs(0, 2, 16, 16, 2, 2, 16, 16, jnp.bfloat16)
  with sharding.use_rules(sharding.make_mesh(data=2, sequence=2, tensor=2)):
    with pytest.raises(NotImplementedError, match=r"sequence sharded over mesh axes \['sequence'\]"):
      attn_jax.attention(q, k, v, mask=masks.causal(), implementation="cudnn")
  with sharding.use_rules(sharding.make_mesh(data=4, tensor=2)):
    with pytest.raises(NotImplementedError, match="cuDNN needs an NVIDIA GPU"):
      attn_jax.attention(q, k, v, mask=masks.causal(), implementation="cudnn")


def test_work_ratio_is_a_tunable():
  spec = _spec(masks.causal(), 8, 64, 2, 2, 16)
  with pytest.raises(NotImplementedError, match="max_work_ratio"):
    cudnn.plan(spec)
  p = cudnn.plan(spec, attn_jax.CudnnConfig(max_work_ratio=float("inf")))
  assert p.pad_q == 56 and p.work_ratio > 1.5
  for bad in (0.5, "2", True, float("nan")):
    with pytest.raises(ValueError, match="CudnnConfig.max_work_ratio must be a number >= 1"):
      attn_jax.CudnnConfig(max_work_ratio=bad)
  q, k, v, *_ = helpers.make_inputs(0, 1, 16, 16, 2, 2, 16, 16, jnp.bfloat16)
  with pytest.raises(ValueError, match="config must be a CudnnConfig"):
    attn_jax.attention(q, k, v, implementation="cudnn", config=attn_jax.XlaConfig())
  # A CudnnConfig alone selects the backend, which on this CPU says what it needs.
  with pytest.raises(NotImplementedError, match="cuDNN needs an NVIDIA GPU"):
    attn_jax.attention(q, k, v, config=attn_jax.CudnnConfig())


@pytest.mark.parametrize("case", ["window_with_sink_tokens", "causal_without_cudnn_library"])
def test_dispatch_on_gpu_falls_through_to_pallas(case, monkeypatch):
  """On a (simulated) GPU, cuDNN is tried first; a call it refuses, or any call on a jax without
  a cuDNN library (this CPU's), is served by pallas_gpu."""
  monkeypatch.setattr(dispatch, "current_platform", lambda: "gpu")
  assert dispatch.platform_order("softmax") == ("cudnn", "pallas_gpu", "xla")
  calls = []
  helpers.spy_registry(monkeypatch, calls, attn_jax.PallasGpuConfig(interpret=True))
  mask = masks.sliding_window(6) | masks.sink_tokens(2) if case.startswith("window") else masks.causal()
  q, k, v, _, d_out, _ = helpers.make_inputs(5, 1, 24, 24, 2, 1, 16, 16, jnp.bfloat16)
  got = _grads(lambda q, k, v: attn_jax.attention(q, k, v, mask=mask), q, k, v, d_out)
  assert calls[:2] == ["cudnn", "pallas_gpu"] and "xla" not in calls
  want = _grads(lambda q, k, v: attn_jax.attention(q, k, v, mask=mask, implementation="reference"), q, k, v, d_out)
  tolerances.assert_close(got[0], want[0], jnp.bfloat16, "out")
  for name, a, b in zip(("dq", "dk", "dv"), got[1], want[1]):
    tolerances.assert_close(a, b, jnp.bfloat16, name)


def test_dispatch_on_gpu_takes_cudnn_when_it_serves(monkeypatch):
  monkeypatch.setattr(dispatch, "current_platform", lambda: "gpu")
  monkeypatch.setattr(cudnn, "_JAX_IMPLEMENTATION", "xla")
  calls = []
  helpers.spy_registry(monkeypatch, calls, attn_jax.PallasGpuConfig(interpret=True))
  q, k, v, *_ = helpers.make_inputs(6, 1, 24, 40, 2, 2, 16, 16, jnp.bfloat16)
  out = attn_jax.attention(q, k, v, mask=masks.causal())
  assert calls == ["cudnn"]
  want = attn_jax.attention(q, k, v, mask=masks.causal(), implementation="reference")
  tolerances.assert_close(out, want, jnp.bfloat16, "out")


def test_neighborhood_attention_skips_cudnn_on_gpu(monkeypatch):
  monkeypatch.setattr(dispatch, "current_platform", lambda: "gpu")
  assert nb_api.resolve_backend(None) == "pallas_gpu"
