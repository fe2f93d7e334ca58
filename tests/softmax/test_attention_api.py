"""Public API behaviour: oracle cross-check, numerics edge cases, transformations, dispatch, errors."""

import collections

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import block_mask as bm_lib
from attn_jax import dispatch
from attn_jax import masks
from tests import tolerances
from tests.softmax import helpers

CONFIG = attn_jax.XlaConfig(block_q=16, block_kv=16)


@pytest.mark.parametrize("case", ["full", "causal", "gqa_causal", "window", "cross_bool_mask", "mqa"])
def test_reference_matches_jax_dot_product_attention(case):
  hq, hkv, q_len, kv_len = {"gqa_causal": (4, 2, 33, 33), "mqa": (4, 1, 20, 20),
                            "cross_bool_mask": (2, 2, 17, 29)}.get(case, (2, 2, 40, 40))
  q, k, v, *_ = helpers.make_inputs(0, 2, q_len, kv_len, hq, hkv, 16, 16, jnp.float32)
  ref_kwargs, jax_kwargs = {}, {}
  if case in ("causal", "gqa_causal"):
    ref_kwargs["mask"], jax_kwargs["is_causal"] = masks.causal(), True
  elif case == "window":
    ref_kwargs["mask"] = masks.sliding_window(5, 3)
    jax_kwargs["local_window_size"] = (5, 3)
  elif case == "cross_bool_mask":
    m = masks.causal() | masks.sink_tokens(2)
    ref_kwargs["mask"] = m
    jax_kwargs["mask"] = jnp.asarray(m.materialize(q_len, kv_len))[None, None]
  got = attn_jax.attention(q, k, v, implementation="reference", **ref_kwargs)
  with jax.default_matmul_precision("highest"):
    want = jax.nn.dot_product_attention(q, k, v, implementation="xla", **jax_kwargs)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_fully_masked_rows_are_zero_with_finite_gradients(implementation, with_sinks):
  # Odd query rows see nothing; the last segment of queries has no matching keys either.
  mask = masks.from_fn(lambda q, k: q % 2 == 0, name="even rows") & masks.causal()
  q, k, v, sinks, d_out, d_lse = helpers.make_inputs(1, 2, 40, 40, 2, 2, 8, 8, jnp.float32)
  q_seg = jnp.asarray(np.repeat([[0, 1, 2, 3]], 10, axis=1).reshape(1, 40).repeat(2, 0), jnp.int32)
  kv_seg = jnp.asarray(np.repeat([[0, 1, 2, 9]], 10, axis=1).reshape(1, 40).repeat(2, 0), jnp.int32)
  out, lse, grads = helpers.value_and_grads(
      implementation, CONFIG if implementation == "xla" else None, q, k, v,
      sinks if with_sinks else None, d_out, d_lse, mask=mask, q_segment_ids=q_seg,
      kv_segment_ids=kv_seg)
  dead = np.zeros((40,), bool)
  dead[1::2] = True
  dead[30:] = True
  np.testing.assert_array_equal(np.asarray(out)[:, dead], 0.0)
  if with_sinks:
    np.testing.assert_allclose(np.asarray(lse)[:, dead], np.broadcast_to(sinks, lse[:, dead].shape), rtol=1e-6)
  else:
    assert np.isneginf(np.asarray(lse)[:, dead]).all()
  assert np.isfinite(np.asarray(lse)[:, ~dead]).all()
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  np.testing.assert_array_equal(np.asarray(grads[0])[:, dead], 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_large_logits_do_not_overflow(dtype, implementation):
  # |logit| around 1e4: q and k entries of 25 with head_dim 16 and scale 1.
  q, k, v, sinks, d_out, d_lse = helpers.make_inputs(2, 1, 50, 50, 2, 1, 16, 16, dtype)
  q = (jnp.sign(q.astype(jnp.float32)) * 25.0).astype(dtype)
  k = (jnp.sign(k.astype(jnp.float32)) * 25.0).astype(dtype)
  config = CONFIG if implementation == "xla" else None
  out, lse, grads = helpers.value_and_grads(implementation, config, q, k, v, None, d_out, d_lse,
                                            mask=masks.causal(), scale=1.0, logits_soft_cap=None)
  assert out.dtype == dtype
  assert np.isfinite(np.asarray(out, np.float32)).all()
  assert float(jnp.abs(lse).max()) > 5e3
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)
  if implementation == "xla":
    want = helpers.value_and_grads("reference", None, q, k, v, None, d_out, d_lse,
                                   mask=masks.causal(), scale=1.0)
    tolerances.assert_close(out, want[0], dtype, "out")


