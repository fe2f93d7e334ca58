"""generate(): cached decoding equals full recomputation for the LM and the encoder-decoder;
the rolling cache stays bounded; sampling obeys temperature, top-k and top-p; ragged prompts
equal row-by-row generation for every cache type; EOS pads rows."""

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
  cfg = models.lm.tiny(schedule=layers.mixer_config("softmax", num_heads=4, num_kv_heads=2, learned_sinks=True))
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
  attn = layers.mixer_config("softmax", num_heads=4, num_kv_heads=2, window=w, num_sink_tokens=n)
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
  schedule = (layers.mixer_config("short_conv", conv_size=3),
              layers.mixer_config("softmax", num_heads=4, window=3),
              layers.mixer_config("softmax", num_heads=4, num_kv_heads=1, chunk_size=4))
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


# Ragged prompts and EOS. Lengths [3, 7, 5] padded to 7: the common prefix (3) is prefilled and
# rows 1 and 2 are teacher-forced through 4 and 2 decode steps while row 0 already generates.
RAGGED = [3, 7, 5]


def _padded(lengths, vocab_size, seed):
  """Right-padded prompts whose padding is random valid tokens (so reading it would show)."""
  prompt = jax.random.randint(jax.random.PRNGKey(seed), (len(lengths), max(lengths)), 0, vocab_size)
  return prompt.astype(jnp.int32)


def _check_ragged_equals_rows(model, lengths, new_tokens, seed=1, **inputs):
  prompt = _padded(lengths, model.config.vocab_size, seed)
  tokens, logits = models.generate(model, prompt, max_new_tokens=new_tokens, prompt_lengths=lengths,
                                   return_logits=True, **inputs)
  assert tokens.shape == (len(lengths), new_tokens)
  for r, n in enumerate(lengths):
    row_inputs = {k: v[r:r + 1] for k, v in inputs.items()}
    want, want_logits = models.generate(model, prompt[r:r + 1, :n], max_new_tokens=new_tokens,
                                        return_logits=True, **row_inputs)
    np.testing.assert_array_equal(tokens[r], want[0], err_msg=f"row {r} (prompt length {n})")
    tolerances.assert_close(logits[r], want_logits[0], jnp.float32, f"row {r} logits")


RAGGED_LMS = {
    "dense": lambda: models.lm.tiny(),
    # Capacity 2 + 3 = 5 slots: the 7-token prompt and the generation both evict.
    "rolling_sinks": lambda: models.lm.tiny(schedule=layers.mixer_config(
        "softmax", num_heads=4, num_kv_heads=2, window=3, num_sink_tokens=2)),
    "linear_conv_softmax_hybrid": lambda: models.lm.tiny(num_layers=3, schedule=(
        layers.mixer_config("linear", num_heads=4, decay="data"),
        layers.mixer_config("short_conv", conv_size=3),
        layers.mixer_config("softmax", num_heads=4, num_kv_heads=2))),
    # Based's three caches (convolution window, Taylor state, rolling window of 3 slots).
    "based": lambda: models.lm.tiny(schedule=layers.mixer_config("based", num_heads=2, feature_dim=4, window=3)),
}


@pytest.mark.parametrize("name", list(RAGGED_LMS))
def test_lm_ragged_prompts_equal_row_by_row_generation(name):
  model = models.DecoderLM(RAGGED_LMS[name](), rngs=nnx.Rngs(0))
  _check_ragged_equals_rows(model, RAGGED, new_tokens=6)


def test_encdec_ragged_prompts_equal_row_by_row_generation():
  cfg = models.encdec.tiny()
  cfg = cfg.replace(cross=cfg.cross.replace(causal=True))
  model = models.EncoderDecoder(cfg, rngs=nnx.Rngs(0))
  source = jax.random.randint(jax.random.PRNGKey(3), (3, 6), 0, cfg.vocab_size)
  source_mask = jnp.arange(6)[None] < jnp.array([[6], [4], [5]])
  # Length 1: the common prefix is a single token.
  _check_ragged_equals_rows(model, [1, 4, 3], new_tokens=5, source=source, source_mask=source_mask)


