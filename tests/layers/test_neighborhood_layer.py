"""The flax.nnx NeighborhoodAttention layer and axial RoPE."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn_jax
from attn_jax.layers import NeighborhoodAttention
from attn_jax.neighborhood import rope
from tests import tolerances
from tests.neighborhood import dense_reference


def _reference_layer(model, x, context, mask):
  """The layer's own projections around dense attention with an independently built mask."""
  q, k, v = model.query(x), model.key(x), model.value(x)
  if model.rope:
    q, k = rope.axial_rope(q, model.rope_base), rope.axial_rope(k, model.rope_base)
  o, _ = dense_reference.dense_attention(
      q, k, v, mask, sinks=None if model.sinks is None else model.sinks[...],
      additional_keys=model.key(context), additional_values=model.value(context))
  return model.out(o)


def test_layer_matches_dense_composition_forward_and_gradients():
  shape, kernel, stride, dilation, causal = (6, 7), (3, 4), (1, 2), (2, 1), (True, False)
  model = NeighborhoodAttention(16, 4, kernel, stride=stride, dilation=dilation, is_causal=causal,
                                num_kv_heads=2, rope=True, use_sinks=True, rngs=nnx.Rngs(0))
  # Non-zero sinks so that their gradient path is exercised away from the initial value.
  model.sinks[...] = jnp.arange(4, dtype=jnp.float32) - 1.5
  x = jax.random.normal(jax.random.PRNGKey(1), (2,) + shape + (16,))
  context = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 16))
  mask = dense_reference.dense_mask(shape, kernel, stride, dilation, causal)
  graphdef, params = nnx.split(model)

  def loss(params, fn):
    m = nnx.merge(graphdef, params)
    y = fn(m)
    return (y * jnp.cos(jnp.arange(y.size).reshape(y.shape))).sum(), y

  fast = jax.jit(jax.value_and_grad(lambda p: loss(p, lambda m: m(x, context)), has_aux=True))
  slow = jax.jit(jax.value_and_grad(lambda p: loss(p, lambda m: _reference_layer(m, x, context, mask)),
                                    has_aux=True))
  (_, y_fast), g_fast = fast(params)
  (_, y_slow), g_slow = slow(params)
  assert y_fast.shape == (2,) + shape + (16,)
  tolerances.assert_close(y_fast, y_slow, jnp.float32, "out")
  flat_fast = jax.tree_util.tree_leaves_with_path(g_fast)
  flat_slow = dict(jax.tree_util.tree_leaves_with_path(g_slow))
  assert len(flat_fast) == 9  # q/k/v/out kernels and biases, sinks
  for path, g in flat_fast:
    assert np.isfinite(np.asarray(g)).all(), path
    tolerances.assert_close(g, flat_slow[path], jnp.float32, jax.tree_util.keystr(path))


def test_axial_rope_is_relative_and_norm_preserving():
  # The same q and k vectors at every grid position: after rotation their dot product depends on
  # the per-axis coordinate differences only.
  q = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(0), (12,)), (1, 4, 5, 3, 1, 12))
  k = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(1), (12,)), (1, 4, 5, 3, 1, 12))
  rq, rk = (np.asarray(x) for x in jax.jit(lambda q, k: (rope.axial_rope(q), rope.axial_rope(k)))(q, k))
  dot = lambda a, b: float(np.dot(rq[(0,) + a + (0,)], rk[(0,) + b + (0,)]))
  np.testing.assert_allclose(dot((1, 2, 0), (0, 4, 2)), dot((3, 1, 0), (2, 3, 2)), rtol=1e-5)
  np.testing.assert_allclose(dot((0, 0, 1), (1, 1, 1)), dot((2, 3, 0), (3, 4, 0)), rtol=1e-5)
  assert abs(dot((0, 0, 0), (0, 1, 0)) - dot((0, 0, 0), (0, 2, 0))) > 1e-3
  np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)
  np.testing.assert_array_equal(rq[0, 0, 0, 0], q[0, 0, 0, 0])  # position 0 is not rotated


def test_layer_errors():
  with pytest.raises(ValueError, match="num_features"):
    NeighborhoodAttention(10, 4, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_kv_heads"):
    NeighborhoodAttention(16, 4, 3, num_kv_heads=3, rngs=nnx.Rngs(0))
  model = NeighborhoodAttention(12, 2, 3, rope=True, rngs=nnx.Rngs(0))  # head_dim 6
  with pytest.raises(ValueError, match="head_dim"):
    model(jnp.zeros((1, 5, 5, 12)))
  with pytest.raises(ValueError, match="x must have shape"):
    model(jnp.zeros((1, 12)))
  with pytest.raises(ValueError, match="context must have shape"):
    model(jnp.zeros((1, 5, 12)), context=jnp.zeros((1, 12)))
  with pytest.raises(ValueError, match="head_dim divisible"):
    rope.axial_rope(jnp.zeros((1, 4, 4, 1, 6)))


def _imports_reachable_from(module: str) -> set[str]:
  """Top-level packages imported, transitively through attn_jax modules, by ``module``."""
  root = pathlib.Path(attn_jax.__file__).parent.parent
  seen, external, todo = set(), set(), [module]
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    path = root / (name.replace(".", "/") + ".py")
    if not path.exists():
      path = root / name.replace(".", "/") / "__init__.py"
    if not path.exists():
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      else:
        continue
      for n in names:
        if n.split(".")[0] == "attn_jax":
          todo.append(n)
        else:
          external.add(n.split(".")[0])
  return external


def test_import_attn_jax_does_not_import_flax():
  # Static walk of the import graph (a subprocess import would cost seconds of CPU).
  assert "flax" not in _imports_reachable_from("attn_jax")
  assert "flax" in _imports_reachable_from("attn_jax.layers")
