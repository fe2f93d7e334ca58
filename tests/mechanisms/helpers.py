"""Shared checks for the mechanism tests: a fast form against its oracle, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np

from tests import tolerances


def normal(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def check_grads(fast, slow, args, names, factor=1.0, dtype=jnp.float32):
  """Outputs and gradients (of a random projection of the output) of two functions agree.

  ``names`` label the leading arguments that are differentiated (pytrees allowed).
  """
  out = jax.jit(fast)(*args)
  weight = normal(99, *out.shape)
  loss = lambda f: lambda *a: (f(*a).astype(jnp.float32) * weight).sum()  # noqa: E731
  argnums = tuple(range(len(names)))
  got = jax.jit(jax.grad(loss(fast), argnums))(*args)
  want = jax.jit(jax.grad(loss(slow), argnums))(*args)
  tolerances.assert_close(out, jax.jit(slow)(*args), dtype, "out", factor)
  for name, a, b in zip(names, got, want):
    for i, (x, y) in enumerate(zip(jax.tree.leaves(a), jax.tree.leaves(b))):
      tolerances.assert_close(x, y, dtype, f"{name}[{i}]", factor)
