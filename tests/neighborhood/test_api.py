"""neighborhood_attention: special cases equal to plain attention, dtypes, backends, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import masks
from tests import tolerances
from tests.neighborhood import dense_reference


def _qkv(shape, h=2, d=8, dtype=jnp.float32, seed=0, hkv=None):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  hkv = hkv or h
  q = jax.random.normal(ks[0], (2,) + shape + (h, d)).astype(dtype)
  k = jax.random.normal(ks[1], (2,) + shape + (hkv, d)).astype(dtype)
  v = jax.random.normal(ks[2], (2,) + shape + (hkv, d)).astype(dtype)
  return q, k, v


def _flat(x, n):
  return x.reshape((x.shape[0], -1) + x.shape[1 + n:])


def test_kernel_equal_to_size_is_full_attention():
  shape = (5, 6)
  q, k, v = _qkv(shape)
  got = jax.jit(attn_jax.neighborhood_attention, static_argnums=3)(q, k, v, shape)
  want = jax.jit(attn_jax.attention, static_argnames="implementation")(
      _flat(q, 2), _flat(k, 2), _flat(v, 2), implementation="reference")
  tolerances.assert_close(_flat(got, 2), want, jnp.float32, "out")


def test_1d_causal_kernel_equal_to_length_is_causal_attention():
  q, k, v = _qkv((11,))
  got = jax.jit(lambda q, k, v: attn_jax.neighborhood_attention(q, k, v, 11, is_causal=True))(q, k, v)
  want = jax.jit(lambda q, k, v: attn_jax.attention(q, k, v, mask=masks.causal(),
                                                    implementation="reference"))(q, k, v)
  tolerances.assert_close(got, want, jnp.float32, "out")


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_backends_and_bfloat16(implementation):
  shape, kernel, stride, dilation, causal = (6, 7), (3, 2), (1, 2), (2, 1), (False, True)
  q, k, v = _qkv(shape, h=4, hkv=2, dtype=jnp.bfloat16)
  mask = dense_reference.dense_mask(shape, kernel, stride, dilation, causal)
  got = jax.jit(lambda q, k, v: attn_jax.neighborhood_attention(
      q, k, v, kernel, stride, dilation, causal, implementation=implementation))(q, k, v)
  want, _ = jax.jit(lambda q, k, v: dense_reference.dense_attention(q, k, v, mask))(q, k, v)
  assert got.dtype == jnp.bfloat16 and got.shape == (2,) + shape + (4, 8)
  tolerances.assert_close(got, want, jnp.bfloat16, "out")


def test_vmap_and_custom_scale():
  q, k, v = _qkv((9,))
  fn = lambda q, k, v: attn_jax.neighborhood_attention(q, k, v, 3, scale=0.3)
  got = jax.jit(jax.vmap(fn))(q[:, None], k[:, None], v[:, None])[:, 0]
  mask = dense_reference.dense_mask((9,), (3,), (1,), (1,), (False,))
  want, _ = jax.jit(lambda q, k, v: dense_reference.dense_attention(q, k, v, mask, scale=0.3))(q, k, v)
  tolerances.assert_close(got, want, jnp.float32, "out")


def test_exported_names():
  assert callable(attn_jax.neighborhood_attention)
  assert attn_jax.NeighborhoodConfig().tile_shape is None
  assert issubclass(attn_jax.NeighborhoodMask, masks.Mask)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=9), "kernel_size \\* dilation"),
    (dict(kernel_size=3, dilation=3), "kernel_size \\* dilation"),
    (dict(kernel_size=(3, 9)), "kernel_size \\* dilation"),
    (dict(kernel_size=3, stride=4), "stride must be <= kernel_size"),
    (dict(kernel_size=1), "kernel_size must be >= 2"),
    (dict(kernel_size=3, stride=0), "stride must be >= 1"),
    (dict(kernel_size=3, dilation=0), "dilation must be >= 1"),
    (dict(kernel_size=(3, 3, 3)), "kernel_size must have one entry per spatial axis"),
    (dict(kernel_size=3.0), "kernel_size must be an int"),
    (dict(kernel_size=3, is_causal=1), "is_causal must be a bool"),
    (dict(kernel_size=3, is_causal=(True,)), "is_causal must have one entry per spatial axis"),
    (dict(kernel_size=3, config="big"), "config must be a NeighborhoodConfig"),
    (dict(kernel_size=3, config=attn_jax.NeighborhoodConfig(tile_shape=(2,))), "config.tile_shape"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
  q, k, v = _qkv((8, 8))
  with pytest.raises(ValueError, match=match):
    attn_jax.neighborhood_attention(q, k, v, **kwargs)


def test_bad_tensors_raise_value_error_naming_them():
  q, k, v = _qkv((8, 8))
  with pytest.raises(ValueError, match="q must have shape \\[batch, \\*spatial, heads, head_dim\\]"):
    attn_jax.neighborhood_attention(q[:, 0, 0], k[:, 0, 0], v[:, 0, 0], 3)
  with pytest.raises(ValueError, match="rank 4 to 6"):
    attn_jax.neighborhood_attention(q[:, None, None], k[:, None, None], v[:, None, None], 3)
  with pytest.raises(ValueError, match="same rank"):
    attn_jax.neighborhood_attention(q, k[:, 0], v, 3)
  with pytest.raises(ValueError, match="share batch and spatial shape"):
    attn_jax.neighborhood_attention(q, k[:, :7], v[:, :7], 3)
  with pytest.raises(ValueError, match="q must be an array"):
    attn_jax.neighborhood_attention(np.zeros(3).tolist(), k, v, 3)
  extra = jnp.zeros((2, 3, 2, 8))
  with pytest.raises(ValueError, match="additional_keys and additional_values must be given together"):
    attn_jax.neighborhood_attention(q, k, v, 3, additional_keys=extra)
  with pytest.raises(ValueError, match="additional_keys must have shape"):
    attn_jax.neighborhood_attention(q, k, v, 3, additional_keys=extra[..., :4], additional_values=extra)
  with pytest.raises(ValueError, match="additional_values must have shape"):
    attn_jax.neighborhood_attention(q, k, v, 3, additional_keys=extra, additional_values=extra[:1])
  with pytest.raises(ValueError, match="sinks must have shape"):
    attn_jax.neighborhood_attention(q, k, v, 3, sinks=jnp.zeros((3,)))
  with pytest.raises(ValueError, match="NeighborhoodConfig.tile_shape"):
    attn_jax.NeighborhoodConfig(tile_shape=(0, 2))
