"""The wiring of the linear and neighborhood mixers, exercised through stand-in primitives with
the interfaces of issues 4/5 (the registry itself: tests/layers/test_registry.py).

The stand-ins are naive (a token-by-token recurrence; a dense NATTEN-semantics mask) and are
installed with monkeypatch only for these tests, so the same tests keep checking the layers'
wiring once the real primitives land.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn_jax
from attn_jax import layers
from attn_jax import masks
from attn_jax import models
from tests import tolerances


def test_plain_import_does_not_import_flax():
  code = ("import sys, attn_jax, attn_jax.sharding; "
          "bad = [m for m in ('flax', 'optax') if m in sys.modules]; "
          "assert not bad, bad; print('ok')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _phi(name):
  return {"identity": lambda x: x, "elu_plus_one": lambda x: jax.nn.elu(x) + 1.0}[name]


def fake_linear_step(state, q, k, v, log_decay, *, feature_map, normalize):
  """One step of S = a S + phi(k) v^T, z = a z + phi(k); o = phi(q) S (/ phi(q) z)."""
  s, z = state
  g = q.shape[1] // k.shape[1]
  k, v = jnp.repeat(k, g, axis=1), jnp.repeat(v, g, axis=1)
  phi = _phi(feature_map)
  fq, fk = phi(q.astype(jnp.float32)), phi(k.astype(jnp.float32))
  a = jnp.ones(q.shape[:2], jnp.float32) if log_decay is None else jnp.broadcast_to(jnp.exp(log_decay), q.shape[:2])
  s = a[..., None, None] * s + fk[..., :, None] * v.astype(jnp.float32)[..., None, :]
  z = a[..., None] * z + fk
  o = jnp.einsum("bhd,bhde->bhe", fq, s)
  if normalize:
    o = o / (jnp.einsum("bhd,bhd->bh", fq, z)[..., None] + 1e-6)
  return (s, z), o.astype(q.dtype)


def fake_linear_attention(q, k, v, *, log_decay=None, feature_map="identity", normalize=False, causal=True,
                          initial_state=None, return_final_state=False, segment_ids=None,
                          chunk_size=None, implementation=None):
  assert causal and segment_ids is None and chunk_size is None and implementation is None
  b, t, h, d = q.shape
  if initial_state is None:
    initial_state = (jnp.zeros((b, h, d, v.shape[-1]), jnp.float32), jnp.zeros((b, h, d), jnp.float32))
  decays = None if log_decay is None else (
      jnp.broadcast_to(log_decay, (b, t, h)) if log_decay.ndim == 1 else log_decay)

  def step(state, xs):
    qt, kt, vt, at = xs
    return fake_linear_step(state, qt, kt, vt, at, feature_map=feature_map, normalize=normalize)

  xs = (q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1),
        None if decays is None else decays.swapaxes(0, 1))
  state, o = jax.lax.scan(step, initial_state, xs)
  o = o.swapaxes(0, 1)
  return (o, state) if return_final_state else o


def _linear_hybrid():
  lin = layers.mixer_config("linear", num_heads=4, num_kv_heads=2, decay="data", feature_map="elu_plus_one")
  fixed = lin.replace(decay="fixed", normalize=False, feature_map="identity", output_norm=False)
  cfg = models.lm.tiny(num_layers=3, schedule=(lin, fixed, layers.mixer_config("softmax", num_heads=4)))
  return models.DecoderLM(cfg, rngs=nnx.Rngs(0)), cfg


@pytest.mark.parametrize("primitive", ["stand_in", "real"])
def test_linear_hybrid_lm_decode_equals_full(monkeypatch, primitive):
  """A linear : linear : softmax hybrid LM decodes token by token (recurrent state for the linear
  layers, KV cache for the softmax one) exactly as it computes the whole sequence."""
  if primitive == "stand_in":
    monkeypatch.setattr(attn_jax, "linear_attention", fake_linear_attention)
    monkeypatch.setattr(attn_jax, "linear_attention_step", fake_linear_step)
  else:
    assert attn_jax.linear_attention is not fake_linear_attention
  model, cfg = _linear_hybrid()
  prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 4), 0, cfg.vocab_size)
  tokens, logits, cache = models.generate(model, prompt, max_new_tokens=5, return_logits=True,
                                          return_cache=True)
  full = jax.jit(lambda t: model(t))(jnp.concatenate([prompt, tokens[:, :-1]], axis=1))
  tolerances.assert_close(logits, full[:, 3:], jnp.float32, "linear hybrid")
  assert isinstance(cache[0], layers.RecurrentCache) and isinstance(cache[1], layers.RecurrentCache)
  state = jax.tree.leaves(cache[0].state)[0]
  assert state.shape[:2] == (2, 4) and state.dtype == jnp.float32


def test_linear_decode_without_step_function_fails_clearly(monkeypatch):
  monkeypatch.setattr(attn_jax, "linear_attention", fake_linear_attention, raising=False)
  monkeypatch.delattr(attn_jax, "linear_attention_step", raising=False)
  layer = layers.build_mixer(layers.mixer_config("linear"), 32, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="needs attn_jax.linear_attention_step"):
    layer.init_cache(2, 8, jnp.float32)


def _natten_window(length, size):
  """Per-axis NATTEN window start of every query (stride 1, dilation 1, non-causal)."""
  i = np.arange(length)
  left, right = size // 2, size // 2 + size % 2 - 1
  start = np.maximum(i - left, 0) + np.where(i + right >= length, length - right - i - 1, 0)
  return start


CALLS = []


def fake_neighborhood_attention(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, *,
                                implementation=None):
  """Dense 2D neighborhood attention with NATTEN semantics (stride 1, dilation 1, non-causal)."""
  CALLS.append(dict(shape=q.shape, kernel_size=kernel_size, stride=stride, dilation=dilation,
                    is_causal=is_causal))
  b, hh, ww, h, d = q.shape
  ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
  visible = np.ones((hh * ww, hh * ww), bool)
  for axis, (length, size) in enumerate(zip((hh, ww), ks)):
    start = _natten_window(length, size)
    coord = np.indices((hh, ww))[axis].reshape(-1)
    visible &= ((coord[None, :] >= start[coord][:, None]) & (coord[None, :] < start[coord][:, None] + size))
  flat = lambda x: x.reshape(b, hh * ww, h, d)
  out = attn_jax.attention(flat(q), flat(k), flat(v), mask=masks.block_layout(visible, 1, 1))
  return out.reshape(q.shape)


def test_neighborhood_vit_wiring(monkeypatch):
  monkeypatch.setattr(attn_jax, "neighborhood_attention", fake_neighborhood_attention, raising=False)
  CALLS.clear()
  dense = models.vit.tiny()
  na = dense.replace(schedule=dense.schedule.with_mixer("neighborhood", kernel_size=(4, 4)))
  vit_na = models.ViT(na, rngs=nnx.Rngs(0))
  vit_dense = models.ViT(dense, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  # The parameter trees coincide, and a window covering the whole 4x4 grid is dense attention.
  assert jax.tree.structure(nnx.state(vit_na)) == jax.tree.structure(nnx.state(vit_dense))
  dense_out = jax.jit(lambda x: vit_dense(x))(images)
  tolerances.assert_close(jax.jit(lambda x: vit_na(x))(images), dense_out, jnp.float32,
                          "full-window NA == dense")
  assert CALLS[0] == dict(shape=(2, 4, 4, 4, 8), kernel_size=(4, 4), stride=1, dilation=1, is_causal=False)
  small = models.ViT(dense.replace(schedule=na.schedule.replace(kernel_size=3)), rngs=nnx.Rngs(0))
  assert not np.allclose(jax.jit(lambda x: small(x))(images), dense_out, atol=1e-4)


def test_neighborhood_vit_on_the_real_primitive():
  """The ViT with the real attn_jax.neighborhood_attention: a window covering the whole grid is
  dense attention, and a 3x3 window equals the stand-in's dense NATTEN mask."""
  assert attn_jax.neighborhood_attention is not fake_neighborhood_attention
  dense = models.vit.tiny()
  images = jax.random.normal(jax.random.PRNGKey(1), (1, 16, 16, 3))
  na = dense.replace(schedule=dense.schedule.with_mixer("neighborhood", kernel_size=(4, 4)))
  vit_na = models.ViT(na, rngs=nnx.Rngs(0))
  tolerances.assert_close(vit_na(images), models.ViT(dense, rngs=nnx.Rngs(0))(images), jnp.float32,
                          "full-window NA == dense")
  small = models.ViT(na.replace(schedule=na.schedule.replace(kernel_size=(3, 3))), rngs=nnx.Rngs(0))
  real_out = small(images)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(attn_jax, "neighborhood_attention", fake_neighborhood_attention)
    fake_out = small(images)
  tolerances.assert_close(real_out, fake_out, jnp.float32, "3x3 NA == dense NATTEN mask")
