"""neighborhood_attention against dense attention with an independently built mask: forward and
gradients of q, k, v, sinks and additional keys/values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from tests import tolerances
from tests.neighborhood import dense_reference

# (spatial shape, kernel_size, stride, dilation, is_causal, extra keys, sinks, (Hq, Hkv), tile).
# Tiles are forced small so that every case has full, partial and empty blocks (except the
# blocked case, whose heuristic tiles make every visited block full). Value head dim 6 != 8.
CASES = {
    "1d_stride_dilation_extra_sinks_gqa": ((19,), 5, 2, 2, False, 3, True, (2, 1), (3,)),
    "1d_causal_even_kernel_stride": ((13,), 4, 3, 1, True, 0, False, (2, 2), (3,)),
    "2d_7x9_stride_dilation_causal_axis1": (
        (7, 9), (3, 4), (2, 1), (2, 1), (False, True), 2, True, (4, 2), (3, 2)),
    "2d_kernel_equals_size_axis0": ((6, 9), (6, 3), (1, 2), (1, 3), False, 0, False, (2, 2), (4, 3)),
    "2d_blocked_heuristic_tiles": ((8, 12), (4, 3), (4, 3), 1, False, 0, False, (2, 2), None),
    "3d_5x6x7": ((5, 6, 7), (2, 3, 3), (1, 3, 2), 1, (True, False, False), 2, False, (2, 2), (1, 3, 2)),
    "3d_dilation_causal": (
        (4, 6, 6), (2, 3, 2), (2, 1, 2), (1, 2, 3), (True, True, False), 0, True, (2, 1), (1, 2, 2)),
}


def _inputs(seed, shape, hq, hkv, extra, dtype, d=8, dv=6):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  b = 2
  q = jax.random.normal(ks[0], (b,) + shape + (hq, d)).astype(dtype)
  k = jax.random.normal(ks[1], (b,) + shape + (hkv, d)).astype(dtype)
  v = jax.random.normal(ks[2], (b,) + shape + (hkv, dv)).astype(dtype)
  ak = jax.random.normal(ks[3], (b, extra, hkv, d)).astype(dtype) if extra else None
  av = jax.random.normal(ks[4], (b, extra, hkv, dv)).astype(dtype) if extra else None
  sinks = jax.random.normal(ks[5], (hq,), jnp.float32)
  d_out = jax.random.normal(ks[6], (b,) + shape + (hq, dv), jnp.float32)
  d_lse = jax.random.normal(ks[7], (b,) + shape + (hq,), jnp.float32)
  return q, k, v, ak, av, sinks, d_out, d_lse


def _per_axis(x, n):
  return tuple(x) if isinstance(x, tuple) else (x,) * n


def _value_and_grads(fn, args, d_out, d_lse):
  """Output, LSE and gradients of <out, d_out> + <lse, d_lse> w.r.t. every array in ``args``."""

  def loss(args):
    out, lse = fn(args)
    return (out.astype(jnp.float32) * d_out).sum() + (lse * d_lse).sum(), (out, lse)

  (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(args)
  return out, lse, grads


@pytest.mark.parametrize("name", list(CASES))
def test_matches_dense_reference(name):
  shape, kernel, stride, dilation, causal, extra, with_sinks, (hq, hkv), tile = CASES[name]
  n = len(shape)
  dtype = jnp.float32
  q, k, v, ak, av, sinks, d_out, d_lse = _inputs(0, shape, hq, hkv, extra, dtype)
  mask = dense_reference.dense_mask(shape, _per_axis(kernel, n), _per_axis(stride, n),
                                    _per_axis(dilation, n), _per_axis(causal, n))
  args = {"q": q, "k": k, "v": v}
  if extra:
    args.update(additional_keys=ak, additional_values=av)
  if with_sinks:
    args["sinks"] = sinks

  def fast(args):
    return attn_jax.neighborhood_attention(
        args["q"], args["k"], args["v"], kernel, stride, dilation, causal,
        sinks=args.get("sinks"), additional_keys=args.get("additional_keys"),
        additional_values=args.get("additional_values"), return_lse=True,
        config=attn_jax.NeighborhoodConfig(tile_shape=tile))

  def ref(args):
    return dense_reference.dense_attention(
        args["q"], args["k"], args["v"], mask, sinks=args.get("sinks"),
        additional_keys=args.get("additional_keys"), additional_values=args.get("additional_values"))

  got = _value_and_grads(fast, args, d_out, d_lse)
  want = _value_and_grads(ref, args, d_out, d_lse)
  tolerances.assert_close(got[0], want[0], dtype, "out")
  tolerances.assert_close(got[1], want[1], dtype, "lse")
  for key in args:
    g, w = got[2][key], want[2][key]
    assert np.isfinite(np.asarray(g)).all(), key
    tolerances.assert_close(g, w, dtype, f"d{key}")
