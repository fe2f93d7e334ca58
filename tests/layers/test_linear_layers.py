"""The named mixers of the linear-attention family as layers: causality, gradients, composition,
decoding from an empty cache (the LM-level decode test of every entry: test_registry.py)."""

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


CONFIGS = {
    "lightning2": ("lightning", dict()),
    "lightning1": ("lightning", dict(version=1)),
    "based": ("based", dict(feature_dim=4, window=5)),
    "jrt": ("jrt", dict(prefix_len=6)),
    "retnet": ("retnet", dict(value_dim=6)),
    "lightnet": ("lightnet", dict()),
    "aaren": ("aaren", dict()),
    "gla": ("gla", dict()),
}


def _layer(key, *, layer_index=0, num_layers=1, **extra):
  name, fields = CONFIGS[key]
  cfg = layers.mixer_config(name, num_heads=H, **fields, **extra)
  return layers.build_mixer(cfg, F, rngs=nnx.Rngs(0), layer_index=layer_index, num_layers=num_layers)


def _positions(x):
  return jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])


@pytest.mark.parametrize("key", list(CONFIGS))
def test_layer_is_causal_and_trainable(key):
  model = _randomize(_layer(key), 1)
  x = _x(2, 2, T, F)
  graphdef, params = nnx.split(model, nnx.Param)

  def run(params, x):
    return nnx.merge(graphdef, params)(x, positions=_positions(x))

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
  model = _randomize(_layer("lightning2", layer_index=1, num_layers=3), 3)
  np.testing.assert_allclose(model.slopes, mechanisms.lightning_slopes(H, 1, 3))
  x = _x(4, 1, T, F)
  p = model.proj
  q, k, v, u = nnx.silu(p.q_proj(x)), nnx.silu(p.k_proj(x)), p.v_proj(x), model.gate(x)
  o = mechanisms.lightning_attention(q, k, v, np.asarray(model.slopes), implementation="reference")
  o = o.reshape(1, T, -1)
  o = o * jax.lax.rsqrt((o * o).mean(-1, keepdims=True) + 1e-6) * model.norm.scale[...]
  want = p.o_proj(o.reshape(1, T, H, -1) * jax.nn.sigmoid(u))
  tolerances.assert_close(jax.jit(lambda x: model(x, positions=_positions(x)))(x), want, jnp.float32, "out")


@pytest.mark.parametrize("key", ["lightning2", "aaren", "lightnet", "gla"])
def test_decoding_from_an_empty_cache_equals_the_full_call(key):
  model = _randomize(_layer(key), 5)
  x = _x(6, 2, 9, F)

  @jax.jit
  def decode(x):
    def step(cache, i):
      y, cache = model.decode(jax.lax.dynamic_slice_in_dim(x, i, 1, axis=1), cache, position=i)
      return cache, y[:, 0]
    _, y = jax.lax.scan(step, model.init_cache(2, 9, jnp.float32), jnp.arange(9))
    return y.swapaxes(0, 1)

  tolerances.assert_close(decode(x), jax.jit(lambda x: model(x, positions=_positions(x)))(x), jnp.float32,
                          "decode")


def test_lightnet_non_causal_is_one_global_sum():
  """Non-causal LightNet (e.g. over an image's patches) reads every token alike: permuting the
  tokens permutes the outputs."""
  model = _randomize(_layer("lightnet", causal=False), 7)
  x = _x(7, 1, 20, F)
  perm = np.random.default_rng(0).permutation(20)
  run = jax.jit(lambda x: model(x, positions=_positions(x)))
  tolerances.assert_close(run(x[:, perm]), run(x)[:, perm], jnp.float32, "permutation")
  y = run(x)
  assert not np.allclose(y[:, 0], run(x.at[:, -1].add(1.0))[:, 0])  # the first token sees the last


def test_layer_argument_errors():
  model = _layer("jrt")
  with pytest.raises(ValueError, match=r"prefix_len=6 tokens non-causally, so the prompt .* got 4 tokens"):
    model.prefill(_x(0, 1, 4, F), model.init_cache(1, 8, jnp.float32))
  with pytest.raises(ValueError, match="mixer 'aaren' does not support segment_ids"):
    _layer("aaren")(_x(0, 1, T, F), positions=None, segment_ids=jnp.zeros((1, T), jnp.int32))
  with pytest.raises(ValueError, match="decodes its causal form only"):
    _layer("lightnet", causal=False).init_cache(1, 8, jnp.float32)


def test_import_attn_jax_does_not_import_flax():
  code = "import sys, attn_jax; assert 'flax' not in sys.modules, 'flax imported'"
  subprocess.run([sys.executable, "-c", code], check=True)
