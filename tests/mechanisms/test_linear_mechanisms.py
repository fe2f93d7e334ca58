"""Each named linear-attention mechanism against a straightforward quadratic formula of its paper."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import mechanisms
from tests import tolerances
from tests.mechanisms.helpers import check_grads as _check_grads
from tests.mechanisms.helpers import normal as _normal

HI = "highest"


def _causal(t):
  return jnp.tril(jnp.ones((t, t), bool))


@pytest.mark.parametrize("version", [1, 2])
def test_lightning_attention(version):
  b, t, h, d = 1, 40, 4, 8
  q, k, v = _normal(0, b, t, h, d), _normal(1, b, t, h, d), _normal(2, b, t, h, d)
  slopes = mechanisms.lightning_slopes(h, layer_index=1, num_layers=4)

  def oracle(q, k, v):
    dist = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
    decay = jnp.where(_causal(t), jnp.exp(-slopes[:, None, None] * jnp.maximum(dist, 0)), 0.0)  # [H, T, T]
    s = jnp.einsum("bihd,bjhd->bhij", q, k, precision=HI) * decay
    return jnp.einsum("bhij,bjhd->bihd", s, v, precision=HI)

  fast = lambda q, k, v: mechanisms.lightning_attention(q, k, v, slopes, version=version, chunk_size=None
                                                        if version == 1 else 16)
  _check_grads(fast, oracle, (q, k, v), ("dq", "dk", "dv"))


def test_lightning_slopes_follow_alibi():
  np.testing.assert_allclose(mechanisms.lightning_slopes(8), 2.0 ** -np.arange(1, 9))
  # Non-powers of two: the 4-head slopes, then every other slope of the 8-head ones.
  np.testing.assert_allclose(mechanisms.lightning_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])
  assert np.all(mechanisms.lightning_slopes(4, layer_index=3, num_layers=4) < 1e-4)


def test_based_linear_attention_is_taylor_softmax():
  b, t, h, d = 1, 30, 2, 4
  q, k, v = _normal(3, b, t, h, d), _normal(4, b, t, h, d), _normal(5, b, t, h, 6)

  def oracle(q, k, v):
    s = jnp.einsum("bihd,bjhd->bhij", q, k, precision=HI) / math.sqrt(d)
    w = jnp.where(_causal(t), 1 + s + s * s / 2, 0.0)
    return jnp.einsum("bhij,bjhd->bihd", w / w.sum(-1, keepdims=True), v, precision=HI)

  fast = lambda q, k, v: mechanisms.based_linear_attention(q, k, v, chunk_size=8)
  _check_grads(fast, oracle, (q, k, v), ("dq", "dk", "dv"))


def test_jrt_prefix_linear_attention():
  b, t, m, h, d = 1, 24, 10, 2, 4
  q, k, v = _normal(6, b, t, h, d), _normal(7, b, t, h, d), _normal(8, b, t, h, d)
  ke, ve = _normal(9, b, m, h, d), _normal(10, b, m, h, d)
  phi = lambda x: jax.nn.elu(x) + 1

  def oracle(q, k, v, ke, ve):
    s = jnp.where(_causal(t), jnp.einsum("bihd,bjhd->bhij", phi(q), phi(k), precision=HI), 0.0)
    se = jnp.einsum("bihd,bjhd->bhij", phi(q), phi(ke), precision=HI)  # every query reads the whole prefix
    num = jnp.einsum("bhij,bjhd->bihd", s, v, precision=HI) + jnp.einsum("bhij,bjhd->bihd", se, ve, precision=HI)
    den = (s.sum(-1) + se.sum(-1)).transpose(0, 2, 1)[..., None]
    return num / den

  fast = lambda q, k, v, ke, ve: mechanisms.jrt_prefix_linear_attention(q, k, v, ke, ve, feature_map="elu_plus_one",
                                                                          chunk_size=8)
  _check_grads(fast, oracle, (q, k, v, ke, ve), ("dq", "dk", "dv", "dk_prefix", "dv_prefix"))


def test_retention():
  b, t, h, d = 2, 33, 3, 8
  q, k, v = _normal(11, b, t, h, d), _normal(12, b, t, h, d), _normal(13, b, t, h, d)
  gammas = mechanisms.retnet_decays(h)
  np.testing.assert_allclose(gammas, [1 - 2 ** -5, 1 - 2 ** -6, 1 - 2 ** -7])

  def oracle(q, k, v):
    dist = jnp.maximum(jnp.arange(t)[:, None] - jnp.arange(t)[None, :], 0)
    decay = jnp.where(_causal(t), jnp.asarray(gammas)[:, None, None] ** dist, 0.0)
    s = jnp.einsum("bihd,bjhd->bhij", q, k, precision=HI) / math.sqrt(d) * decay
    return jnp.einsum("bhij,bjhd->bihd", s, v, precision=HI)

  _check_grads(lambda q, k, v: mechanisms.retention(q, k, v, chunk_size=16), oracle, (q, k, v), ("dq", "dk", "dv"))


def test_lightnet_causal_matches_softmax_normalised_keys():
  b, t, h, d = 1, 28, 2, 4
  q, k, v = _normal(14, b, t, h, d), 2 * _normal(15, b, t, h, d), _normal(16, b, t, h, 5)

  def oracle(q, k, v):
    # w[t, j, d] = exp(k_jd) / sum_{i <= t} exp(k_id) for j <= t.
    logits = jnp.where(_causal(t)[None, :, :, None, None], k[:, None, :, :, :], -jnp.inf)  # [B, T, J, H, D]
    w = jax.nn.softmax(logits, axis=2)
    return jnp.einsum("bthd,btjhd,bjhv->bthv", q, w, v, precision=HI)

  _check_grads(lambda q, k, v: mechanisms.lightnet_attention(q, k, v, chunk_size=8), oracle, (q, k, v),
               ("dq", "dk", "dv"))


def test_lightnet_non_causal_2d_is_one_global_sum():
  b, hh, ww, h, d = 1, 5, 6, 2, 4
  q, k, v = _normal(17, b, hh, ww, h, d), _normal(18, b, hh, ww, h, d), _normal(19, b, hh, ww, h, d)
  got = jax.jit(lambda q, k, v: mechanisms.lightnet_attention(q, k, v, causal=False))(q, k, v)
  kf = k.reshape(b, hh * ww, h, d)
  w = jax.nn.softmax(kf, axis=1)
  want = jnp.einsum("bthd,bjhd,bjhv->bthv", q.reshape(b, -1, h, d), w, v.reshape(b, -1, h, d), precision=HI)
  assert got.shape == (b, hh, ww, h, d)
  tolerances.assert_close(got, want.reshape(got.shape), jnp.float32, "out")


def test_aaren_is_causal_softmax_of_a_learned_query_and_decodes_in_o1():
  b, t, h, d = 2, 37, 3, 8
  query, k, v = _normal(20, h, d), 3 * _normal(21, b, t, h, d), _normal(22, b, t, h, 5)

  def oracle(query, k, v):
    qb = jnp.broadcast_to(query, (b, t, h, d))
    return attn_jax.attention(qb, k, v, mask=attn_jax.masks.causal(), implementation="reference")

  _check_grads(mechanisms.aaren, oracle, (query, k, v), ("dquery", "dk", "dv"))

  @jax.jit
  def decode(k, v):
    def step(state, kv):
      return mechanisms.aaren_step(state, query, *kv)
    _, o = jax.lax.scan(step, mechanisms.aaren_init_state(b, h, 5), (k.swapaxes(0, 1), v.swapaxes(0, 1)))
    return o.swapaxes(0, 1)

  tolerances.assert_close(decode(k, v), jax.jit(mechanisms.aaren)(query, k, v), jnp.float32, "decode")


def test_short_conv_is_causal_depthwise_convolution():
  x, w = _normal(23, 2, 9, 3), _normal(24, 4, 3)
  got = mechanisms.short_conv(x, w)
  xn, wn = np.asarray(x), np.asarray(w)
  want = np.zeros_like(xn)
  for t in range(9):
    for i in range(4):
      src = t - 3 + i
      if src >= 0:
        want[:, t] += xn[:, src] * wn[i]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mechanism_argument_errors():
  x = jnp.zeros((1, 8, 2, 4))
  with pytest.raises(ValueError, match="version must be 1 or 2"):
    mechanisms.lightning_attention(x, x, x, mechanisms.lightning_slopes(2), version=3)
  with pytest.raises(ValueError, match=r"aaren expects query \[H, D\]"):
    mechanisms.aaren(jnp.zeros((3, 4)), x, x)
  with pytest.raises(ValueError, match="causal lightnet_attention needs"):
    mechanisms.lightnet_attention(jnp.zeros((1, 2, 4, 2, 4)), jnp.zeros((1, 2, 4, 2, 4)), jnp.zeros((1, 2, 4, 2, 4)))
  with pytest.raises(ValueError, match="must not be longer than the sequence"):
    mechanisms.jrt_prefix_linear_attention(x, x, x, jnp.zeros((1, 9, 2, 4)), jnp.zeros((1, 9, 2, 4)))


def _steps(step, state, *xs):
  """``step`` over the token axis (1) of ``xs`` from ``state``: the outputs ``[B, T, ...]``."""
  def body(state, x_t):
    return step(state, *x_t)
  _, o = jax.lax.scan(body, state, tuple(x.swapaxes(0, 1) for x in xs))
  return o.swapaxes(0, 1)


def test_final_states_continue_the_sequence():
  """aaren / lightnet_attention with return_final_state, then their step functions, equal the full
  call on the longer sequence (the decoding path of their mixers)."""
  b, t, p, h, d = 2, 13, 9, 2, 4
  query, k, v = _normal(30, h, d), _normal(31, b, t, h, d), _normal(32, b, t, h, 3)
  q = _normal(33, b, t, h, d)

  @jax.jit
  def aaren_split(k, v):
    o, state = mechanisms.aaren(query, k[:, :p], v[:, :p], return_final_state=True)
    rest = _steps(lambda s, k_t, v_t: mechanisms.aaren_step(s, query, k_t, v_t), state, k[:, p:], v[:, p:])
    return jnp.concatenate([o, rest], axis=1)

  tolerances.assert_close(aaren_split(k, v), jax.jit(mechanisms.aaren)(query, k, v), jnp.float32, "aaren")

  @jax.jit
  def lightnet_split(q, k, v):
    o, state = mechanisms.lightnet_attention(q[:, :p], k[:, :p], v[:, :p], chunk_size=4, return_final_state=True)
    rest = _steps(mechanisms.lightnet_step, state, q[:, p:], k[:, p:], v[:, p:])
    # From the empty state (Z = -inf) the steps alone also give the whole sequence.
    alone = _steps(mechanisms.lightnet_step, mechanisms.lightnet_init_state(b, h, d, 3), q, k, v)
    return jnp.concatenate([o, rest], axis=1), alone

  full = jax.jit(lambda q, k, v: mechanisms.lightnet_attention(q, k, v, chunk_size=4))(q, k, v)
  split, alone = lightnet_split(q, k, v)
  tolerances.assert_close(split, full, jnp.float32, "lightnet prefill + steps")
  tolerances.assert_close(alone, full, jnp.float32, "lightnet steps from empty")
  with pytest.raises(ValueError, match="return_final_state needs causal=True"):
    mechanisms.lightnet_attention(q, k, v, causal=False, return_final_state=True)


def test_short_conv_history_and_segments():
  x, w = _normal(34, 2, 9, 3), _normal(35, 4, 3)
  whole = jax.jit(mechanisms.short_conv)(x, w)
  # Continuing from the last W - 1 inputs (decoding) equals the convolution of the whole sequence.
  tolerances.assert_close(mechanisms.short_conv(x[:, 5:], w, history=x[:, 2:5]), whole[:, 5:], jnp.float32,
                          "history")
  # Packed documents: the second document's outputs equal convolving it alone.
  seg = jnp.broadcast_to((jnp.arange(9) >= 4).astype(jnp.int32), (2, 9))
  packed = mechanisms.short_conv(x, w, segment_ids=seg)
  tolerances.assert_close(packed[:, 4:], mechanisms.short_conv(x[:, 4:], w), jnp.float32, "segments")
  tolerances.assert_close(packed[:, :4], whole[:, :4], jnp.float32, "first document")
  with pytest.raises(ValueError, match=r"history must have shape \[B, W - 1, C\]"):
    mechanisms.short_conv(x, w, history=x[:, :2])
