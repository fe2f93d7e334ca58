"""Context-parallel neighborhood attention (halo exchange over the leading spatial axis) equals
the unsharded call: outputs, LSE and every gradient, in 1-D, 2-D and 3-D, with stride,
dilation, causal axes, windows wider than a shard, sinks and additional keys; the slabs are
exact and the exchange is ppermutes of a few rows, not an all-gather."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import sharding
from attn_jax.context_parallel import neighborhood as cp_neighborhood
from tests import tolerances

MESH = sharding.make_mesh(data=2, sequence=4)

CASES = {
    # name: (spatial, kernel_size, stride, dilation, is_causal)
    "1d_window_wider_than_shard": ((16,), 9, 1, 1, False),
    "1d_causal_stride_dilation": ((32,), 4, 2, 2, True),
    "2d_stride_dilation_causal_cols": ((16, 6), (5, 3), (2, 1), (1, 2), (False, True)),
    "3d_causal_time": ((8, 4, 4), (3, 3, 3), 1, 1, (True, False, False)),
}


def _loss(cp, case, q, k, v, sinks, ak, av):
  spatial, kernel, stride, dilation, causal = case
  o, lse = attn_jax.neighborhood_attention(q, k, v, kernel, stride, dilation, causal, sinks=sinks,
                                           additional_keys=ak, additional_values=av, return_lse=True,
                                           context_parallel=cp)
  w = jnp.sin(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
  return (o * w).sum() + 0.1 * lse.sum(), (o, lse)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_unsharded(name):
  case = CASES[name]
  spatial = case[0]
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  q = jax.random.normal(ks[0], (2,) + spatial + (2, 4))
  k = jax.random.normal(ks[1], (2,) + spatial + (1, 4))
  v = jax.random.normal(ks[2], (2,) + spatial + (1, 4))
  sinks = jax.random.normal(ks[3], (2,))
  extra = name.startswith("2d")
  ak = jax.random.normal(ks[4], (2, 3, 1, 4)) if extra else None
  av = jax.random.normal(ks[5], (2, 3, 1, 4)) if extra else None
  cp = attn_jax.ContextParallel(MESH, "sequence", batch_axes="data")
  argnums = (0, 1, 2, 3, 4, 5) if extra else (0, 1, 2, 3)
  grad = jax.value_and_grad(lambda *a: _loss(*a[:2], *a[2:]), argnums=[i + 2 for i in argnums], has_aux=True)
  fn = jax.jit(grad, static_argnums=(0, 1))
  (_, got), g_got = fn(cp, case, q, k, v, sinks, ak, av)
  (_, want), g_want = fn(None, case, q, k, v, sinks, ak, av)
  for label, a, b in zip(["out", "lse"] + [f"grad {i}" for i in argnums], got + tuple(g_got), want + tuple(g_want)):
    tolerances.assert_close(a, b, jnp.float32, f"{name} {label}")


def test_slabs_are_minimal_halos_and_exact():
  # kernel 5 on 32 rows over 4 devices: two halo rows on each inner side, none at the grid ends.
  assert cp_neighborhood.slabs(32, 4, 5, 1, 1, False) == ((0, 10), (6, 18), (14, 26), (22, 32))
  # Causal: only rows before the slab (kernel - 1 = 3 of them).
  assert cp_neighborhood.slabs(32, 4, 4, 1, 1, True) == ((0, 8), (5, 16), (13, 24), (21, 32))
  # A window wider than a shard reaches two shards away; slabs stay at least kernel rows long.
  slabs = cp_neighborhood.slabs(16, 4, 9, 1, 1, False)
  assert slabs[1][0] == 0 and all(e1 - e0 >= 9 for e0, e1 in slabs)


def test_halo_exchange_is_not_an_all_gather():
  x = jnp.zeros((2, 32, 2, 4))
  cp = attn_jax.ContextParallel(MESH, "sequence", batch_axes="data")
  text = jax.jit(lambda q: attn_jax.neighborhood_attention(q, q, q, 5, context_parallel=cp)).lower(x).as_text()
  # One left and one right halo, for K and for V.
  assert text.count("collective_permute") == 4
  assert "all_gather" not in text and "all-gather" not in text


def test_bad_leading_size():
  cp = attn_jax.ContextParallel(MESH, "sequence")
  x = jnp.zeros((2, 30, 4, 2, 4))
  with pytest.raises(ValueError, match=r"leading spatial size 30 must be divisible by the size 4 of mesh axis"):
    attn_jax.neighborhood_attention(x, x, x, 3, context_parallel=cp)
