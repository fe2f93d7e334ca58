"""The issue-15 registry entries (Titans MAC/MAG/MAL, selective, MoH, CCA, RCMHA, local linear):
each layer is its stage-1 function of :mod:`attn_jax.mechanisms` on the layer's own weights
(compared with the functions' oracles, on non-trivial weights); MoH's load-balancing loss
reaches the training loss and its gradient; bad configs fail with the mechanism's name.

(Decoding equals the full call, one training step moves every parameter and every parameter
has logical axes: ``tests/layers/test_registry.py``, parametrised over all entries.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import layers
from attn_jax import masks
from attn_jax import mechanisms
from attn_jax import models
from attn_jax.layers import registry
from tests import tolerances

DIM, B, T = 32, 2, 12
NEW = ("titans_mac", "titans_mag", "titans_mal", "selective", "moh", "compressed_conv", "rcmha", "local_linear")


def _x(seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (B, T, DIM), jnp.float32)


def _randomize(layer, names, seed=7, scale=0.3):
  """Sets the parameters ``names`` (zero or identity at initialisation) to random values, so that
  the comparison exercises them."""
  for i, name in enumerate(names):
    p = getattr(layer, name)
    p.set_value(p[...] + scale * jax.random.normal(jax.random.PRNGKey(seed + i), p[...].shape, p[...].dtype))


def _build(name, **fields):
  cfg = layers.mixer_config(name, num_heads=fields.pop("num_heads", 2), **fields)
  return layers.build_mixer(cfg, DIM, rngs=nnx.Rngs(0))


def _positions():
  return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def test_every_issue_15_name_is_registered():
  assert set(NEW) <= set(layers.mixer_names())
  for name in NEW:
    entry = layers.mixer_entry(name)
    assert entry.quality, f"{name} has no quality preset"
    assert entry.efficiency, f"{name} has no efficiency preset"


@pytest.mark.parametrize("name,fields", [
    ("titans_mac", dict(segment_len=4, chunk_size=4)),
    pytest.param("titans_mag", dict(window=5, chunk_size=4), marks=pytest.mark.slow),
    ("titans_mal", dict(window=5, chunk_size=4, num_kv_heads=1)),
    # Miras options pass through the registry config to the memory (materialised chunk form).
    ("titans_mag", dict(window=5, chunk_size=4, objective="huber", retention="lq", memory_hidden=())),
])
def test_titans_layer_is_the_stage1_block_on_its_weights(name, fields):
  layer = _build(name, **fields)
  params = layer.params()
  expected_tree = mechanisms.init_titans(jax.random.PRNGKey(0), layer.block_config)
  assert jax.tree.structure(params) == jax.tree.structure(expected_tree)
  assert layer.block_config.spec.objective == fields.get("objective", "l2")
  x = _x()
  out = jax.jit(lambda x: layer(x, positions=_positions()))(x)
  ref = mechanisms.titans_block(params, x, layer.block_config, implementation="reference")
  tolerances.assert_close(out, ref, jnp.float32, name, factor=4)


@pytest.mark.parametrize("name", ["titans_mal", "titans_mag"])
def test_titans_memory_stays_bounded_on_unit_rms_inputs(name):
  """What the block's pre-norm feeds the mixer: unit-RMS tokens, here 256 of them, mostly one
  repeated "blank" token (the chunked memory's worst case: equal gradients add up within a
  chunk). With the registry's defaults the memory's answers stay bounded (a step of 0.02 with
  chunks of 8 or 16 diverges to inf here)."""
  layer = _build(name, num_heads=4)
  rows = jax.random.normal(jax.random.PRNGKey(0), (5, DIM))
  ids = jnp.where(jax.random.uniform(jax.random.PRNGKey(1), (1, 256)) < 0.8, 0,
                  jax.random.randint(jax.random.PRNGKey(2), (1, 256), 1, 5))
  x = rows[ids]
  y = jax.jit(lambda x: layer(x))(x)
  assert np.isfinite(np.asarray(y)).all() and float(jnp.abs(y).max()) < 100.0


def test_selective_layer_is_the_stage1_function_on_its_weights():
  layer = _build("selective", num_kv_heads=1)
  _randomize(layer, ["temp_kernel", "position_scale", "value_kernel"])
  x, pos = _x(), _positions()
  out = layer(x, positions=pos)
  q, k, v = layer.proj.qkv(x)
  rot = lambda a: layers.apply_rope(a, pos)  # noqa: E731
  tau = mechanisms.selective_temperature(x @ layer.temp_kernel[...], pos, jax.nn.softplus(layer.position_scale[...]))
  nu = 2.0 * jax.nn.sigmoid(x @ layer.value_kernel[...])
  ref = mechanisms.selective_attention_reference(rot(q), rot(k), v, tau, value_temperature=nu, mask=masks.causal())
  tolerances.assert_close(out, layer.proj.o_proj(ref), jnp.float32, "selective")
  # The temperatures matter: plain attention differs.
  plain = mechanisms.selective_attention_reference(rot(q), rot(k), v, jnp.ones_like(tau), mask=masks.causal())
  assert not np.allclose(out, layer.proj.o_proj(plain), atol=1e-3)


def test_moh_layer_is_the_stage1_function_and_returns_its_balance_loss():
  layer = _build("moh", num_heads=4, num_shared_heads=2, top_k=1, balance_weight=0.5, rope=0)
  x = _x()
  out = layer(x, positions=_positions())
  assert isinstance(out, layers.MixerOutput)
  q, k, v = layer.proj.qkv(x)
  g = mechanisms.moh_gates(layer.router(x), 1, shared_logits=layer.shared_router(x), mix_logits=layer.mix(x))
  ref = mechanisms.moh_attention_reference(q, k, v, g.gates, mask=masks.causal())
  tolerances.assert_close(out.y, layer.proj.o_proj(ref), jnp.float32, "moh")
  np.testing.assert_allclose(out.aux_losses["moh_load_balance"], 0.5 * g.load_balance_loss, rtol=1e-6)
  # Per token: 2 shared heads and exactly 1 routed head carry weight.
  assert (np.asarray(g.gates[..., 2:] > 0).sum(-1) == 1).all() and (np.asarray(g.gates[..., :2]) > 0).all()


def test_moh_balance_loss_reaches_the_training_loss_and_the_router():
  def model_and_loss(weight):
    cfg = models.lm.tiny(num_layers=1, schedule=layers.mixer_config("moh", num_heads=4, balance_weight=weight))
    model = models.DecoderLM(cfg, rngs=nnx.Rngs(0))
    batch = {"tokens": jax.random.randint(jax.random.PRNGKey(3), (2, 9), 0, cfg.vocab_size)}
    return model, batch

  model, batch = model_and_loss(1.0)
  logits, aux = model(batch["tokens"][:, :-1], return_aux=True)
  ce = jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), batch["tokens"][:, 1:, None], -1))
  assert set(aux) == {"moh_load_balance"} and float(aux["moh_load_balance"]) > 0
  np.testing.assert_allclose(model.loss(batch), ce + aux["moh_load_balance"], rtol=1e-5)

  def router_grad(weight):
    model, batch = model_and_loss(weight)
    graphdef, params = nnx.split(model, nnx.Param)
    grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p).loss(batch)))(params)
    return np.asarray(grads["blocks"][0]["mixer"]["router"]["kernel"][...])

  # The balance term trains the router: its gradient changes with the weight.
  assert not np.allclose(router_grad(1.0), router_grad(0.0), atol=1e-6)


def test_compressed_conv_layer_is_the_stage1_function_on_its_weights():
  layer = _build("compressed_conv", num_heads=4, num_kv_heads=2, compression=2, rope=1)
  _randomize(layer, ["conv1_q", "conv1_k", "conv2_q", "conv2_k"])
  x, pos = _x(), _positions()
  out = layer(x, positions=pos)
  q, k, v = layer.latents(x)
  rope = lambda a, b: (layers.apply_rope(a, pos), layers.apply_rope(b, pos))  # noqa: E731
  ref = mechanisms.compressed_conv_attention(q, k, v, *layer.conv_params(), mask=masks.causal(), rope=rope,
                                             reference=True)
  tolerances.assert_close(out, layer.proj.o_proj(ref), jnp.float32, "compressed_conv")
  # Latent widths: q [.., 4 heads, 8 // 2], the value shift from its second projection.
  assert q.shape == (B, T, 4, 4) and k.shape == v.shape == (B, T, 2, 4)


def test_rcmha_layer_is_the_stage1_function_on_its_weights():
  layer = _build("rcmha", num_heads=2, relative_features=3)
  _randomize(layer, ["conv_q", "conv_k", "conv_v", "u", "w"])
  x = _x()
  out = layer(x, positions=_positions())
  q, k, v = layer.proj.qkv(x)
  ref = mechanisms.rcmha_attention(q, k, v, *layer.position_params(), reference=True)
  tolerances.assert_close(out, layer.proj.o_proj(ref), jnp.float32, "rcmha")


@pytest.mark.parametrize("causal", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_local_linear_layer_is_the_stage1_function_on_its_weights(causal):
  layer = _build("local_linear", num_heads=4, num_kv_heads=2, ridge=0.5, causal=causal)
  x = _x()
  out = layer(x, positions=_positions())
  q, k, v = layer.proj.qkv(x)
  ref = mechanisms.local_linear_attention_reference(q, k, v, ridge=0.5, mask=masks.causal() if causal else None)
  tolerances.assert_close(out, layer.proj.o_proj(ref), jnp.float32, "local_linear", factor=4)


@pytest.mark.parametrize("name", ["selective", pytest.param("moh", marks=pytest.mark.slow)])
def test_segment_ids_keep_documents_apart(name):
  layer = _build(name, num_heads=4)
  x = _x()
  seg = jnp.broadcast_to((jnp.arange(T) >= 5).astype(jnp.int32), (B, T))
  pos = jnp.where(seg == 0, jnp.arange(T), jnp.arange(T) - 5)
  y = registry.split_output(layer(x, positions=pos, segment_ids=seg))[0]
  second = registry.split_output(layer(x[:, 5:], positions=pos[:, 5:]))[0]
  tolerances.assert_close(y[:, 5:], second, jnp.float32, name)


@pytest.mark.parametrize("name", ["titans_mag", "compressed_conv", "rcmha", "local_linear"])
def test_mixers_without_packing_refuse_segment_ids(name):
  layer = _build(name)
  with pytest.raises(ValueError, match="segment_ids"):
    layer(_x(), positions=_positions(), segment_ids=jnp.zeros((B, T), jnp.int32))


@pytest.mark.parametrize("name,fields,match", [
    ("titans_mac", dict(segment_len=20, chunk_size=8), "segment_len \\(20\\) must be a multiple of spec.chunk_size"),
    ("titans_mag", dict(objective="l1"), "objective must be one of"),
    ("titans_mal", dict(retention="l3"), "retention must be one of"),
    ("titans_mag", dict(causal=False), "is causal only"),
    ("titans_mag", dict(memory_hidden=[16]), "memory_hidden must be a tuple"),
    ("moh", dict(num_heads=4, num_shared_heads=3), "num_shared_heads must be None or an int in \\[0, num_heads - 2"),
    ("moh", dict(num_heads=4, top_k=4), "top_k must be None or an int in \\[1, 3\\]"),
    ("moh", dict(balance_weight=-1.0), "balance_weight must be a float >= 0"),
    ("selective", dict(value_temperature=1), "value_temperature must be a bool"),
    ("compressed_conv", dict(compression=0), "compression must be a positive int"),
    ("rcmha", dict(causal=False), "is causal only"),
    ("local_linear", dict(ridge=0.0), "ridge must be a positive float"),
])
def test_bad_configs_name_the_mechanism(name, fields, match):
  with pytest.raises(layers.UnsupportedConfigError, match=f"mixer '{name}': .*{match}"):
    layers.mixer_config(name, **fields)


def test_compressed_conv_latent_width_is_checked_at_construction():
  with pytest.raises(layers.UnsupportedConfigError, match="latent head width head_dim // compression = 8 // 16 = 0"):
    _build("compressed_conv", num_heads=4, compression=16)


@pytest.mark.parametrize("name", ["selective", "moh"])
def test_prefill_and_decode_equal_the_full_call_with_trained_temperatures(name):
  """At the layer, with temperatures away from their initial 1 (the registry's generic decoding
  test runs on initial weights, where the value temperature is exactly 1)."""
  layer = _build(name, num_heads=4, num_kv_heads=2)
  if name == "selective":
    _randomize(layer, ["temp_kernel", "position_scale", "value_kernel"], scale=1.0)
  x = _x(1)
  full = registry.split_output(layer(x, positions=_positions()))[0]
  prompt = 5
  cache = layer.init_cache(B, T, jnp.float32)
  y, cache = layer.prefill(x[:, :prompt], cache)
  outs = [y]
  step = jax.jit(lambda x, cache, p: layer.decode(x, cache, position=p))
  for t in range(prompt, T):
    y, cache = step(x[:, t:t + 1], cache, jnp.int32(t))
    outs.append(y)
  tolerances.assert_close(jnp.concatenate(outs, axis=1), full, jnp.float32, f"{name}: decode vs full")
