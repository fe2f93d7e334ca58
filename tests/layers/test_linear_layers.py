"""The flax.nnx layers of the linear-attention family: composition, causality, gradients, decoding."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import layers
from attn_jax import mechanisms
from tests import tolerances

F, H, T = 16, 2, 20


def _x(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _randomize(model, seed):
  """Non-trivial values for every parameter (zero convolutions, unit norms would hide paths)."""
  graphdef, params = nnx.split(model, nnx.Param)
  leaves, tree = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  leaves = [jnp.asarray(0.5 * rng.standard_normal(p.shape), p.dtype) for p in leaves]
  return nnx.merge(graphdef, jax.tree_util.tree_unflatten(tree, leaves))


LAYERS = {
    "lightning2": lambda: layers.LightningAttention(F, H, layer_index=1, num_layers=3, rngs=nnx.Rngs(0)),
    "lightning1": lambda: layers.LightningAttention(F, H, version=1, rngs=nnx.Rngs(0)),
    "based": lambda: layers.BasedAttention(F, H, feature_dim=4, window=5, rngs=nnx.Rngs(0)),
    "jrt": lambda: layers.JRTPrefixAttention(F, H, rngs=nnx.Rngs(0)),
    "retnet": lambda: layers.MultiScaleRetention(F, H, value_dim=6, rngs=nnx.Rngs(0)),
    "lightnet": lambda: layers.LightNetAttention(F, H, rngs=nnx.Rngs(0)),
    "aaren": lambda: layers.AarenAttention(F, H, rngs=nnx.Rngs(0)),
}


def _call(model, x):
  return model(x, prefix_len=6) if isinstance(model, layers.JRTPrefixAttention) else model(x)


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_is_causal_and_trainable(name):
  model = _randomize(LAYERS[name](), 1)
  x = _x(2, 2, T, F)
  graphdef, params = nnx.split(model, nnx.Param)

  def run(params, x):
    return _call(nnx.merge(graphdef, params), x)

  y = jax.jit(run)(params, x)
  assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()
  # Changing the last 5 tokens changes nothing before them (JRT: the prefix read is non-causal,
  # so only tokens after the prefix are changed).
  x2 = x.at[:, -5:].add(1.0)
  y2 = jax.jit(run)(params, x2)
  np.testing.assert_allclose(y2[:, :-5], y[:, :-5], rtol=1e-5, atol=1e-5)
  assert not np.allclose(y2[:, -5:], y[:, -5:])
  grads = jax.jit(jax.grad(lambda p: (run(p, x) * jnp.cos(jnp.arange(x.size).reshape(x.shape))).sum()))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    assert np.isfinite(g).all() and np.abs(g).max() > 0, jax.tree_util.keystr(path)


def test_lightning_layer_composition():
  model = _randomize(LAYERS["lightning2"](), 3)
  x = _x(4, 1, T, F)
  q, k, v, u = nnx.silu(model.query(x)), nnx.silu(model.key(x)), model.value(x), model.gate(x)
  o = mechanisms.lightning_attention(q, k, v, np.asarray(model.slopes), implementation="reference")
  o = o.reshape(1, T, -1)
  o = o * jax.lax.rsqrt((o * o).mean(-1, keepdims=True) + 1e-6) * model.norm.scale[...]
  want = model.out(o.reshape(1, T, H, -1) * jax.nn.sigmoid(u))
  tolerances.assert_close(jax.jit(lambda x: model(x))(x), want, jnp.float32, "out")


@pytest.mark.parametrize("name", ["lightning2", "aaren"])
def test_decoding_steps_equal_the_full_call(name):
  model = _randomize(LAYERS[name](), 5)
  x = _x(6, 2, 9, F)

  @jax.jit
  def decode(x):
    def step(state, x_t):
      y, state = model.step(x_t, state)
      return state, y
    _, y = jax.lax.scan(step, model.init_state(2), x.swapaxes(0, 1))
    return y.swapaxes(0, 1)

  tolerances.assert_close(decode(x), jax.jit(lambda x: model(x))(x), jnp.float32, "decode")


def test_lightnet_non_causal_image():
  model = layers.LightNetAttention(F, H, causal=False, rngs=nnx.Rngs(0))
  x = _x(7, 1, 4, 5, F)
  y = jax.jit(lambda x: model(x))(x)
  flat = jax.jit(lambda x: model(x))(x.reshape(1, 20, F))
  tolerances.assert_close(y.reshape(1, 20, F), flat, jnp.float32, "out")


def test_layer_argument_errors():
  with pytest.raises(ValueError, match=r"num_features \(15\) must be divisible by num_heads \(2\)"):
    layers.LightningAttention(15, 2, rngs=nnx.Rngs(0))
  model = LAYERS["jrt"]()
  with pytest.raises(ValueError, match=r"prefix_len must be an int in \[1, 20\]"):
    model(_x(0, 1, T, F), prefix_len=0)
  with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, 16\]"):
    LAYERS["retnet"]()(_x(0, 1, T, 8))


def test_import_attn_jax_does_not_import_flax():
  code = "import sys, attn_jax; assert 'flax' not in sys.modules, 'flax imported'"
  subprocess.run([sys.executable, "-c", code], check=True)
