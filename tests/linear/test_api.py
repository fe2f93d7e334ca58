"""Semantics of ``attn_jax.linear_attention`` checked against independent formulas: decoding steps,
segments, the non-causal form, feature maps, long bfloat16 sequences, and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import linear_feature_maps
from tests import tolerances
from tests.linear import helpers


@pytest.mark.parametrize("decay,normalize,hq,hkv,decay_heads", [
    ("none", True, 4, 2, None),
    ("fixed", False, 4, 2, 4),
    ("scalar", False, 2, 1, None),
    ("channel", True, 2, 2, None),
])
def test_decode_steps_equal_chunked_prefill(decay, normalize, hq, hkv, decay_heads):
  # Prefill 21 tokens in chunks of 8, then decode 6 more; both halves must match one chunked call
  # over all 27 tokens (outputs and final state).
  seq, split = 27, 21
  inputs, _, _ = helpers.make_inputs(3, 2, seq, hq, hkv, 8, 8, jnp.float32, decay=decay,
                                     decay_heads=decay_heads, normalize=normalize, initial_state=True)
  kw = dict(feature_map="elu_plus_one" if normalize else None, normalize=normalize)
  prefill = jax.jit(lambda i: attn_jax.linear_attention(**i, return_final_state=True, chunk_size=8, **kw))
  full_o, full_s = prefill(inputs)
  g = inputs["log_decay"]

  def part(x, lo, hi):
    if x is None or x.ndim == 1:
      return x
    return x[:, lo:hi]

  pre = {**inputs, **{n: part(inputs[n], 0, split) for n in ("q", "k", "v", "log_decay")}}
  o_pre, state = prefill(pre)

  @jax.jit
  def decode(state, q, k, v, g):
    def step(s, xs):
      return attn_jax.linear_attention_step(s, *xs, **kw)
    gs = None if g is None or g.ndim == 1 else g.swapaxes(0, 1)
    xs = (q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1))
    if gs is None:
      return jax.lax.scan(lambda s, x: step(s, (*x, g)), state, xs)
    return jax.lax.scan(step, state, xs + (gs,))

  state, o_dec = decode(state, *(part(inputs[n], split, seq) for n in ("q", "k", "v")), part(g, split, seq))
  o = jnp.concatenate([o_pre, o_dec.swapaxes(0, 1)], axis=1)
  tolerances.assert_close(o, full_o, jnp.float32, "out")
  tolerances.assert_close(state, full_s, jnp.float32, "state")


@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_segments_equal_separate_calls(decay):
  # Packing two documents with segment ids equals running them separately; the second document
  # starts from a zero state, the first from the initial state.
  inputs, _, _ = helpers.make_inputs(5, 1, 30, 2, 2, 8, 8, jnp.float32, decay=decay, initial_state=True)
  seg = jnp.concatenate([jnp.zeros(11, jnp.int32), jnp.ones(19, jnp.int32)])[None]
  run = jax.jit(lambda i, seg: attn_jax.linear_attention(**i, segment_ids=seg, chunk_size=8, return_final_state=True))
  packed, state = run(inputs, seg)
  cut = lambda lo, hi: {n: inputs[n][:, lo:hi] for n in ("q", "k", "v", "log_decay")}
  first, _ = run({**inputs, **cut(0, 11)}, None)
  second, state2 = run({**inputs, "initial_state": None, **cut(11, 30)}, None)
  tolerances.assert_close(packed, jnp.concatenate([first, second], 1), jnp.float32, "out")
  tolerances.assert_close(state, state2, jnp.float32, "state")


def _non_causal_oracle(q, k, v, s0, seg, normalize):
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  kr = jnp.repeat(k, hq // hkv, axis=2)
  vr = jnp.repeat(v, hq // hkv, axis=2)
  if normalize:
    vr = jnp.concatenate([vr, jnp.ones(vr.shape[:3] + (1,))], -1)
  scores = jnp.einsum("bihd,bjhd->bhij", q, kr, precision="highest")
  first = jnp.ones((b, t), bool)
  if seg is not None:
    scores = jnp.where((seg[:, :, None] == seg[:, None, :])[:, None], scores, 0.0)
    first = seg == seg[:, :1]
  o = jnp.einsum("bhij,bjhv->bihv", scores, vr, precision="highest")
  s0r = jnp.repeat(s0, hq // hkv, axis=1)
  o = o + first[:, :, None, None] * jnp.einsum("bihd,bhdv->bihv", q, s0r, precision="highest")
  if normalize:
    o = o[..., :-1] / (o[..., -1:] + 1e-6)
  return o


@pytest.mark.parametrize("segments,normalize", [(False, True), (True, False)])
def test_non_causal(segments, normalize):
  inputs, d_out, _ = helpers.make_inputs(7, 2, 26, 4, 2, 8, 8, jnp.float32, normalize=normalize,
                                         initial_state=True)
  q, k, v, s0 = (inputs[n] for n in ("q", "k", "v", "initial_state"))
  fmap = "elu_plus_one"
  seg = jnp.asarray(np.repeat([[0, 1, 2], [4, 4, 5]], [9, 9, 8], axis=1)) if segments else None

  def loss(impl, q, k, v, s0):
    if impl == "oracle":
      o = _non_causal_oracle(linear_feature_maps.elu_plus_one(q), linear_feature_maps.elu_plus_one(k), v,
                             s0, seg, normalize)
    else:
      o = attn_jax.linear_attention(q, k, v, causal=False, feature_map=fmap, normalize=normalize,
                                    initial_state=s0, segment_ids=seg, implementation=impl, chunk_size=8)
    return (o * d_out).sum(), o

  grads = lambda impl: jax.jit(jax.value_and_grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2, 3), has_aux=True))
  want = grads("oracle")(q, k, v, s0)
  got = grads("xla")(q, k, v, s0)
  tolerances.assert_close(got[0][1], want[0][1], jnp.float32, "out")
  for name, a, b in zip(("dq", "dk", "dv", "ds0"), got[1], want[1]):
    tolerances.assert_close(a, b, jnp.float32, name)


def test_non_causal_cross_lengths():
  inputs, _, _ = helpers.make_inputs(8, 1, 12, 2, 2, 8, 8, jnp.float32)
  rng = np.random.default_rng(0)
  k = jnp.asarray(rng.standard_normal((1, 20, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((1, 20, 2, 8)), jnp.float32)
  o = attn_jax.linear_attention(inputs["q"], k, v, causal=False)
  want = jnp.einsum("bihd,bjhd,bjhv->bihv", inputs["q"], k, v, precision="highest")
  tolerances.assert_close(o, want, jnp.float32, "out")


def test_taylor_feature_map_approximates_exp():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((5, 16)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((7, 16)), jnp.float32)
  fx, fy = jax.jit(linear_feature_maps.taylor)(x), jax.jit(linear_feature_maps.taylor)(y)
  assert fx.shape == (5, 273)
  s = x @ y.T / 4.0
  np.testing.assert_allclose(fx @ fy.T, 1 + s + s * s / 2, rtol=1e-5, atol=1e-5)


def test_feature_maps_and_user_callable():
  inputs, _, _ = helpers.make_inputs(9, 1, 10, 2, 2, 4, 4, jnp.float32)
  q, k, v = inputs["q"], inputs["k"], inputs["v"]
  run = jax.jit(attn_jax.linear_attention, static_argnames=("feature_map", "scale", "implementation"))
  for name, fn in (("relu", jax.nn.relu), ("elu_plus_one", lambda x: jax.nn.elu(x) + 1)):
    got = run(q, k, v, feature_map=name, scale=0.5)
    want = run(fn(q), fn(k), v, scale=0.5)
    tolerances.assert_close(got, want, jnp.float32, name)
  square = lambda x: jnp.concatenate([x, x * x], -1)
  got = run(q, k, v, feature_map=square, implementation="reference")
  causal = jnp.einsum("bihf,bjhf->bhij", square(q), square(k), precision="highest") * jnp.tril(jnp.ones((10, 10)))
  want = jnp.einsum("bhij,bjhv->bihv", causal, v, precision="highest")
  tolerances.assert_close(got, want, jnp.float32, "callable")


def test_bfloat16_16k_tokens_matches_float32():
  # Data-dependent decay, GQA and the normaliser: the bf16 chunked output must stay within the
  # bf16 tolerance of the float32 reference at 16k tokens (the state is float32 throughout).
  inputs, _, _ = helpers.make_inputs(11, 1, 16384, 2, 1, 16, 16, jnp.float32, decay="scalar")
  inputs["log_decay"] = inputs["log_decay"] * 0.05  # Long memory, so that the state sums many tokens.
  kw = dict(feature_map="elu_plus_one", normalize=True, return_final_state=True)
  want_o, want_s = jax.jit(lambda i: attn_jax.linear_attention(**i, implementation="reference", **kw))(inputs)
  low = {**inputs, **{n: inputs[n].astype(jnp.bfloat16) for n in ("q", "k", "v")}}
  got_o, got_s = jax.jit(lambda i: attn_jax.linear_attention(**i, implementation="xla", **kw))(low)
  assert got_o.dtype == jnp.bfloat16
  tolerances.assert_close(got_o, want_o, jnp.bfloat16, "out")
  tolerances.assert_close(got_s, want_s, jnp.bfloat16, "state")


def _args(**over):
  q = jnp.zeros((2, 8, 4, 4))
  kv = jnp.zeros((2, 8, 2, 4))
  base = dict(q=q, k=kv, v=kv)
  base.update(over)
  return base


@pytest.mark.parametrize("over,match", [
    (dict(q=jnp.zeros((2, 8, 4))), r"q must have shape \[batch, seq, heads, head_dim\], got shape \(2, 8, 4\)"),
    (dict(q=jnp.zeros((2, 8, 4, 4), jnp.int32)), "q must be float32, bfloat16 or float16, got dtype int32"),
    (dict(k=jnp.zeros((2, 8, 3, 4)), v=jnp.zeros((2, 8, 3, 4))), r"q heads \(4\) must be a multiple of k/v heads \(3\)"),
    (dict(k=jnp.zeros((2, 9, 2, 4)), v=jnp.zeros((2, 9, 2, 4))), "causal linear attention needs equal q and k/v lengths"),
    (dict(log_decay=jnp.zeros((3,))), r"log_decay must have 2 \(k/v\) or 4 \(query\) heads, got shape \(3,\)"),
    (dict(log_decay=jnp.zeros((2, 8, 2, 5))), r"log_decay \[batch, seq, heads, features\] must be \(2, 8, Hd, 4\)"),
    (dict(log_decay=jnp.zeros((2, 8))), r"log_decay must have shape \[heads\], \[batch, seq, heads\]"),
    (dict(log_decay=jnp.zeros((2,)), causal=False), "log_decay requires causal=True"),
    (dict(initial_state=jnp.zeros((2, 2, 4, 5))), r"initial_state must have shape .* = \(2, 2, 4, 4\), got \(2, 2, 4, 5\)"),
    (dict(initial_state=jnp.zeros((2, 2, 4, 4)), normalize=True), r"initial_state must have shape \[batch, state_heads, features, value_dim \+ 1\]"),
    (dict(segment_ids=jnp.zeros((2, 7), jnp.int32)), r"segment_ids must have shape \[batch, seq\] = \(2, 8\)"),
    (dict(segment_ids=jnp.zeros((2, 8))), "segment_ids must have an integer dtype"),
    (dict(feature_map="softmax"), "feature_map must be one of"),
    (dict(feature_map=lambda x: x.sum(-1)), "feature_map must map q"),
    (dict(chunk_size=0), "chunk_size must be a positive int or None, got 0"),
    (dict(scale=jnp.float32(1.0)), "scale must be a Python float"),
    (dict(implementation="cuda"), "implementation must be one of"),
])
def test_bad_arguments_raise_value_error(over, match):
  with pytest.raises(ValueError, match=match):
    attn_jax.linear_attention(**_args(**over))


def test_step_bad_arguments():
  q, kv = jnp.zeros((2, 4, 4)), jnp.zeros((2, 2, 4))
  with pytest.raises(ValueError, match=r"state must have shape \(2, 2, 4, 4\)"):
    attn_jax.linear_attention_step(jnp.zeros((2, 2, 4, 3)), q, kv, kv)
  with pytest.raises(ValueError, match=r"log_decay must have shape \(2,\), \(2, 2\) or \(2, 2, 4\)"):
    attn_jax.linear_attention_step(jnp.zeros((2, 2, 4, 4)), q, kv, kv, jnp.zeros((3,)))
