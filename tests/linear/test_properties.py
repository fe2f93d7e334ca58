"""Hypothesis: random shapes, decays, chunk sizes and segments; xla forward == reference forward."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np

import attn_jax
from tests import tolerances
from tests.linear import helpers


@hypothesis.settings(max_examples=8)
@hypothesis.given(
    seq=st.integers(1, 80),
    heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]),
    dims=st.sampled_from([(4, 4), (8, 4), (4, 12)]),
    decay=st.sampled_from(helpers.DECAYS),
    chunk=st.sampled_from([None, 8, 16, 24, 40]),
    cuts=st.lists(st.integers(1, 79), max_size=3),
    normalize=st.booleans(),
)
def test_xla_forward_matches_reference(seq, heads, dims, decay, chunk, cuts, normalize):
  (hq, hkv), (d, dv) = heads, dims
  inputs, _, _ = helpers.make_inputs(seq, 1, seq, hq, hkv, d, dv, jnp.float32, decay=decay,
                                     normalize=normalize, initial_state=True)
  ids = np.zeros((1, seq), np.int32)
  for c in cuts:
    ids[:, c:] += 1
  kw = dict(segment_ids=jnp.asarray(ids), normalize=normalize, feature_map="elu_plus_one" if normalize else None,
            return_final_state=True)
  fn = lambda impl, chunk_size: jax.jit(
      lambda i: attn_jax.linear_attention(**i, implementation=impl, chunk_size=chunk_size, **kw))
  got = fn("xla", chunk)(inputs)
  want = fn("reference", None)(inputs)
  tolerances.assert_close(got[0], want[0], jnp.float32, "out")
  tolerances.assert_close(got[1], want[1], jnp.float32, "state")
