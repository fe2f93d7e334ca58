"""The content-dependent sparse mixers of issue 14 as registry layers: each layer equals its
mechanism's oracle on the layer's own projections, decoding ones equal their full forward or
their decoding oracle, Routing's centroids are EMA state, and bad sizes fail by name.

(Building from ``mixer_config``, one training step in a DecoderLM and the not-decoding errors are
covered for every entry by tests/layers/test_registry.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn_jax
from attn_jax import layers
from attn_jax import masks
from attn_jax import mechanisms
from tests import tolerances

DIM, BATCH, T = 32, 2, 16
POS = jnp.broadcast_to(jnp.arange(T), (BATCH, T))


def _layer(name, **fields):
  return layers.build_mixer(layers.mixer_config(name, **fields), DIM, rngs=nnx.Rngs(0))


def _x(t=T, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (BATCH, t, DIM))


def _chunk_ids(t, size):
  return jnp.broadcast_to(jnp.arange(t) // size, (BATCH, t))


# name -> (fields, oracle(layer, q, k, v, x) -> [B, T, Hq, Dv]). Sizes leave several blocks per
# sequence, so each layer really selects; GQA (2 query heads per K/V head) where the mechanism has it.
CASES = {
    "block_topk": (dict(num_heads=4, num_kv_heads=2, block_size=4, top_k=1),
                   lambda l, q, k, v, x: mechanisms.topk_block_attention_reference(q, k, v, block_size=4, top_k=1)),
    "hyper": (dict(num_heads=4, num_kv_heads=2, block_size=4, sample_size=3, min_seq_len=4),
              lambda l, q, k, v, x: mechanisms.hyper_attention_reference(
                  q, k, v, *l.hashing(q.shape[-1]), block_size=4, sample_size=3, min_seq_len=4)),
    "landmark": (dict(num_heads=4, num_kv_heads=2, block_size=4, top_k=2),
                 lambda l, q, k, v, x: mechanisms.landmark_attention_reference(
                     q, k, v, l.landmark_keys(x, POS), block_size=4, top_k=2)),
    "power": (dict(num_heads=4, num_kv_heads=2, block_size=2),
              lambda l, q, k, v, x: attn_jax.attention(q, k, v, mask=masks.power_attention(2, 1, 1),
                                                       implementation="reference")),
    "superlinear": (dict(num_heads=4, num_kv_heads=2, span_size=4, top_k=1),
                    lambda l, q, k, v, x: mechanisms.superlinear_attention_reference(q, k, v, span_size=4, top_k=1)),
    "dynamic_mask": (dict(num_heads=4, num_kv_heads=2, window=5, block_size=4),
                     lambda l, q, k, v, x: mechanisms.dynamic_mask_attention_reference(q, k, v, l.bias(v), window=5)),
    "core_context": (dict(num_heads=4, num_kv_heads=2, group_size=2, local_window=4),
                     lambda l, q, k, v, x: mechanisms.core_context_attention_reference(q, k, v, group_size=2,
                                                                                      window=4)),
    "dhsa": (dict(num_heads=4, num_kv_heads=2, chunk_size=3, budget=5, block_q=4, block_kv=4),
             lambda l, q, k, v, x: mechanisms.dhsa_attention_reference(q, k, v, _chunk_ids(T, 3), num_chunks=6,
                                                                       budget=5)),
    "recycled": (dict(num_heads=4, num_kv_heads=2),
                 lambda l, q, k, v, x: attn_jax.attention(q, k, v, mask=masks.causal(), implementation="reference")),
    "routing": (dict(num_heads=4, num_clusters=3, num_local_heads=2, window=3),
                lambda l, q, k, v, x: mechanisms.routing_attention_reference(
                    q, k, v, l.centroids[...], cluster_size=T // 3, num_local_heads=2, local_window=3)),
}


def test_every_sparse_mixer_has_a_case():
  assert set(CASES) == {"block_topk", "hyper", "landmark", "power", "routing", "superlinear", "dynamic_mask",
                        "core_context", "dhsa", "recycled"} <= set(layers.mixer_names())


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_equals_its_mechanism_oracle(name):
  fields, oracle = CASES[name]
  layer = _layer(name, **fields)
  if name == "routing":
    layer.eval()  # the oracle reads the centroids the call used
  x = _x()
  got = jax.jit(lambda x: layer(x, positions=POS))(x)
  q, k, v = layer.project(x, POS)
  want = layer.output(oracle(layer, q, k, v, x))
  tolerances.assert_close(got, want, jnp.float32, name)
  # The selection is not trivial: dense causal attention on the same projections differs.
  dense = layer.output(attn_jax.attention(q, k, v, mask=masks.causal(), implementation="reference"))
  if name != "recycled":  # trains as exact attention by design
    assert float(jnp.abs(got - dense).max()) > 1e-3, f"{name}: equals dense attention at these sizes"


@pytest.mark.slow  # ~15 s on the shared CI machine: a second compile of the HyperAttention recursion
def test_hyper_pads_a_causal_length_the_recursion_cannot_halve():
  layer = _layer("hyper", num_heads=2, block_size=4, sample_size=3, min_seq_len=4)
  t, pad = 13, 3
  assert layer.padded_length(t) == t + pad
  x = _x(t)
  pos = jnp.broadcast_to(jnp.arange(t), (BATCH, t))
  got = jax.jit(lambda x: layer(x, positions=pos))(x)
  q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in layer.project(x, pos))
  want = mechanisms.hyper_attention_reference(q, k, v, *layer.hashing(q.shape[-1]), block_size=4, sample_size=3,
                                              min_seq_len=4)[:, :t]
  tolerances.assert_close(got, layer.output(want), jnp.float32, "hyper padded")


def test_dynamic_mask_decoding_equals_the_full_forward():
  layer = _layer("dynamic_mask", num_heads=4, num_kv_heads=2, window=3, block_size=4)
  x, prompt = _x(), 6
  full = jax.jit(lambda x: layer(x, positions=POS))(x)
  cache = layer.init_cache(BATCH, T, jnp.float32)
  y, cache = jax.jit(layer.prefill)(x[:, :prompt], cache)
  step = jax.jit(layer.decode)
  outs = [y]
  for p in range(prompt, T):
    y, cache = step(x[:, p:p + 1], cache, position=p)
    outs.append(y)
  tolerances.assert_close(jnp.concatenate(outs, 1), full, jnp.float32, "dynamic_mask decode")


@pytest.mark.parametrize("stride,top_k", [(3, 4), (1, 2)])
def test_recycled_decoding_equals_its_oracle(stride, top_k):
  layer = _layer("recycled", num_heads=4, num_kv_heads=2, stride=stride, top_k=top_k)
  x, prompt = _x(), 7
  q, k, v = layer.project(x, POS)
  want = layer.output(mechanisms.recycled_attention_reference(q[:, prompt:], k, v, prompt_len=prompt,
                                                              stride=stride, top_k=top_k))
  cache = layer.init_cache(BATCH, T, jnp.float32)
  _, cache = jax.jit(layer.prefill)(x[:, :prompt], cache)
  step = jax.jit(layer.decode)
  outs = []
  for p in range(prompt, T):
    y, cache = step(x[:, p:p + 1], cache, position=p)
    outs.append(y)
  got = jnp.concatenate(outs, 1)
  tolerances.assert_close(got, want, jnp.float32, "recycled decode")
  # Recycling is not full attention: the steps between full ones differ from the full forward.
  if stride > 1:
    full = jax.jit(lambda x: layer(x, positions=POS))(x)
    assert float(jnp.abs(got - full[:, prompt:]).max()) > 1e-3


def test_routing_centroids_are_ema_state_moved_in_training_and_frozen_in_eval():
  layer = _layer("routing", num_heads=2, num_clusters=2, decay=0.5)
  assert "centroids" not in nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  # The trainers place every variable by its logical axes (replicated here).
  assert layer.centroids.get_metadata()["logical_axes"] == (None, None, None)
  before = layer.centroids[...]
  x = _x()
  layer(x, positions=POS)
  moved = layer.centroids[...]
  assert float(jnp.abs(moved - before).max()) > 1e-3
  np.testing.assert_allclose(np.linalg.norm(moved, axis=-1), 1.0, rtol=1e-5)
  q, k, _ = layer.project(x, POS)
  tolerances.assert_close(moved, mechanisms.routing_update_centroids(before, q, k, decay=0.5), jnp.float32,
                          "EMA step")
  layer.eval()
  layer(x, positions=POS)
  np.testing.assert_array_equal(layer.centroids[...], moved)
  # Under nnx transforms the update persists through jit, and no gradient reaches the centroids.
  layer.train()
  grads = nnx.jit(nnx.grad(lambda m, x: m(x, positions=POS).sum()))(layer, x)
  assert "centroids" not in nnx.to_pure_dict(grads)
  assert float(jnp.abs(layer.centroids[...] - moved).max()) > 1e-4


def test_recycled_budget_larger_than_the_cache_fails_by_name():
  # (Training-time budgets, windows and blocks are capped at the sequence instead: the layers run
  # at any length, and the functions themselves reject budgets beyond it.)
  layer = _layer("recycled", num_heads=2, top_k=20)
  with pytest.raises(ValueError, match="top_k=20 must be at most the cache length max_len = 16"):
    layer.init_cache(1, 16, jnp.float32)


@pytest.mark.parametrize("name,fields,match", [
    ("core_context", dict(group_size=4, local_window=6), r"local_window \(6\) must be a multiple of group_size"),
    ("routing", dict(num_heads=4, num_kv_heads=2), "num_kv_heads must be None or num_heads"),
    ("routing", dict(decay=1.0), r"decay must be a float in \[0, 1\)"),
    ("hyper", dict(num_projections=31), r"num_projections must be in \[1, 30\]"),
    ("landmark", dict(causal=False), "causal only"),
    ("block_topk", dict(top_k=-1), "top_k must be an int >= 0"),
    ("power", dict(sink_blocks=-1), "sink_blocks must be an int >= 0"),
])
def test_invalid_sparse_configs_fail_when_made(name, fields, match):
  with pytest.raises(ValueError, match=match):
    layers.mixer_config(name, **fields)
