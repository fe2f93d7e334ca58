"""Compiled-memory properties of the chunked xla backend (a count, not a timing)."""

import jax
import jax.numpy as jnp

import attn_jax

# Bytes of one [1, 8192, 2, 32] float32 array; a forward + backward call takes q, k, v, log_decay
# and returns as many gradients.
_ARRAY_8K = 8192 * 2 * 32 * 4


def _temp_bytes(implementation, seq, decay):
  q = jax.ShapeDtypeStruct((1, seq, 2, 32), jnp.float32)
  g = {"scalar": jax.ShapeDtypeStruct((1, seq, 2), jnp.float32),
       "channel": jax.ShapeDtypeStruct((1, seq, 2, 32), jnp.float32)}[decay]

  def loss(q, k, v, g):
    return attn_jax.linear_attention(q, k, v, log_decay=g, implementation=implementation).sum()

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(q, q, q, g).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_forward_backward_memory_is_linear_in_length():
  xla_4k = _temp_bytes("xla", 4096, "scalar")
  xla_8k = _temp_bytes("xla", 8192, "scalar")
  # O(T): doubling the sequence about doubles the temporaries (quadratic would be 4x).
  assert 1.6 < xla_8k / xla_4k < 2.4, (xla_4k, xla_8k)
  # The temporaries (chunk states: T/C * 32 * 32 floats per head; chunk-local scores: T * C per
  # head; internal layouts of q, k, v) stay within a small multiple of one input.
  assert xla_8k < 30 * _ARRAY_8K, xla_8k
  # The token-by-token reference saves one 32 x 32 state per token for its backward pass.
  ref_8k = _temp_bytes("reference", 8192, "scalar")
  assert ref_8k > 8192 * 2 * 32 * 32 * 4
  assert xla_8k < ref_8k / 3, (xla_8k, ref_8k)


def test_per_channel_decay_memory_is_bounded():
  # Per-channel scores are formed by groups of chunks (lax.map), so their temporaries do not
  # scale with T * C * K.
  assert _temp_bytes("xla", 8192, "channel") < 30 * _ARRAY_8K
