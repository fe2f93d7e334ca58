"""A positive log decay (a decay passed where its log is expected): ValueError when concrete,
clamped to 0 when traced."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import mechanisms


def _qkv(t=24, h=2, d=8):
  rng = np.random.default_rng(0)
  return tuple(jnp.asarray(rng.standard_normal((1, t, h, d)), jnp.float32) for _ in range(3))


@pytest.mark.parametrize("shape", [(2,), (1, 24, 2), (1, 24, 2, 8)])
@pytest.mark.parametrize("kind", ["numpy", "jax"])
def test_concrete_positive_log_decay_is_a_value_error(shape, kind):
  q, k, v = _qkv()
  decay = np.full(shape, 0.9, np.float32)  # a decay, not its log
  decay = decay if kind == "numpy" else jnp.asarray(decay)
  with pytest.raises(ValueError, match="log_decay must be <= 0.*largest value of 0.9"):
    attn_jax.linear_attention(q, k, v, log_decay=decay)


def test_concrete_positive_log_decay_in_step_is_a_value_error():
  state = jnp.zeros((1, 2, 8, 8))
  q = k = v = jnp.ones((1, 2, 8))
  with pytest.raises(ValueError, match="log_decay must be <= 0"):
    attn_jax.linear_attention_step(state, q, k, v, jnp.asarray([0.5, -0.1]))
  with pytest.raises(ValueError, match="log_decay must have shape"):
    attn_jax.linear_attention_step(state, q, k, v, jnp.asarray([-0.5, -0.1, -0.2]))


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_traced_positive_log_decay_is_clamped(implementation):
  q, k, v = _qkv()
  raw = jnp.asarray(np.random.default_rng(1).normal(0.0, 2.0, (1, 24, 2)), jnp.float32)  # both signs
  assert float(raw.max()) > 0 > float(raw.min())

  def loss(log_decay):
    return attn_jax.linear_attention(q, k, v, log_decay=log_decay, implementation=implementation).sum()

  out = jax.jit(lambda d: attn_jax.linear_attention(q, k, v, log_decay=d, implementation=implementation))(raw)
  want = attn_jax.linear_attention(q, k, v, log_decay=jnp.minimum(raw, 0.0), implementation="reference")
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
  grad = jax.jit(jax.grad(loss))(raw)
  assert np.isfinite(np.asarray(grad)).all()
  # Zero gradient where clamped, the unclamped gradient elsewhere.
  np.testing.assert_array_equal(np.asarray(grad)[np.asarray(raw) > 0], 0.0)
  # At the clamped point the clamp is the identity, so its gradient is the chain rule's value.
  free = jax.grad(loss)(jnp.minimum(raw, 0.0))
  negative = np.asarray(raw) < 0
  np.testing.assert_allclose(np.asarray(grad)[negative], np.asarray(free)[negative], rtol=1e-4, atol=1e-4)


def test_traced_step_decay_is_clamped():
  state = jnp.ones((1, 2, 8, 8))
  q = k = v = jnp.ones((1, 2, 8))
  step = jax.jit(lambda d: attn_jax.linear_attention_step(state, q, k, v, d))
  new_state, _ = step(jnp.asarray([3.0, -1.0]))
  want, _ = attn_jax.linear_attention_step(state, q, k, v, jnp.asarray([0.0, -1.0]))
  np.testing.assert_allclose(new_state, want, rtol=1e-6)


def test_lightnet_decays_pass_the_check_eagerly():
  """LightNet's decays are differences of a cumulative log-sum-exp: rounding must not trip the check."""
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 64, 2, 8)) * 3, jnp.float32) for _ in range(3))
  out = mechanisms.lightnet_attention(q, k, v)
  assert np.isfinite(np.asarray(out)).all()
