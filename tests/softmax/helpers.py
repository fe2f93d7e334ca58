"""Shared helpers for comparing softmax-attention backends with the reference."""

import jax
import jax.numpy as jnp
import numpy as np

import attn_jax
from attn_jax import dispatch
from tests import tolerances

HEAD_LAYOUTS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def make_inputs(seed, batch, q_len, kv_len, hq, hkv, d, dv, dtype, scale=1.0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = (scale * jax.random.normal(ks[0], (batch, q_len, hq, d))).astype(dtype)
  k = (scale * jax.random.normal(ks[1], (batch, kv_len, hkv, d))).astype(dtype)
  v = jax.random.normal(ks[2], (batch, kv_len, hkv, dv)).astype(dtype)
  sinks = jax.random.normal(ks[3], (hq,), jnp.float32)
  d_out = jax.random.normal(ks[4], (batch, q_len, hq, dv), jnp.float32)
  d_lse = jax.random.normal(ks[5], (batch, q_len, hq), jnp.float32)
  return q, k, v, sinks, d_out, d_lse


def value_and_grads(implementation, config, q, k, v, sinks, d_out, d_lse, **kwargs):
  """Output, LSE and the gradients of <out, d_out> + <lse, d_lse> w.r.t. q, k, v (and sinks)."""
  with_sinks = sinks is not None

  def loss(q, k, v, sinks):
    out, lse = attn_jax.attention(q, k, v, sinks=sinks if with_sinks else None,
                                  implementation=implementation, config=config, return_lse=True,
                                  **kwargs)
    finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return (out.astype(jnp.float32) * d_out).sum() + (finite_lse * d_lse).sum(), (out, lse)

  argnums = (0, 1, 2, 3) if with_sinks else (0, 1, 2)
  fn = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))
  (_, (out, lse)), grads = fn(q, k, v, sinks if with_sinks else jnp.zeros(()))
  return out, lse, grads


def compare_backends(implementation, config, q, k, v, sinks, d_out, d_lse, factor=1.0, **kwargs):
  got = value_and_grads(implementation, config, q, k, v, sinks, d_out, d_lse, **kwargs)
  want = value_and_grads("reference", None, q, k, v, sinks, d_out, d_lse, **kwargs)
  dtype = q.dtype
  tolerances.assert_close(got[0], want[0], dtype, "out", factor)
  # The LSE is float32 in every dtype: compared at float32 accuracy against the reference run on
  # the same rounded inputs (see tests/tolerances.py).
  assert got[1].dtype == jnp.float32, f"lse: dtype {got[1].dtype} != float32"
  # The TPU kernels fold scale * log2(e) into q and round it to the input dtype (an MXU operand, as
  # splash attention does): in bfloat16 / float16 their LSE carries that operand's rounding.
  rounded = dtype if implementation == "pallas_tpu" and dtype != jnp.float32 else None
  tolerances.assert_close_accumulated(got[1], want[1], "lse", factor, rounded_operands=rounded)
  names = ["dq", "dk", "dv", "dsinks"]
  for name, a, b in zip(names, got[2], want[2]):
    assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
    assert np.isfinite(np.asarray(a, np.float32)).all(), f"{name} has non-finite values"
    tolerances.assert_close(a, b, dtype, name, factor)
  return got, want


def spy_registry(monkeypatch, calls, pallas_config=None):
  """Wraps the softmax backends cudnn, pallas_gpu and xla so that each call appends the backend's
  name to ``calls``; ``pallas_config`` replaces pallas_gpu's config (e.g. interpret mode)."""
  table = dispatch._REGISTRY["softmax"]
  for name in ("cudnn", "pallas_gpu", "xla"):
    original = table[name]

    def fn(*args, _name=name, _original=original, **kwargs):
      calls.append(_name)
      if _name == "pallas_gpu" and pallas_config is not None:
        kwargs["config"] = pallas_config
      return _original(*args, **kwargs)
    monkeypatch.setitem(table, name, fn)