def test_jit_vmap_grad_compose():
  q, k, v, sinks, *_ = helpers.make_inputs(3, 3, 24, 24, 2, 1, 8, 8, jnp.float32)
  mask = masks.sliding_window(6) | masks.sink_tokens(2)

  def f(q, k, v, impl):
    # vmap maps over the batch axis, so each call sees a batch of 1.
    return attn_jax.attention(q[None], k[None], v[None], mask=mask, sinks=sinks,
                              implementation=impl, config=CONFIG if impl == "xla" else None)[0]

  batched = jax.jit(jax.vmap(lambda q, k, v: f(q, k, v, "xla")))(q, k, v)
  direct = attn_jax.attention(q, k, v, mask=mask, sinks=sinks, implementation="reference")
  np.testing.assert_allclose(batched, direct, atol=1e-5)

  def loss(impl):
    return lambda q: jax.vmap(lambda a, b, c: f(a, b, c, impl))(q, k, v).sum()
  np.testing.assert_allclose(jax.jit(jax.grad(loss("xla")))(q), jax.jit(jax.grad(loss("reference")))(q),
                             atol=1e-5)


def test_mask_is_static_and_cached_under_jit():
  q, k, v, *_ = helpers.make_inputs(4, 1, 20, 20, 2, 2, 8, 8, jnp.float32)
  traces = collections.Counter()

  @jax.jit
  def f(q, k, v):
    traces["n"] += 1
    return attn_jax.attention(q, k, v, mask=masks.causal() & masks.sliding_window(4), config=CONFIG)

  f(q, k, v)
  f(q + 1, k, v)
  assert traces["n"] == 1


@pytest.mark.parametrize("mask", [masks.causal(), masks.sliding_window(7) | masks.sink_tokens(3),
                                  masks.chunked_causal(20), masks.full()], ids=repr)
def test_xla_visits_exactly_the_nonempty_blocks(mask):
  visits = collections.Counter()

  def record(phase, b, h, i, j, evaluated):
    visits[(phase, int(b), int(h), int(i), int(j), bool(evaluated))] += 1

  config = attn_jax.XlaConfig(block_q=8, block_kv=8, record_visits=record)
  q, k, v, *_ = helpers.make_inputs(5, 1, 61, 61, 2, 2, 8, 8, jnp.float32)
  grads = jax.grad(lambda q, k, v: attn_jax.attention(q, k, v, mask=mask, config=config).sum(),
                   argnums=(0, 1, 2))(q, k, v)
  jax.block_until_ready(grads)
  bm = bm_lib.make_block_mask(mask, 61, 61, 8, 8)
  partial = {(int(i), int(j)) for i, j in np.argwhere(bm.dense_kinds()[0] == bm_lib.PARTIAL)}
  expected = {(-1, -1, i, j, (i, j) in partial) for i, j in bm.nonempty_pairs()}
  for phase in ("fwd", "bwd"):
    got = {key[1:]: n for key, n in visits.items() if key[0] == phase}
    assert set(got) == expected, phase
    assert set(got.values()) == {1}, f"{phase}: a tile was visited more than once"
  assert bm.num_nonempty < bm.dense_kinds().size or mask == masks.full()


def test_dispatch_picks_xla_on_cpu_and_never_replaces_explicit_choice():
  assert dispatch.platform_order("softmax", "cpu") == ("xla",)
  assert "reference" in dispatch.backends("softmax")
  q, k, v, *_ = helpers.make_inputs(6, 1, 9, 9, 1, 1, 8, 8, jnp.float32)
  np.testing.assert_allclose(attn_jax.attention(q, k, v),
                             attn_jax.attention(q, k, v, implementation="reference"), atol=1e-6)
  with pytest.raises(ValueError, match="implementation must be one of"):
    attn_jax.attention(q, k, v, implementation="cudnn_typo")

  def refuses(*args, **kwargs):
    raise NotImplementedError("no support for testing")

  dispatch.register("softmax", "test_refuses", refuses)
  try:
    with pytest.raises(NotImplementedError, match="no support for testing"):
      attn_jax.attention(q, k, v, implementation="test_refuses")
  finally:
    dispatch._REGISTRY["softmax"].pop("test_refuses")


def _bad(**overrides):
  q, k, v, *_ = helpers.make_inputs(0, 2, 8, 8, 4, 2, 8, 8, jnp.float32)
  args = dict(q=q, k=k, v=v)
  args.update(overrides)
  q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
  return lambda: attn_jax.attention(q, k, v, **args)


