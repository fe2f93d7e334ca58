"""Selective attention, MoH, RCMHA, Compressed Convolutional Attention and Local Linear
Attention: each fast form (folded into attn_jax.attention) against its materialised oracle,
values and gradients, plus the properties their papers state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import masks
from attn_jax.mechanisms import compressed_conv, local_linear, moh, rcmha, selective
from tests import tolerances
from tests.mechanisms.helpers import check_grads, normal

# Small tiles so that a causal mask over 37 tokens has full, partial and empty tiles.
XLA = dict(implementation="xla", config=attn_jax.XlaConfig(block_q=8, block_kv=8))


def _qkv(seed, b=1, tq=37, tk=37, hq=4, hkv=2, d=8, dv=8):
  return normal(seed, b, tq, hq, d), normal(seed + 1, b, tk, hkv, d), normal(seed + 2, b, tk, hkv, dv)


def test_selective_attention_matches_reference():
  q, k, v = _qkv(0)
  tau = jnp.exp(0.5 * normal(5, 1, 37, 4))
  nu = jax.nn.sigmoid(normal(6, 1, 37, 2))
  mask = masks.causal()
  check_grads(lambda q, k, v, t, n: selective.selective_attention(q, k, v, t, value_temperature=n, mask=mask, **XLA),
              lambda q, k, v, t, n: selective.selective_attention_reference(q, k, v, t, value_temperature=n, mask=mask),
              (q, k, v, tau, nu), ("dq", "dk", "dv", "dtau", "dnu"))


def test_selective_attention_pallas_bfloat16():
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(1, tq=40, tk=40))
  tau = 1.0 + jax.nn.softplus(normal(7, 1, 40, 4))
  out = selective.selective_attention(q, k, v, tau, mask=masks.sliding_window(9), implementation="pallas_tpu",
                                      config=attn_jax.PallasTpuConfig(block_q=16, block_kv=16))
  want = selective.selective_attention_reference(q, k, v, tau, mask=masks.sliding_window(9))
  tolerances.assert_close(out, want, jnp.bfloat16, "out")


def test_selective_temperature():
  logits = normal(0, 2, 6, 3)
  tau = selective.selective_temperature(logits, jnp.arange(6), jnp.asarray([0.0, 0.5, 2.0]))
  expected = np.tanh(logits) + 1 + np.asarray([0.0, 0.5, 2.0]) * np.log1p(np.arange(6))[None, :, None]
  np.testing.assert_allclose(tau, expected, rtol=1e-5)
  assert (tau > 0).all()
  # tau = 1 is plain attention.
  q, k, v = _qkv(2, tq=9, tk=9)
  ones = selective.selective_temperature(jnp.zeros((1, 9, 4)), jnp.zeros(9), jnp.zeros(4))
  tolerances.assert_close(selective.selective_attention(q, k, v, ones, mask=masks.causal()),
                          attn_jax.attention(q, k, v, mask=masks.causal()), jnp.float32)


def test_moh_gates():
  b, t, hr, hs, top_k = 2, 50, 6, 2, 2
  routed, shared, mix = normal(0, b, t, hr), normal(1, b, t, hs), normal(2, b, t, 2)
  gates_fn = jax.jit(moh.moh_gates, static_argnums=1)
  g = gates_fn(routed, top_k, shared_logits=shared, mix_logits=mix)
  assert g.gates.shape == (b, t, hs + hr)
  np.testing.assert_array_equal(g.selected.sum(-1), top_k)
  np.testing.assert_array_equal(g.gates[..., hs:] > 0, g.selected)
  # Eq. 5: a_1 softmax(shared) + a_2 softmax(routed) restricted to the top-k.
  alpha = jax.nn.softmax(mix)
  np.testing.assert_allclose(g.gates[..., :hs], alpha[..., :1] * jax.nn.softmax(shared), rtol=1e-6)
  np.testing.assert_allclose(g.gates[..., hs:], alpha[..., 1:] * jnp.where(g.selected, jax.nn.softmax(routed), 0),
                             rtol=1e-6)
  # Eq. 6: sum_i f_i P_i.
  f = np.asarray(g.selected).mean((0, 1))
  p = np.asarray(jax.nn.softmax(routed)).mean((0, 1))
  np.testing.assert_allclose(g.load_balance_loss, (f * p).sum(), rtol=1e-6)
  # Balanced routing gives k / Hr; the loss trains the router through P.
  prefer = jnp.asarray([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]], jnp.float32)[None]
  balanced = gates_fn(1e-3 * prefer, 2)
  np.testing.assert_allclose(balanced.load_balance_loss, 2 / 4, rtol=1e-2)
  collapsed = gates_fn(jnp.broadcast_to(8.0 * prefer[:, 2:3], (1, 4, 4)), 2)
  assert float(collapsed.load_balance_loss) > 0.95
  grad = jax.jit(jax.grad(lambda r: moh.moh_gates(r, top_k).load_balance_loss))(routed)
  assert np.abs(np.asarray(grad)).max() > 0
  # Padding tokens do not count.
  valid = jnp.arange(t)[None].repeat(b, 0) < 30
  g30 = gates_fn(routed[:, :30], top_k)
  np.testing.assert_allclose(gates_fn(routed, top_k, valid=valid).load_balance_loss, g30.load_balance_loss,
                             rtol=1e-6)


def test_moh_attention_matches_reference():
  q, k, v = _qkv(3)
  gates = moh.moh_gates(normal(9, 1, 37, 3), 2, shared_logits=normal(10, 1, 37, 1),
                        mix_logits=normal(11, 1, 37, 2)).gates
  check_grads(lambda q, k, v, g: moh.moh_attention(q, k, v, g, mask=masks.causal(), **XLA),
              lambda q, k, v, g: moh.moh_attention_reference(q, k, v, g, mask=masks.causal()),
              (q, k, v, gates), ("dq", "dk", "dv", "dgates"))


def _relative_params(seed, hq=4, d=8, f=6):
  return 0.5 * normal(seed, hq, 2 * f, d), normal(seed + 1, hq, d), normal(seed + 2, hq, d)


def test_relative_attention_matches_materialised_relative_embeddings():
  q, k, v = _qkv(4)
  rel, u, w = _relative_params(20)
  check_grads(lambda q, k, v, r, u, w: rcmha.relative_attention(q, k, v, r, u, w, mask=masks.causal(), **XLA),
              lambda q, k, v, r, u, w: rcmha.relative_attention_reference(q, k, v, r, u, w, mask=masks.causal()),
              (q, k, v, rel, u, w), ("dq", "dk", "dv", "drel", "du", "dw"))


def test_relative_attention_decoding_offset_and_translation_invariance():
  q, k, v = _qkv(5, tq=3, tk=30)
  rel, u, w = _relative_params(21)
  rel_fn = jax.jit(rcmha.relative_attention, static_argnames=("mask", "query_offset"))
  got = rel_fn(q, k, v, rel, u, w, mask=masks.causal())
  tolerances.assert_close(got, jax.jit(rcmha.relative_attention_reference, static_argnames="mask")(
                              q, k, v, rel, u, w, mask=masks.causal()),
                          jnp.float32, "decode")
  # Only distances matter: shifting every position by 7 changes nothing.
  shifted = rel_fn(q, k[:, 7:], v[:, 7:], rel, u, w, mask=masks.causal(), query_offset=20)
  tolerances.assert_close(shifted, rel_fn(q, k[:, 7:], v[:, 7:], rel, u, w, mask=masks.causal()),
                          jnp.float32, "offset")


def test_rcmha_matches_reference():
  q, k, v = _qkv(6, tq=21, tk=21)
  rel, u, w = _relative_params(22)
  convs = (normal(30, 3, 32), normal(31, 3, 16), normal(32, 3, 16))
  fast = lambda q, k, v, cq, ck, cv, r: rcmha.rcmha_attention(q, k, v, cq, ck, cv, r, u, w, **XLA)  # noqa: E731
  slow = lambda q, k, v, cq, ck, cv, r: rcmha.rcmha_attention(q, k, v, cq, ck, cv, r, u, w, reference=True)  # noqa: E731
  check_grads(fast, slow, (q, k, v) + convs + (rel,), ("dq", "dk", "dv", "dconv_q", "dconv_k", "dconv_v", "drel"))


def _rope(q, k):
  t, d = q.shape[1], q.shape[3]
  ang = jnp.arange(t)[:, None] * (1.0 / 100 ** (jnp.arange(d // 2) / (d // 2)))[None]
  cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]

  def rot(x):
    a, b = x[..., : d // 2], x[..., d // 2:]
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], -1)

  return rot(q), rot(k)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["cca", "ccgqa"])
def test_compressed_conv_attention_matches_reference(heads):
  hq, hkv = heads
  q, k, v = _qkv(7, hq=hq, hkv=hkv)
  convs = (0.5 * normal(40, 4, hq * 8), 0.5 * normal(41, 4, hkv * 8), 0.3 * normal(42, 2, hq, 8, 8),
           0.3 * normal(43, 2, hkv, 8, 8))
  temp = jnp.linspace(2.0, 8.0, hq)
  mask = masks.causal()
  fast = lambda q, k, v, *c: compressed_conv.compressed_conv_attention(q, k, v, *c, mask=mask, rope=_rope, **XLA)  # noqa: E731
  slow = lambda q, k, v, *c: compressed_conv.compressed_conv_attention(q, k, v, *c, mask=mask, rope=_rope,  # noqa: E731
                                                                        reference=True)
  check_grads(fast, slow, (q, k, v) + convs + (temp,), ("dq", "dk", "dv", "dconv1_q", "dconv1_k", "dconv2_q",
                                                        "dconv2_k", "dtemp"))


def test_compressed_conv_attention_is_causal_and_value_shift():
  q, k, v = _qkv(8, tq=16, tk=16, hq=2, hkv=2)
  convs = (normal(1, 3, 16), normal(2, 3, 16), normal(3, 2, 2, 8, 8), normal(4, 2, 2, 8, 8))
  f = lambda q, k: compressed_conv.compressed_conv_attention(q, k, v, *convs, jnp.ones(2), mask=masks.causal())  # noqa: E731
  base = f(q, k)
  moved = f(q.at[:, 9].add(1.0), k.at[:, 9].add(1.0))
  np.testing.assert_array_equal(base[:, :9], moved[:, :9])
  assert np.abs(np.asarray(moved[:, 9:] - base[:, 9:])).max() > 1e-3
  a, b = normal(5, 1, 4, 4, 2), normal(6, 1, 4, 4, 2)
  s = compressed_conv.value_shift(a, b)
  np.testing.assert_array_equal(s[:, :, :2], a[:, :, :2])
  np.testing.assert_array_equal(s[:, 1:, 2:], b[:, :-1, 2:])
  np.testing.assert_array_equal(s[:, 0, 2:], 0)


def test_local_linear_attention_matches_weighted_regression():
  q, k, v = _qkv(9, tq=29, tk=29, d=4, dv=3)
  mask = masks.causal()
  check_grads(lambda q, k, v: local_linear.local_linear_attention(q, k, v, ridge=0.3, mask=mask, **XLA),
              lambda q, k, v: local_linear.local_linear_attention_reference(q, k, v, ridge=0.3, mask=mask),
              (q, k, v), ("dq", "dk", "dv"), factor=30.0)


def test_local_linear_attention_properties():
  q, k, _ = _qkv(10, tq=24, tk=24, hq=2, hkv=2, d=3)
  # An exactly linear map v = A k + c is recovered at the query (a local constant fit, softmax
  # attention, is biased there), once a query has seen enough keys to pin the fit down.
  a_map, c = normal(11, 3, 2), normal(12, 2)
  v = jnp.einsum("bthd,de->bthe", k, a_map) + c
  lla_fn = jax.jit(local_linear.local_linear_attention, static_argnames=("ridge", "mask"))
  lla = lla_fn(q, k, v, ridge=1e-6, mask=masks.causal())
  exact = jnp.einsum("bthd,de->bthe", q, a_map) + c
  np.testing.assert_allclose(lla[:, 8:], exact[:, 8:], atol=2e-3)
  soft = jax.jit(attn_jax.attention, static_argnames="mask")(q, k, v, mask=masks.causal())
  assert np.abs(np.asarray(soft - exact))[:, 8:].mean() > 0.1
  # A huge ridge switches the linear correction off: softmax attention.
  tolerances.assert_close(lla_fn(q, k, v, ridge=1e9, mask=masks.causal()), soft,
                          jnp.float32, "ridge", factor=5.0)
  # Rows that see no key return 0.
  out = lla_fn(q[:, :4], k[:, :2], v[:, :2], mask=masks.causal())
  np.testing.assert_array_equal(out[:, :2], 0)


@pytest.mark.parametrize("call,match", [
    (lambda: selective.selective_attention(*_qkv(0, tq=5, tk=5), jnp.ones((1, 5, 3))), "query_temperature must have shape"),
    (lambda: selective.selective_attention(*_qkv(0, tq=5, tk=5), jnp.ones((1, 5, 4)),
                                           value_temperature=jnp.ones((1, 5, 4))), "value_temperature must have shape"),
    (lambda: selective.selective_temperature(jnp.ones((1, 5, 2)), jnp.arange(4), jnp.ones(2)), "positions must have"),
    (lambda: moh.moh_gates(jnp.ones((1, 5, 4)), 5), r"top_k must be an int in \[1, 4\]"),
    (lambda: moh.moh_gates(jnp.ones((1, 5, 4)), 2, shared_logits=jnp.ones((1, 5, 1))), "mix_logits must have shape"),
    (lambda: moh.moh_attention(*_qkv(0, tq=5, tk=5), jnp.ones((1, 5, 2))), "gates must have shape"),
    (lambda: rcmha.relative_attention(*_qkv(0, tq=5, tk=5), jnp.ones((4, 5, 8)), jnp.ones((4, 8)), jnp.ones((4, 8))),
     "rel_proj must have shape"),
    (lambda: rcmha.relative_attention(*_qkv(0, tq=5, tk=5), jnp.ones((4, 6, 8)), jnp.ones((2, 8)), jnp.ones((4, 8))),
     "u must have shape"),
    (lambda: rcmha.relative_frequencies(0), "num_features must be a positive int"),
    (lambda: rcmha.relative_attention(*_qkv(0, tq=5, tk=5), *_relative_params(0), query_offset=1.5),
     "query_offset must be a Python int"),
    (lambda: compressed_conv.compressed_conv_attention(*_qkv(0, tq=5, tk=5), jnp.ones((3, 8)), jnp.ones((3, 16)),
                                                       jnp.ones((2, 4, 8, 8)), jnp.ones((2, 2, 8, 8)), jnp.ones(4)),
     "conv1_q must have shape"),
    (lambda: compressed_conv.compressed_conv_attention(*_qkv(0, tq=5, tk=5), jnp.ones((3, 32)), jnp.ones((3, 16)),
                                                       jnp.ones((2, 4, 8, 8)), jnp.ones((2, 2, 8, 8)), jnp.ones(2)),
     "temperature must have shape"),
    (lambda: local_linear.local_linear_attention(*_qkv(0, tq=5, tk=5), ridge=0.0), "ridge must be a positive float"),
    (lambda: local_linear.local_linear_attention(normal(0, 1, 5, 4), normal(0, 1, 5, 3, 4), normal(0, 1, 5, 3, 4)),
     "must have shape"),
])
def test_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_bfloat16_inputs():
  # bfloat16 in, bfloat16 out, within bfloat16 tolerance of the float32 oracle on the same inputs.
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(11, tq=21, tk=21, d=8))
  f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]  # noqa: E731
  mask = masks.causal()
  gates = jax.nn.softmax(normal(12, 1, 21, 4))
  rel, u, w = _relative_params(23)
  convs = (0.5 * normal(40, 4, 32), 0.5 * normal(41, 4, 16), 0.3 * normal(42, 2, 4, 8, 8), 0.3 * normal(43, 2, 2, 8, 8))
  cases = {
      "moh": (lambda q, k, v: moh.moh_attention(q, k, v, gates, mask=mask),
              lambda q, k, v: moh.moh_attention_reference(q, k, v, gates, mask=mask)),
      "relative": (lambda q, k, v: rcmha.relative_attention(q, k, v, rel, u, w, mask=mask),
                   lambda q, k, v: rcmha.relative_attention_reference(q, k, v, rel, u, w, mask=mask)),
      "cca": (lambda q, k, v: compressed_conv.compressed_conv_attention(q, k, v, *convs, jnp.full(4, 4.0), mask=mask),
              lambda q, k, v: compressed_conv.compressed_conv_attention(q, k, v, *convs, jnp.full(4, 4.0), mask=mask,
                                                                         reference=True)),
      "lla": (lambda q, k, v: local_linear.local_linear_attention(q, k, v, mask=mask),
              lambda q, k, v: local_linear.local_linear_attention_reference(q, k, v, mask=mask)),
  }
  for name, (fast, slow) in cases.items():
    out = jax.jit(fast)(q, k, v)
    assert out.dtype == jnp.bfloat16, name
    tolerances.assert_close(out, jax.jit(slow)(*f32(q, k, v)), jnp.bfloat16, name, factor=2.0)
