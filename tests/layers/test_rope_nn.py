"""RoPE (1D and per-axis), RMSNorm, SwiGLU and schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import layers
from attn_jax.layers import rope


@jax.jit
def _dots(q, k, qpos, kpos):
  qr = rope.apply_rope(q, qpos)
  kr = rope.apply_rope(k, kpos)
  return jnp.einsum("bqhd,bkhd->bhqk", qr, kr)


def test_rope_1d_depends_on_relative_position_only():
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 2, 8))
  k = jax.random.normal(jax.random.PRNGKey(1), (1, 3, 2, 8))
  pos = jnp.array([[0, 1, 2]])
  a = _dots(q, k, pos, pos)
  b = _dots(q, k, pos + 37, pos + 37)
  np.testing.assert_allclose(a, b, atol=1e-4)
  # A rotation preserves norms, and position 0 is the identity.
  np.testing.assert_allclose(jnp.linalg.norm(rope.apply_rope(q, pos + 5), axis=-1),
                             jnp.linalg.norm(q, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(rope.apply_rope(q, jnp.zeros((1, 3), jnp.int32)), q, atol=1e-6)


def test_rope_2d_rotates_each_half_by_its_axis():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 3, 8))
  grid = rope.grid_positions((2, 3))[None]  # [1, 6, 2]
  assert grid.shape == (1, 6, 2)
  np.testing.assert_array_equal(grid[0, 4], [1, 1])
  rot = jax.jit(rope.apply_rope)
  out = rot(x, grid)
  np.testing.assert_allclose(out[..., :4], rot(x[..., :4], grid[..., 0]), atol=1e-6)
  np.testing.assert_allclose(out[..., 4:], rot(x[..., 4:], grid[..., 1]), atol=1e-6)
  # Shifting the whole grid leaves query-key products unchanged (relative along each axis).
  a = jnp.einsum("bqhd,bkhd->bhqk", out, out)
  shifted = rot(x, grid + jnp.array([7, 3]))
  np.testing.assert_allclose(a, jnp.einsum("bqhd,bkhd->bhqk", shifted, shifted), atol=1e-4)


def test_rope_bad_input():
  x = jnp.zeros((2, 6, 3, 8))
  with pytest.raises(ValueError, match="positions must have shape"):
    rope.apply_rope(x, jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="divisible by 2 \\* num_axes = 6"):
    rope.apply_rope(x, jnp.zeros((2, 6, 3), jnp.int32))
  with pytest.raises(ValueError, match="integers"):
    rope.apply_rope(x, jnp.zeros((2, 6)))


def test_rmsnorm_and_swiglu():
  norm = layers.RMSNorm(8, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8)).astype(jnp.bfloat16)
  y = jax.jit(lambda x: norm(x))(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y.astype(jnp.float32) ** 2, -1)), 1.0, rtol=1e-2)
  mlp = layers.SwiGLU(8, 16, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8))
  expected = (jax.nn.silu(x @ mlp.gate.kernel[...]) * (x @ mlp.up.kernel[...])) @ mlp.down.kernel[...]
  np.testing.assert_allclose(jax.jit(lambda x: mlp(x))(x), expected, rtol=1e-5, atol=1e-5)


def test_schedule_cycles_and_checks():
  lin, attn = layers.mixer_config("linear"), layers.mixer_config("softmax")
  sched = layers.expand_schedule((lin,) * 7 + (attn,), 16)
  assert [c.mixer for c in sched] == (["linear"] * 7 + ["softmax"]) * 2
  assert layers.expand_schedule(attn, 3) == (attn,) * 3
  with pytest.raises(ValueError, match="schedule\\[1\\] must be a mixer config"):
    layers.expand_schedule((attn, "softmax"), 2)
  with pytest.raises(ValueError, match="at least one"):
    layers.expand_schedule((), 2)