@pytest.mark.parametrize("call,match", [
    (_bad(q=jnp.zeros((2, 8, 4))), r"q must have shape \[batch, seq, heads, head_dim\], got shape \(2, 8, 4\)"),
    (_bad(k=jnp.zeros((3, 8, 2, 8))), r"batch sizes differ"),
    (_bad(k=jnp.zeros((2, 8, 2, 6))), r"k head_dim must equal q head_dim 8"),
    (_bad(v=jnp.zeros((2, 7, 2, 8))), r"v must have shape \[batch, 8, 2, Dv\]"),
    (_bad(k=jnp.zeros((2, 8, 3, 8)), v=jnp.zeros((2, 8, 3, 8))), r"q heads \(4\) must be a multiple of k/v heads \(3\)"),
    (_bad(q=jnp.zeros((2, 8, 4, 8), jnp.int32)), r"q must be float32, bfloat16 or float16"),
    (_bad(k=jnp.zeros((2, 8, 2, 8), jnp.bfloat16)), r"q, k, v must share one dtype"),
    (_bad(sinks=jnp.zeros((2,))), r"sinks must have shape \[num_q_heads\] = \(4,\), got \(2,\)"),
    (_bad(q_segment_ids=jnp.zeros((2, 7), jnp.int32)), r"q_segment_ids must have shape \[batch, q_len\] = \(2, 8\), got \(2, 7\)"),
    (_bad(q_segment_ids=jnp.zeros((2, 8), jnp.float32)), r"q_segment_ids must have an integer dtype"),
    (_bad(q_segment_ids=jnp.zeros((2, 8), jnp.int32), kv_segment_ids=jnp.zeros((2, 9), jnp.int32)),
     r"kv_segment_ids must have shape \[batch, kv_len\] = \(2, 8\), got \(2, 9\)"),
    (_bad(kv_segment_ids=jnp.zeros((2, 8), jnp.int32)), r"q_segment_ids is required"),
    (_bad(scale=jnp.float32(0.5)), r"scale must be a Python float"),
    (_bad(logits_soft_cap=-1.0), r"logits_soft_cap must be a finite positive number, got -1.0"),
    (_bad(mask="causal"), r"mask must be an attn_jax.masks.Mask or None, got str"),
    (_bad(mask=masks.block_layout(np.ones((1, 1), bool), 4, 4)), r"does not cover q_len=8"),
    (_bad(config=attn_jax.XlaConfig(), implementation="reference"), r"reference backend takes no config"),
    (lambda: attn_jax.XlaConfig(block_q=0), r"XlaConfig.block_q must be a positive int"),
    (lambda: masks.sliding_window(-4), r"left must be >= 0, got -4"),
])
def test_bad_input_raises_clear_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_cross_segments_require_kv_segments():
  q, k, v, *_ = helpers.make_inputs(0, 1, 8, 9, 1, 1, 8, 8, jnp.float32)
  with pytest.raises(ValueError, match=r"kv_segment_ids is required for cross attention"):
    attn_jax.attention(q, k, v, q_segment_ids=jnp.zeros((1, 8), jnp.int32))


@st.composite
def _call(draw):
  leaves = st.one_of(
      st.just(masks.full()), st.just(masks.causal()),
      st.builds(masks.sliding_window, st.integers(0, 12), st.integers(0, 4)),
      st.builds(masks.sink_tokens, st.integers(0, 4)),
      st.builds(masks.chunked_causal, st.integers(1, 16)),
      st.builds(masks.prefix_lm, st.integers(0, 16)))
  mask = draw(st.recursive(leaves, lambda c: st.one_of(
      st.builds(lambda a, b: a & b, c, c), st.builds(lambda a, b: a | b, c, c), st.builds(lambda a: ~a, c)),
      max_leaves=3))
  hkv = draw(st.integers(1, 2))
  return dict(
      mask=mask, batch=draw(st.integers(1, 2)), q_len=draw(st.integers(1, 48)),
      kv_len=draw(st.integers(1, 48)), hkv=hkv, hq=hkv * draw(st.integers(1, 3)),
      d=draw(st.sampled_from([4, 8])), dv=draw(st.sampled_from([4, 12])),
      block_q=draw(st.sampled_from([8, 16])), block_kv=draw(st.sampled_from([8, 16])),
      sinks=draw(st.booleans()), cap=draw(st.sampled_from([None, 2.0])))


@hypothesis.given(c=_call())
@hypothesis.settings(max_examples=6)
def test_hypothesis_xla_matches_reference(c):
  inputs = helpers.make_inputs(0, c["batch"], c["q_len"], c["kv_len"], c["hq"], c["hkv"], c["d"],
                               c["dv"], jnp.float32)
  q, k, v, sinks, d_out, d_lse = inputs
  helpers.compare_backends("xla", attn_jax.XlaConfig(c["block_q"], c["block_kv"]), q, k, v,
                           sinks if c["sinks"] else None, d_out, d_lse, mask=c["mask"],
                           logits_soft_cap=c["cap"])
