"""generate(): cached decoding equals full recomputation for the LM and the encoder-decoder;
the rolling cache stays bounded; sampling obeys temperature, top-k and top-p."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import layers
from attn_jax import models
from attn_jax import sharding
from attn_jax.layers import cache as cache_lib
from tests import tolerances


def _check_lm(cfg, prompt_len, new_tokens, seed=0):
  model = models.DecoderLM(cfg, rngs=nnx.Rngs(seed))
  prompt = jax.random.randint(jax.random.PRNGKey(seed + 1), (2, prompt_len), 0, cfg.vocab_size)
  tokens, logits, cache = models.generate(model, prompt, max_new_tokens=new_tokens,
                                          return_logits=True, return_cache=True)
  assert tokens.shape == (2, new_tokens) and logits.shape == (2, new_tokens, cfg.vocab_size)
  seq = jnp.concatenate([prompt, tokens[:, :-1]], axis=1)
  full = jax.jit(lambda t: model(t))(seq)
  tolerances.assert_close(logits, full[:, prompt_len - 1:], jnp.float32, "decode vs full")
  # Greedy: each token is the argmax of the logits that produced it.
  np.testing.assert_array_equal(tokens, jnp.argmax(logits, -1))
  return model, cache


def test_lm_dense_gqa_decode_equals_full_and_shards():
  cfg = models.lm.tiny(schedule=layers.AttentionConfig(num_heads=4, num_kv_heads=2, learned_sinks=True))
  model, cache = _check_lm(cfg, prompt_len=5, new_tokens=6)
  assert all(isinstance(c, layers.KVCache) and c.capacity == 11 for c in cache)
  # The same generation on a data x tensor mesh: caches split by batch and KV heads.
  mesh = sharding.make_mesh(data=2, tensor=2, devices=jax.devices()[:4])
  prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, cfg.vocab_size)
  tokens, logits = models.generate(model, prompt, max_new_tokens=6, return_logits=True)
  s_tokens, s_logits, s_cache = models.generate(model, prompt, max_new_tokens=6, return_logits=True,
                                                return_cache=True, mesh=mesh)
  np.testing.assert_array_equal(s_tokens, tokens)
  tolerances.assert_close(s_logits, logits, jnp.float32, "sharded generate")
  assert s_cache[0].k.sharding.spec == jax.sharding.PartitionSpec("data", None, "tensor")


def test_lm_rolling_cache_bounded_over_10x_window():
  n, w, new = 2, 4, 44  # 44 generated tokens: 11x the window
  attn = layers.AttentionConfig(num_heads=4, num_kv_heads=2, window=w, num_sink_tokens=n)
  cfg = models.lm.tiny(schedule=attn)
  model, cache = _check_lm(cfg, prompt_len=3, new_tokens=new)
  empty = model.init_cache(2, 3 + new)
  assert cache_lib.cache_bytes(cache) == cache_lib.cache_bytes(empty)
  assert cache_lib.cache_bytes(model.init_cache(2, 10_000)) == cache_lib.cache_bytes(empty)
  for c in cache:
    assert c.k.shape == (2, n + w, 2, 8)
    np.testing.assert_array_equal(np.sort(np.asarray(c.positions)), [0, 1] + list(range(3 + new - 1 - w, 3 + new - 1)))


def test_lm_based_like_hybrid_decode_equals_full():
  """Short convolution, sliding-window softmax (rolling) and chunked softmax layers in one model."""
  schedule = (layers.AttentionConfig(mechanism="short_conv", conv_size=3),
              layers.AttentionConfig(num_heads=4, window=3),
              layers.AttentionConfig(num_heads=4, num_kv_heads=1, chunk_size=4))
  _, cache = _check_lm(models.lm.tiny(num_layers=3, schedule=schedule), prompt_len=4, new_tokens=7)
  assert [type(c).__name__ for c in cache] == ["ConvCache", "KVCache", "KVCache"]
  assert cache[1].capacity == 3 and cache[2].capacity == 11


@pytest.mark.parametrize("causal_cross", [False, True])
def test_encdec_decode_equals_full(causal_cross):
  cfg = models.encdec.tiny()
  cfg = cfg.replace(cross=cfg.cross.replace(causal=causal_cross))
  model = models.EncoderDecoder(cfg, rngs=nnx.Rngs(0))
  source = jax.random.randint(jax.random.PRNGKey(3), (2, 7), 0, cfg.vocab_size)
  source_mask = jnp.arange(7)[None] < jnp.array([[7], [4]])
  prompt = jax.random.randint(jax.random.PRNGKey(4), (2, 2), 0, cfg.vocab_size)
  tokens, logits = models.generate(model, prompt, max_new_tokens=5, return_logits=True,
                                   source=source, source_mask=source_mask)
  target = jnp.concatenate([prompt, tokens[:, :-1]], axis=1)
  full = jax.jit(lambda s, t, m: model(s, t, source_mask=m))(source, target, source_mask)
  tolerances.assert_close(logits, full[:, 1:], jnp.float32, "encdec decode vs full")


def test_sampling_top_k_top_p_temperature():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.PRNGKey(0)
  sample = jax.jit(models.sample_logits, static_argnames=("temperature", "top_k", "top_p"))
  counts = lambda t: np.bincount(np.asarray(t), minlength=4) / t.shape[0]
  np.testing.assert_allclose(counts(sample(logits, keys, temperature=1.0)), [0.5, 0.3, 0.15, 0.05], atol=0.03)
  top2 = counts(sample(logits, keys, temperature=1.0, top_k=2))
  assert top2[2:].sum() == 0
  np.testing.assert_allclose(top2[:2], [0.625, 0.375], atol=0.03)
  # Nucleus 0.7: {0.5, 0.3} reach it (the mass before token 1 is 0.5 < 0.7, before token 2 is 0.8).
  nucleus = counts(sample(logits, keys, temperature=1.0, top_p=0.7))
  assert nucleus[2:].sum() == 0 and nucleus[1] > 0.3
  assert counts(sample(logits, keys, temperature=1.0, top_p=0.1))[0] == 1.0
  assert counts(sample(logits, keys, temperature=1.0, top_k=1))[0] == 1.0
  cold = counts(sample(logits, keys, temperature=0.05))
  assert cold[0] > 0.99
  np.testing.assert_array_equal(sample(logits[:3], keys, temperature=0.0), [0, 0, 0])


def test_generate_sampling_is_reproducible_and_checks_arguments():
  cfg = models.lm.tiny()
  model = models.DecoderLM(cfg, rngs=nnx.Rngs(0))
  prompt = jnp.zeros((2, 3), jnp.int32)
  kw = dict(max_new_tokens=4, temperature=0.8, top_k=10, top_p=0.9)
  a = models.generate(model, prompt, rng=jax.random.PRNGKey(1), **kw)
  b = models.generate(model, prompt, rng=jax.random.PRNGKey(1), **kw)
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="rng is required"):
    models.generate(model, prompt, max_new_tokens=2, temperature=1.0)
  with pytest.raises(ValueError, match="top_p must be in \\(0, 1\\]"):
    models.generate(model, prompt, max_new_tokens=2, top_p=1.5)
  with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
    models.generate(model, prompt, max_new_tokens=0)
  with pytest.raises(ValueError, match="prompt must have shape"):
    models.generate(model, prompt[0], max_new_tokens=2)
