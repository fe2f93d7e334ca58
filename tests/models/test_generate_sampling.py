"""generate()'s sampling randomness: the caller's key decides the tokens, and every decode step
draws fresh randomness.

Comparing two runs with the same key (test_generate.py) passes just as well when the key is
ignored. Here the model's parameters are all zero, so its logits are zero whatever the context and
every sampled token is uniform over the vocabulary: different keys must give different tokens,
and a row's tokens must vary from step to step (a step that reused the previous key would draw
the same token again, since its logits are the same).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn_jax import models


def _uniform_lm():
  model = models.DecoderLM(models.lm.tiny(), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(jnp.zeros_like, params))
  return model


def _sample(model, seed, new_tokens=12):
  prompt = jnp.zeros((2, 3), jnp.int32)
  tokens, logits = models.generate(model, prompt, max_new_tokens=new_tokens, temperature=1.0,
                                   rng=jax.random.PRNGKey(seed), return_logits=True)
  # The premise: every step's distribution is uniform.
  np.testing.assert_array_equal(logits, 0.0)
  return np.asarray(tokens)


def test_sampling_follows_the_key():
  model = _uniform_lm()
  a, b, c = _sample(model, 1), _sample(model, 1), _sample(model, 2)
  np.testing.assert_array_equal(a, b)
  # 24 uniform draws over 64 tokens coincide with probability 64^-24 by chance.
  assert (a != c).any(), "different keys gave the same tokens"


def test_each_step_draws_fresh_randomness():
  model = _uniform_lm()
  tokens = _sample(model, 3)
  vocab = model.config.vocab_size
  for row in tokens:
    # 12 uniform draws over 64 tokens have ~11 distinct values; a key reused across steps
    # repeats one token.
    assert len(set(row.tolist())) >= 6, row
  assert tokens.min() >= 0 and tokens.max() < vocab
  assert (tokens[0] != tokens[1]).any(), "rows must draw independently"
