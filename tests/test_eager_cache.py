"""Repeated eager calls reuse their compiled computation (attn_jax._jit_cache).

Compilations are counted with JAX's monitoring events (one backend compile event per XLA
compilation). Each case calls a primitive eagerly once (which must compile: this also proves the
counter is live on this JAX version) and then again on new arrays of the same shapes, which must
compile nothing.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import _jit_cache
from attn_jax import masks

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_count = [0]


def _listener(event, *args, **kwargs):
  if event == _COMPILE_EVENT:
    _count[0] += 1


# Registered once for the process; it only increments a counter.
jax.monitoring.register_event_duration_secs_listener(_listener)


def _compiles(fn):
  """Runs ``fn`` to completion and returns the number of XLA compilations it caused."""
  before = _count[0]
  jax.block_until_ready(fn())
  return _count[0] - before


def _normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def _assert_reused(call, make_args):
  """``call(*make_args(seed))`` compiles on the first call and never on the second."""
  first = _compiles(lambda: call(*make_args(0)))
  assert first > 0, "the compile counter saw no compilation: is the monitoring event still emitted?"
  second = make_args(1)
  jax.block_until_ready(second)  # the random inputs compile nothing new, but do not count them
  assert _compiles(lambda: call(*second)) == 0


_SOFTMAX_CONFIGS = {
    "reference": None,
    "xla": attn_jax.XlaConfig(block_q=16, block_kv=16),
    "pallas_tpu": attn_jax.PallasTpuConfig(block_q=16, block_kv=16, interpret=True),
    "pallas_gpu": attn_jax.PallasGpuConfig(block_q=16, block_kv=16, interpret=True),
}


@pytest.mark.parametrize("backend", list(_SOFTMAX_CONFIGS))
def test_attention_eager_calls_compile_once(backend):
  mask = masks.sliding_window(8) | masks.sink_tokens(2)

  def call(q, k, v, sinks):
    return attn_jax.attention(q, k, v, mask=mask, sinks=sinks, implementation=backend,
                              config=_SOFTMAX_CONFIGS[backend], return_lse=True)

  def args(seed):
    return (_normal(seed, (1, 40, 2, 16)), _normal(seed + 10, (1, 40, 1, 16)),
            _normal(seed + 20, (1, 40, 1, 16)), _normal(seed + 30, (2,)))

  _assert_reused(call, args)


_LINEAR_CONFIGS = {
    "reference": None,
    "xla": attn_jax.LinearXlaConfig(chunk_size=16),
    "pallas_tpu": attn_jax.LinearPallasTpuConfig(chunk_size=16, interpret=True),
    "pallas_gpu": attn_jax.LinearPallasGpuConfig(chunk_size=16, interpret=True),
}


@pytest.mark.parametrize("backend", list(_LINEAR_CONFIGS))
def test_linear_attention_eager_calls_compile_once(backend):
  def call(q, k, v, log_decay):
    return attn_jax.linear_attention(q, k, v, log_decay=log_decay, feature_map="elu_plus_one",
                                     normalize=True, return_final_state=True, implementation=backend,
                                     config=_LINEAR_CONFIGS[backend])

  def args(seed):
    return (_normal(seed, (1, 32, 2, 8)), _normal(seed + 10, (1, 32, 2, 8)),
            _normal(seed + 20, (1, 32, 2, 8)), -jax.nn.softplus(_normal(seed + 30, (1, 32, 2))))

  _assert_reused(call, args)


def test_linear_attention_step_eager_calls_compile_once():
  def call(state, q, k, v):
    return attn_jax.linear_attention_step(state, q, k, v, jnp.asarray([-0.1, -0.2]), feature_map="relu")

  def args(seed):
    return (_normal(seed, (2, 2, 8, 4)), _normal(seed + 1, (2, 4, 8)), _normal(seed + 2, (2, 2, 8)),
            _normal(seed + 3, (2, 2, 4)))

  _assert_reused(call, args)


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas_tpu", "pallas_gpu"])
def test_neighborhood_attention_eager_calls_compile_once(backend):
  def call(x):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # interpret mode on this CPU
      return attn_jax.neighborhood_attention(x, x, x, (3, 5), implementation=backend)

  _assert_reused(call, lambda seed: (_normal(seed, (1, 8, 16, 1, 16)),))


def test_a_different_static_argument_compiles_and_is_not_served_stale():
  q = _normal(0, (1, 24, 2, 8))
  causal = attn_jax.attention(q, q, q, mask=masks.causal())
  window = attn_jax.attention(q, q, q, mask=masks.sliding_window(3))
  for mask, got in ((masks.causal(), causal), (masks.sliding_window(3), window)):
    want = attn_jax.attention(q, q, q, mask=mask, implementation="reference")
    np.testing.assert_allclose(got, want, atol=2e-5)
  assert float(jnp.abs(causal - window).max()) > 1e-3


def test_user_feature_map_is_not_frozen_into_the_cache():
  """A user feature map runs outside the cached computation: what it closes over is read anew."""
  q = _normal(0, (1, 16, 1, 4))
  weight = {"w": 1.0}

  def phi(x):
    return x * weight["w"]

  first = attn_jax.linear_attention(q, q, q, feature_map=phi)
  weight["w"] = 2.0
  second = attn_jax.linear_attention(q, q, q, feature_map=phi)
  # phi(q) . phi(k) scales with w^2.
  np.testing.assert_allclose(second, 4.0 * first, rtol=1e-5, atol=1e-5)


def test_eager_grad_and_vmap_compile_once():
  def loss(q):
    out = attn_jax.attention(q, q, q, mask=masks.causal(), config=attn_jax.XlaConfig(block_q=16, block_kv=16))
    lin = jax.vmap(lambda x: attn_jax.linear_attention(x, x, x, log_decay=jnp.full((2,), -0.1)))(q[None])[0]
    return (out ** 2).sum() + (lin ** 2).sum()

  _assert_reused(jax.grad(loss), lambda seed: (_normal(seed, (1, 40, 2, 8)),))


def _cost(compiled):
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return analysis["flops"], compiled.memory_analysis().temp_size_in_bytes


def test_outer_jit_compiles_the_same_program():
  """Under an outer jit the primitives are traced inline, as without the cache: the compiled
  program has the same FLOPs and temporary memory."""
  q = _normal(0, (1, 64, 2, 16))

  def loss(q):
    out = attn_jax.attention(q, q, q, mask=masks.causal(), config=attn_jax.XlaConfig(block_q=16, block_kv=16))
    lin = attn_jax.linear_attention(q, q, q, log_decay=jnp.full((2,), -0.1))
    nat = attn_jax.neighborhood_attention(q, q, q, 5)
    return (out ** 2).sum() + (lin ** 2).sum() + (nat ** 2).sum()

  cached = jax.jit(jax.grad(loss)).lower(q).compile()
  with _jit_cache.disabled():
    direct = jax.jit(jax.grad(lambda q: loss(q))).lower(q).compile()
  assert _cost(cached) == _cost(direct)
