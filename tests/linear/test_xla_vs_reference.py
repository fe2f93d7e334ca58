"""The chunked xla backend against the token-by-token float32 reference: outputs, final state and
the gradients of every input (q, k, v, log decay, initial state).

The cases form a covering design over decay kind x head layout x feature map x normalisation x
segments x initial state x chunk size (dividing the length or not) x dtype, rather than the full
product, to keep CI short.
"""

import jax.numpy as jnp
import pytest

from tests.linear import helpers

CASES = [
    # decay, seq, hq, hkv, d, dv, feature_map, normalize, segments, initial_state, chunk, dtype, decay_heads
    ("none", 63, 4, 2, 8, 8, None, False, False, True, 16, jnp.float32, None),
    ("fixed", 130, 4, 4, 8, 12, None, False, True, True, None, jnp.float32, None),
    ("scalar", 37, 4, 1, 8, 8, "elu_plus_one", True, True, False, 16, jnp.float32, None),
    ("channel", 70, 2, 2, 8, 8, None, False, True, True, 32, jnp.float32, None),
    ("channel", 45, 4, 2, 8, 4, "relu", False, False, False, None, jnp.float32, None),
    ("scalar", 1, 2, 2, 4, 4, "taylor", True, False, True, None, jnp.float32, None),
    ("fixed", 50, 4, 2, 8, 8, None, False, True, False, 16, jnp.float32, 4),
    ("scalar", 100, 4, 2, 16, 16, None, False, True, True, 32, jnp.bfloat16, None),
    ("channel", 64, 2, 1, 8, 8, None, False, False, True, 16, jnp.bfloat16, 2),
    ("none", 40, 2, 2, 4, 8, "taylor", True, True, False, 8, jnp.bfloat16, None),
]


def _segments(batch, seq):
  # Three documents in the first row (one id reused, which must start a new document), one in
  # the second.
  a, b = seq // 3, (2 * seq) // 3
  row = jnp.concatenate([jnp.zeros(a, jnp.int32), jnp.ones(b - a, jnp.int32), jnp.zeros(seq - b, jnp.int32)])
  return jnp.stack([row] + [jnp.full((seq,), 7, jnp.int32)] * (batch - 1))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-T{c[1]}-{c[2]}x{c[3]}-{c[6]}-norm{c[7]}-seg{c[8]}-"
                                                      f"s0{c[9]}-C{c[10]}-{jnp.dtype(c[11]).name}")
def test_xla_matches_reference(case):
  decay, seq, hq, hkv, d, dv, fmap, normalize, segments, s0, chunk, dtype, decay_heads = case
  features = {"taylor": 1 + d + d * d}.get(fmap, d)
  inputs, d_out, d_state = helpers.make_inputs(
      0, 2, seq, hq, hkv, d, dv, dtype, decay=decay, decay_heads=decay_heads, features=features,
      normalize=normalize, initial_state=s0)
  kwargs = dict(feature_map=fmap, normalize=normalize, chunk_size=chunk,
                segment_ids=_segments(2, seq) if segments else None)
  helpers.compare("xla", inputs, d_out, d_state, **kwargs)


def test_default_implementation_on_cpu_is_xla():
  inputs, d_out, d_state = helpers.make_inputs(1, 1, 20, 2, 2, 8, 8, jnp.float32, decay="scalar")
  got = helpers.value_and_grads(inputs, d_out, d_state)
  want = helpers.value_and_grads(inputs, d_out, d_state, implementation="xla")
  for a, b in zip(got[:2], want[:2]):
    assert jnp.array_equal(a, b)