def test_eos_pads_rows_and_reports_lengths():
  cfg = models.lm.tiny()
  model = models.DecoderLM(cfg, rngs=nnx.Rngs(0))
  prompt, new = _padded(RAGGED, cfg.vocab_size, seed=1), 8
  free, free_logits, free_cache = models.generate(model, prompt, max_new_tokens=new,
                                                  prompt_lengths=RAGGED, return_logits=True,
                                                  return_cache=True)
  free = np.asarray(free)
  # An EOS the greedy run produces in row 0 (not as its last token) and never in row 1.
  eos = next(int(tok) for tok in free[0, :-1] if tok not in free[1])
  pad = (eos + 1) % cfg.vocab_size
  tokens, logits, cache, lengths = models.generate(
      model, prompt, max_new_tokens=new, prompt_lengths=RAGGED, eos_id=eos, pad_id=pad,
      return_logits=True, return_cache=True, return_lengths=True)
  want, want_lengths = free.copy(), []
  for r in range(len(RAGGED)):
    hits = np.flatnonzero(free[r] == eos)
    want_lengths.append(hits[0] + 1 if hits.size else new)
    want[r, want_lengths[-1]:] = pad
  np.testing.assert_array_equal(tokens, want)
  np.testing.assert_array_equal(lengths, want_lengths)
  assert lengths.dtype == jnp.int32 and lengths[0] < new and lengths[1] == new
  assert (np.asarray(tokens[0, lengths[0]:]) == pad).all() and tokens[0, lengths[0] - 1] == eos
  # The loop runs all steps: logits and cache are those of the unmasked run.
  np.testing.assert_array_equal(logits, free_logits)
  jax.tree.map(np.testing.assert_array_equal, cache, free_cache)
  # Without eos_id every row has max_new_tokens; equal lengths take the equal-length program.
  _, plain_lengths = models.generate(model, prompt, max_new_tokens=new, return_lengths=True)
  np.testing.assert_array_equal(plain_lengths, [new] * 3)
  full = models.generate(model, prompt, max_new_tokens=new, prompt_lengths=np.full(3, 7))
  np.testing.assert_array_equal(full, models.generate(model, prompt, max_new_tokens=new))


def test_ragged_sampling_is_reproducible_and_checks_arguments():
  cfg = models.lm.tiny()
  model = models.DecoderLM(cfg, rngs=nnx.Rngs(0))
  prompt = _padded(RAGGED, cfg.vocab_size, seed=1)
  kw = dict(max_new_tokens=4, prompt_lengths=RAGGED, temperature=0.8, top_k=10)
  a = models.generate(model, prompt, rng=jax.random.PRNGKey(1), **kw)
  b = models.generate(model, prompt, rng=jax.random.PRNGKey(1), **kw)
  np.testing.assert_array_equal(a, b)
  bad_lengths = [("must have shape \\[batch\\] = \\(3,\\)", [3, 7]),
                 ("must have shape \\[batch\\] = \\(3,\\)", 5),
                 ("must hold integers", [3.0, 7.0, 5.0]), ("must hold integers", np.ones(3, bool)),
                 ("must be in \\[1, 7\\]", [0, 7, 5]), ("must be in \\[1, 7\\]", [3, 8, 5])]
  for match, lengths in bad_lengths:
    with pytest.raises(ValueError, match="prompt_lengths " + match):
      models.generate(model, prompt, max_new_tokens=2, prompt_lengths=lengths)
  with pytest.raises(ValueError, match="prompt_lengths must be concrete"):
    jax.jit(lambda n: models.generate(model, prompt, max_new_tokens=2, prompt_lengths=n))(jnp.array(RAGGED))
  for bad in (-1, cfg.vocab_size, 1.5, True, "2"):
    with pytest.raises(ValueError, match="eos_id must be an int token id in \\[0, 64\\) or None"):
      models.generate(model, prompt, max_new_tokens=2, eos_id=bad)
    with pytest.raises(ValueError, match="pad_id must be an int token id in \\[0, 64\\)"):
      models.generate(model, prompt, max_new_tokens=2, eos_id=1, pad_id=bad)
