"""Basic flax.nnx building blocks whose parameters carry logical axis names.

Every parameter is an ``nnx.Param`` with a ``logical_axes`` metadata entry, one name per
dimension. :mod:`attn_jax.layers.partitioning` reads these names to place parameters and
optimizer state on a mesh through :mod:`attn_jax.sharding`; the modules themselves never name a
mesh axis.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax import sharding


def param(rngs: nnx.Rngs, init, shape: Sequence[int], logical_axes: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
  """An ``nnx.Param`` initialised by ``init(key, shape, dtype)`` and tagged with logical axes."""
  shape, logical_axes = tuple(shape), tuple(logical_axes)
  if len(shape) != len(logical_axes):
    raise ValueError(f"logical_axes {logical_axes} must name every dimension of shape {shape}")
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=logical_axes)


def fan_in_init(fan_in: int):
  """Normal initialiser with standard deviation ``fan_in ** -0.5`` (LeCun normal)."""
  std = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

  return init


def module_list(items):
  """A list of submodules that nnx tracks as graph data (``nnx.List`` where flax has it)."""
  items = list(items)
  return nnx.List(items) if hasattr(nnx, "List") else items


class Dense(nnx.Module):
  """``y = x @ W`` contracting the last ``len(in_shape)`` axes of ``x`` into ``out_shape``.

  Attributes:
    kernel: ``in_shape + out_shape`` with ``in_axes + out_axes`` logical names.
  """

  def __init__(self, in_shape, out_shape, *, in_axes, out_axes, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, init=None):
    in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
    out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
    self.n_in = len(in_shape)
    self.dtype = dtype
    init = init or fan_in_init(math.prod(in_shape))
    self.kernel = param(rngs, init, in_shape + out_shape, tuple(in_axes) + tuple(out_axes),
                        param_dtype)

  def __call__(self, x):
    w = self.kernel[...].astype(self.dtype)
    return jnp.tensordot(x.astype(self.dtype), w, axes=self.n_in)


class RMSNorm(nnx.Module):
  """``x / rms(x) * scale`` over the last axis, computed in float32, returned in ``x.dtype``."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6, param_dtype=jnp.float32,
               axis_name: str = "norm"):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class SwiGLU(nnx.Module):
  """Llama's MLP: ``down(silu(gate(x)) * up(x))`` with hidden width ``hidden``."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate = Dense(dim, hidden, in_axes=("embed",), out_axes=("mlp",), **kw)
    self.up = Dense(dim, hidden, in_axes=("embed",), out_axes=("mlp",), **kw)
    self.down = Dense(hidden, dim, in_axes=("mlp",), out_axes=("embed",), **kw)

  def __call__(self, x):
    h = jax.nn.silu(self.gate(x)) * self.up(x)
    h = sharding.constrain(h, ("batch",) + (None,) * (h.ndim - 2) + ("act_mlp",))
    return self.down(h)


class Embed(nnx.Module):
  """Token embedding ``[vocab, dim]``; :meth:`attend` gives tied-embedding logits."""

  def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.vocab = vocab
    self.dtype = dtype
    self.embedding = param(rngs, fan_in_init(1), (vocab, dim), ("vocab", "embed"), param_dtype)

  def __call__(self, tokens):
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)
