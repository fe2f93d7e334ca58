"""Compiled-memory properties of the xla backend (a count, not a timing)."""

import jax
import jax.numpy as jnp

import attn_jax
from attn_jax import masks


def _temp_bytes(implementation, seq, mask):
  q = jax.ShapeDtypeStruct((1, seq, 2, 64), jnp.float32)

  def loss(q, k, v):
    return attn_jax.attention(q, k, v, mask=mask, implementation=implementation).sum()

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_xla_forward_backward_memory_is_subquadratic():
  mask = masks.causal()
  xla_8k = _temp_bytes("xla", 8192, mask)
  ref_8k = _temp_bytes("reference", 8192, mask)
  # The reference materialises [B, H, 8192, 8192] float32 scores (512 MiB per copy).
  assert ref_8k > 2 * 8192 * 8192 * 4
  assert xla_8k < ref_8k / 8, (xla_8k, ref_8k)
  xla_4k = _temp_bytes("xla", 4096, mask)
  # O(seq * block): doubling the sequence about doubles the temporaries (quadratic would be 4x).
  assert 1.4 < xla_8k / xla_4k < 2.6, (xla_4k, xla_8k)
