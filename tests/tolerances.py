"""Per-dtype tolerances for comparing a fast backend with the float32 reference.

Errors are measured relative to the largest magnitude of the reference array, so that one table
serves outputs, LSEs and gradients of any scale: |fast - ref| <= atol * max|ref| + rtol * |ref|.
bfloat16 has an 8-bit mantissa (relative step 2^-8 = 0.004); the fast paths also round the
probabilities and dS to the input dtype before the second matmul, as flash kernels do.
"""

import jax.numpy as jnp
import numpy as np

TOLERANCES = {
    # dtype: (atol relative to max|ref|, rtol)
    jnp.dtype(jnp.float32): (2e-5, 1e-5),
    jnp.dtype(jnp.bfloat16): (3e-2, 2e-2),
    jnp.dtype(jnp.float16): (5e-3, 5e-3),
}


def assert_close(actual, expected, dtype, name="", factor=1.0):
  atol, rtol = TOLERANCES[jnp.dtype(dtype)]
  a = np.asarray(jnp.asarray(actual, jnp.float32))
  e = np.asarray(jnp.asarray(expected, jnp.float32))
  assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
  finite = np.isfinite(e)
  np.testing.assert_array_equal(np.isfinite(a), finite, err_msg=f"{name}: finiteness differs")
  a, e = np.where(finite, a, 0), np.where(finite, e, 0)
  scale = max(float(np.abs(e).max(initial=0.0)), 1e-6)
  np.testing.assert_allclose(a, e, atol=factor * atol * scale, rtol=factor * rtol, err_msg=name)
