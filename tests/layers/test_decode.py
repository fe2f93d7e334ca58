"""Decoding with caches equals full recomputation, per layer, for every mask family and the
short convolution; the rolling cache equals the sliding-window + sink mask and stays bounded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn_jax
from attn_jax import layers
from attn_jax import masks
from attn_jax.layers import cache as cache_lib
from tests import tolerances

DIM = 32
BATCH = 2


def _inputs(t, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (BATCH, t, DIM))


def _full_and_decoded(layer, x, prompt_len, max_len=None):
  """The layer on the whole sequence, and prefill(prompt) + one decode step per later token."""
  t = x.shape[1]

  @jax.jit
  def run(x):
    positions = jnp.broadcast_to(jnp.arange(t), (BATCH, t))
    full = layer(x, positions=positions)
    cache = layer.init_cache(BATCH, max_len or t, jnp.float32)
    y0, cache = layer.prefill(x[:, :prompt_len], cache)

    def step(cache, i):
      y, cache = layer.decode(jax.lax.dynamic_slice_in_dim(x, i, 1, axis=1), cache, position=i)
      return cache, y[:, 0]

    cache, ys = jax.lax.scan(step, cache, jnp.arange(prompt_len, t))
    return full, jnp.concatenate([y0, ys.transpose(1, 0, 2)], axis=1), cache

  return run(x)


_LAYOUT = np.tril(np.ones((4, 4), bool)) & ~np.eye(4, k=-2, dtype=bool)

SOFTMAX_CASES = {
    "causal_gqa_sinks_softcap": dict(num_heads=4, num_kv_heads=2, learned_sinks=True,
                                     logits_soft_cap=5.0),
    "mqa": dict(num_heads=4, num_kv_heads=1),
    "window_sinks_rolling": dict(num_heads=4, num_kv_heads=2, window=3, num_sink_tokens=2),
    "window_full_cache": dict(num_heads=4, window=3, rolling_cache=False),
    "chunked": dict(num_heads=4, chunk_size=4),
    "block_sparse_layout": dict(num_heads=4, mask=masks.block_layout(_LAYOUT, 4, 4) & masks.causal()),
    "prefix_lm": dict(num_heads=4, mask=masks.prefix_lm(3)),
}


@pytest.mark.parametrize("name", sorted(SOFTMAX_CASES))
def test_softmax_decode_equals_full(name):
  cfg = layers.mixer_config("softmax", **SOFTMAX_CASES[name])
  layer = layers.build_mixer(cfg, DIM, rngs=nnx.Rngs(1))
  if cfg.learned_sinks:
    layer.sinks[...] = jnp.array([0.5, -1.0, 2.0, 0.0])
  x = _inputs(14)
  full, decoded, cache = _full_and_decoded(layer, x, prompt_len=5)
  tolerances.assert_close(decoded, full, jnp.float32, name)
  expected_slots = 5 if cfg.uses_rolling_cache else 14
  assert cache.k.shape == (BATCH, expected_slots, cfg.kv_heads, DIM // cfg.num_heads)


def test_rolling_cache_is_the_window_sink_mask_and_bounded():
  n, w, t = 2, 4, 48  # a generation 10x longer than the window
  cfg = layers.mixer_config("softmax", num_heads=4, num_kv_heads=2, window=w, num_sink_tokens=n)
  assert cfg.build_mask() == (masks.sliding_window(w - 1) | masks.sink_tokens(n)) & masks.causal()
  layer = layers.build_mixer(cfg, DIM, rngs=nnx.Rngs(0))
  x = _inputs(t, seed=3)
  empty = layer.init_cache(BATCH, t, jnp.float32)
  _, decoded, cache = _full_and_decoded(layer, x, prompt_len=3)
  assert cache_lib.cache_bytes(cache) == cache_lib.cache_bytes(empty)
  assert cache.k.shape[1] == n + w
  np.testing.assert_array_equal(np.sort(np.asarray(cache.positions)), [0, 1, t - 4, t - 3, t - 2, t - 1])

  # Independent oracle: the layer's projections and RoPE, then the reference backend with the
  # explicit window + sink mask over the whole sequence.
  @jax.jit
  def oracle(x):
    positions = jnp.broadcast_to(jnp.arange(t), (BATCH, t))
    q, k, v = layer._qkv(x)
    q, k = layer._rope(q, positions), layer._rope(k, positions)
    mask = (masks.sliding_window(w - 1) | masks.sink_tokens(n)) & masks.causal()
    return layer.proj.o_proj(attn_jax.attention(q, k, v, mask=mask, implementation="reference"))

  tolerances.assert_close(decoded, oracle(x), jnp.float32, "rolling vs masked")


def test_rolling_cache_fill_keeps_sinks_and_last_window():
  c = cache_lib.KVCache.create(1, 0, 1, 1, 1, jnp.float32, num_sinks=2, window=3)
  k = jnp.arange(9.0).reshape(1, 9, 1, 1)
  filled = c.fill(k, k)
  # Slot 2 + (p - 2) % 3 holds the last position of its residue: 8 -> slot 2, 6 -> 3, 7 -> 4.
  np.testing.assert_array_equal(filled.positions, [0, 1, 8, 6, 7])
  np.testing.assert_array_equal(filled.k[0, :, 0, 0], [0, 1, 8, 6, 7])
  short = c.fill(k[:, :3], k[:, :3])
  np.testing.assert_array_equal(short.positions, [0, 1, 2, -1, -1])
  appended = short.append(k[:, 5:6], k[:, 5:6], 3)
  np.testing.assert_array_equal(appended.positions, [0, 1, 2, 3, -1])


def test_rolling_cache_streaming_llm_positions():
  """rope_in_cache='cache': a step equals attention over [sinks, last window] renumbered 0..n+w-1."""
  n, w, t = 2, 3, 16
  cfg = layers.mixer_config("softmax", num_heads=4, window=w, num_sink_tokens=n, rope_in_cache="cache")
  layer = layers.build_mixer(cfg, DIM, rngs=nnx.Rngs(2))
  x = _inputs(t, seed=5)
  _, decoded, _ = _full_and_decoded(layer, x, prompt_len=4)
  last_output = jax.jit(lambda sub: layer(sub, positions=jnp.arange(sub.shape[1])[None])[:, -1])
  for p in (4, 7, 15):
    idx = list(range(n)) + list(range(max(n, p - w + 1), p + 1))
    expected = last_output(x[:, jnp.array(idx)])
    tolerances.assert_close(decoded[:, p], expected, jnp.float32, f"step {p}")
  with pytest.raises(ValueError, match="at most num_sink_tokens \\+ window = 5"):
    layer.prefill(x[:, :6], layer.init_cache(BATCH, t, jnp.float32))


def test_short_conv_decode_equals_full_and_respects_segments():
  cfg = layers.mixer_config("short_conv", conv_size=3)
  layer = layers.build_mixer(cfg, DIM, rngs=nnx.Rngs(0))
  x = _inputs(9)
  full, decoded, cache = _full_and_decoded(layer, x, prompt_len=4)
  tolerances.assert_close(decoded, full, jnp.float32, "short_conv")
  assert cache.window.shape == (BATCH, 2, DIM)
  # With two packed documents the second one's outputs equal running it alone.
  seg = jnp.broadcast_to((jnp.arange(9) >= 4).astype(jnp.int32), (BATCH, 9))
  packed = jax.jit(lambda x, seg: layer(x, segment_ids=seg))(x, seg)
  alone = jax.jit(lambda x: layer(x))(x[:, 4:])
  tolerances.assert_close(packed[:, 4:], alone, jnp.float32, "segments")


@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_decode_equals_full(causal):
  cfg = layers.mixer_config("softmax", num_heads=4, num_kv_heads=2, causal=causal, rope=0)
  layer = layers.CrossAttention(cfg, DIM, rngs=nnx.Rngs(0), memory_dim=16)
  x = _inputs(6)
  memory = jax.random.normal(jax.random.PRNGKey(9), (BATCH, 8, 16))
  memory_mask = jnp.arange(8)[None] < jnp.array([[8], [5]])

  @jax.jit
  def run(x, memory):
    full = layer(x, memory, memory_mask=memory_mask)
    cache = layer.init_cache(memory)
    steps = [layer.decode(x[:, i:i + 1], cache, position=i, memory_mask=memory_mask) for i in range(6)]
    return full, jnp.concatenate(steps, axis=1)

  full, steps = run(x, memory)
  tolerances.assert_close(steps, full, jnp.float32, "cross")
  # Causal cross: position 0 sees only memory 0, so changing memory 1.. leaves it unchanged.
  out0 = run(x, memory.at[:, 1:].add(1.0))[0][:, 0]
  if causal:
    tolerances.assert_close(out0, full[:, 0], jnp.float32, "causal cross row 0")
  else:
    assert not np.allclose(out0, full[:, 0], atol=1e-3)


def test_decode_rejects_head_dependent_mask():
  mask = masks.from_fn(lambda q, k, h: (k <= q) & (h >= 0))
  layer = layers.build_mixer(layers.mixer_config("softmax", num_heads=4, mask=mask), DIM, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="head-independent"):
    layer.init_cache(BATCH, 8, jnp.float32)
