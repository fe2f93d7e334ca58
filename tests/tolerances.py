"""Per-dtype tolerances for comparing a fast backend with the float32 reference.

Errors are measured relative to the largest magnitude of the reference array, so that one table
serves outputs, LSEs and gradients of any scale: |fast - ref| <= atol * max|ref| + rtol * |ref|.
bfloat16 has an 8-bit mantissa (relative step 2^-8 = 0.004); the fast paths also round the
probabilities and dS to the input dtype before the second matmul, as flash kernels do.

Results that are float32 whatever the input dtype (the softmax LSE, the linear-attention final
state) are not rounded to the input dtype, so they get the float32 row in every dtype
(:func:`assert_close_accumulated`): the reference runs on the same (already rounded) inputs, and
the fast paths differ from it only by the order of float32 accumulation. Measured: LSE errors of
2e-7 to 5e-7 on bf16/f16 runs (against 7e-5 allowed), where the input-dtype rows would let a
uniform +0.1 shift of the LSE through.
"""

import jax.numpy as jnp
import numpy as np

TOLERANCES = {
    # dtype: (atol relative to max|ref|, rtol)
    jnp.dtype(jnp.float32): (2e-5, 1e-5),
    jnp.dtype(jnp.bfloat16): (3e-2, 2e-2),
    jnp.dtype(jnp.float16): (5e-3, 5e-3),
}


# A float32 result built from matmuls whose operands the fast path rounds to the input dtype
# (the Pallas linear kernels round the decayed keys k * exp(b_last - b) to bf16 / f16 before the
# state update, as flash-linear-attention does) carries one rounding per term: 2^-8 (bf16) or
# 2^-11 (f16) of the largest term bounds its error. Measured: 1.2e-3 to 1.7e-3 (bf16).
ROUNDED_OPERANDS = {
    jnp.dtype(jnp.float32): TOLERANCES[jnp.dtype(jnp.float32)],
    jnp.dtype(jnp.bfloat16): (2.0 ** -8, 0.0),
    jnp.dtype(jnp.float16): (2.0 ** -11, 0.0),
}


def assert_close(actual, expected, dtype, name="", factor=1.0, table=None):
  atol, rtol = (table or TOLERANCES)[jnp.dtype(dtype)]
  a = np.asarray(jnp.asarray(actual, jnp.float32))
  e = np.asarray(jnp.asarray(expected, jnp.float32))
  assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
  finite = np.isfinite(e)
  np.testing.assert_array_equal(np.isfinite(a), finite, err_msg=f"{name}: finiteness differs")
  a, e = np.where(finite, a, 0), np.where(finite, e, 0)
  scale = max(float(np.abs(e).max(initial=0.0)), 1e-6)
  np.testing.assert_allclose(a, e, atol=factor * atol * scale, rtol=factor * rtol, err_msg=name)


def assert_close_accumulated(actual, expected, name="", factor=1.0, rounded_operands=None):
  """Compares a float32 result accumulated from inputs of any dtype (LSE, final state).

  ``rounded_operands``: the input dtype when the fast path rounds intermediate matmul operands to
  it (then :data:`ROUNDED_OPERANDS` applies); None for exact float32 accumulation.
  """
  if rounded_operands is None:
    assert_close(actual, expected, jnp.float32, name, factor)
  else:
    assert_close(actual, expected, rounded_operands, name, factor, table=ROUNDED_OPERANDS)
