"""Shared helpers for comparing linear-attention backends with the reference."""

import jax
import jax.numpy as jnp
import numpy as np

import attn_jax
from tests import tolerances

DECAYS = ("none", "fixed", "scalar", "channel")


def make_inputs(seed, batch, seq, hq, hkv, d, dv, dtype, decay="none", decay_heads=None,
                features=None, normalize=False, initial_state=False):
  """Random inputs; decays are moderate (a_t in about [0.3, 1)) and given in log space.

  NumPy generates them: eager jax.random calls would each compile a small program.
  """
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  softplus = lambda x: np.logaddexp(x, 0.0).astype(np.float32)
  q = jnp.asarray(normal(batch, seq, hq, d), dtype)
  k = jnp.asarray(normal(batch, seq, hkv, d), dtype)
  v = jnp.asarray(normal(batch, seq, hkv, dv), dtype)
  hd = decay_heads or hkv
  f = features or d
  log_decay = {
      "none": None,
      "fixed": -np.linspace(0.05, 1.0, hd, dtype=np.float32),
      "scalar": -softplus(normal(batch, seq, hd) - 1.0),
      "channel": -softplus(normal(batch, seq, hd, f) - 1.0),
  }[decay]
  log_decay = None if log_decay is None else jnp.asarray(log_decay)
  vd = dv + 1 if normalize else dv
  s0 = jnp.asarray(normal(batch, hd, f, vd)) if initial_state else None
  d_out = jnp.asarray(normal(batch, seq, hq, dv))
  d_state = jnp.asarray(normal(batch, hd, f, vd))
  return dict(q=q, k=k, v=v, log_decay=log_decay, initial_state=s0), d_out, d_state


def value_and_grads(inputs, d_out, d_state, **kwargs):
  """Output, final state and the gradients of <o, d_out> + <state, d_state> w.r.t. every array input."""
  names = [n for n in ("q", "k", "v", "log_decay", "initial_state") if inputs[n] is not None]

  def loss(args):
    o, s = attn_jax.linear_attention(**{**inputs, **args}, return_final_state=True, **kwargs)
    return (o.astype(jnp.float32) * d_out).sum() + (s * d_state).sum(), (o, s)

  args = {n: inputs[n] for n in names}
  (_, (o, s)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(args)
  return o, s, grads


def compare(implementation, inputs, d_out, d_state, factor=1.0, grad_factors=None, **kwargs):
  """Asserts that ``implementation`` matches the reference in outputs, final state and gradients.

  ``grad_factors`` optionally widens the tolerance of single gradients (name -> extra factor).
  """
  got = value_and_grads(inputs, d_out, d_state, implementation=implementation, **kwargs)
  want = value_and_grads(inputs, d_out, d_state, implementation="reference", **kwargs)
  dtype = inputs["q"].dtype
  assert got[0].dtype == dtype and got[1].dtype == jnp.float32
  tolerances.assert_close(got[0], want[0], dtype, "out", factor)
  # The final state is float32 in every dtype. The xla backend accumulates it exactly in float32
  # from the (rounded) inputs; the Pallas kernels round the decayed keys to the input dtype before
  # the state matmul (see tests/tolerances.py), which matters only when there is a decay.
  rounded = None
  if implementation.startswith("pallas") and inputs["log_decay"] is not None and dtype != jnp.float32:
    rounded = dtype
  tolerances.assert_close_accumulated(got[1], want[1], "final_state", factor, rounded_operands=rounded)
  for name in want[2]:
    a, b = got[2][name], want[2][name]
    assert np.isfinite(np.asarray(a, np.float32)).all(), f"d{name} has non-finite values"
    tolerances.assert_close(a, b, dtype, f"d{name}", factor * (grad_factors or {}).get(name, 1.0))
  return got, want
