"""attn_jax.explain (visible dispatch) and the one-time interpret-mode warning."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import dispatch
from attn_jax import masks


def _struct(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def test_explain_reports_the_default_backend_and_its_block_mask():
  q, kv = _struct(2, 100, 4, 16), _struct(2, 100, 2, 16)
  mask = masks.sliding_window(20) | masks.sink_tokens(4)
  config = attn_jax.XlaConfig(block_q=16, block_kv=16)
  e = attn_jax.explain(attn_jax.attention, q, kv, kv, mask=mask, config=config)
  assert e.platform == "cpu" and e.backends == ("xla",) and not e.interpret and e.error is None
  bm = attn_jax.make_block_mask(mask, 100, 100, 16, 16)
  text = str(e)
  assert f"{bm.num_full} full, {bm.num_partial} partial, {bm.num_tiles - bm.num_nonempty} empty" in text
  assert "implementation='xla'" in text and "requested" in text  # the config selects its backend
  default = attn_jax.explain(attn_jax.attention, q, kv, kv, mask=mask)
  assert "implementation=None tries: xla" in str(default) and default.rows()[0][2] == "chosen"
  # Concrete arrays work too, and a family name selects the function.
  x = jnp.zeros((1, 8, 1, 4))
  assert attn_jax.explain("softmax", x, x, x, implementation="reference").backends == ("reference",)


def test_explain_lists_declines_in_platform_order(monkeypatch):
  """On a (simulated) GPU, cuDNN (no GPU here) and the Pallas kernel (head dims above 256) decline: xla serves."""
  monkeypatch.setattr(dispatch, "current_platform", lambda: "gpu")
  q = _struct(1, 64, 2, 512)
  e = attn_jax.explain(attn_jax.attention, q, q, q, mask=masks.causal())
  rows = e.rows()
  assert [r[:3] for r in rows] == [("softmax", "cudnn", "declined"), ("softmax", "pallas_gpu", "declined"),
                                   ("softmax", "xla", "chosen")]
  assert "head dims above 256" in rows[1][4]
  assert e.backends == ("xla",)


def test_explain_reports_interpret_mode_and_explicit_failures():
  q = _struct(1, 48, 2, 16)
  e = attn_jax.explain(attn_jax.attention, q, q, q, implementation="pallas_tpu")
  assert e.backends == ("pallas_tpu",) and e.interpret
  assert "yes (implicit)" in str(e)
  explicit = attn_jax.explain(attn_jax.attention, q, q, q, implementation="pallas_tpu",
                              config=attn_jax.PallasTpuConfig(interpret=True))
  assert explicit.interpret and "yes (implicit)" not in str(explicit)
  big = _struct(1, 48, 2, 512)
  failed = attn_jax.explain(attn_jax.attention, big, big, big, implementation="pallas_gpu")
  assert failed.backends == (None,) and "head dims above 256" in failed.error


def test_explain_linear_and_neighborhood():
  q = _struct(1, 64, 2, 8)
  e = attn_jax.explain(attn_jax.linear_attention, q, q, q, log_decay=_struct(2), chunk_size=32)
  assert e.backends == ("xla",) and "chunk 32" in str(e)
  seg = jnp.zeros((1, 64), jnp.int32)
  twice = attn_jax.explain("linear", q, q, q, causal=False, segment_ids=seg)
  assert twice.backends == ("xla", "xla")  # a causal and an anti-causal pass
  x = _struct(1, 16, 16, 2, 8)
  nat = attn_jax.explain(attn_jax.neighborhood_attention, x, x, x, 5)
  assert nat.backends == ("xla",) and "BlockMask" in str(nat)


def test_explain_raises_argument_errors_and_rejects_other_functions():
  q = _struct(1, 8, 2, 4)
  with pytest.raises(ValueError, match="q heads \\(2\\) must be a multiple"):
    attn_jax.explain(attn_jax.attention, q, _struct(1, 8, 3, 4), _struct(1, 8, 3, 4))
  with pytest.raises(ValueError, match="fn must be"):
    attn_jax.explain(jnp.dot, q, q)
  with pytest.raises(ValueError, match="fn must be one of"):
    attn_jax.explain("flash", q, q, q)


def test_explain_compiles_nothing_and_does_not_warn(recwarn):
  q = _struct(1, 56, 2, 16)
  attn_jax.explain(attn_jax.attention, q, q, q, implementation="pallas_gpu")
  assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_interpret_mode_warns_once_per_kernel(monkeypatch):
  monkeypatch.setattr(dispatch, "_WARNED_INTERPRET", set())
  rng = np.random.default_rng(0)

  def run(length, **kwargs):
    x = jnp.asarray(rng.standard_normal((1, length, 1, 8)), jnp.float32)
    return attn_jax.attention(x, x, x, mask=masks.causal(), **kwargs)

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    # Unusual shapes, so that no earlier test of this process has compiled (and cached) the calls.
    run(23, implementation="pallas_gpu")
    run(41, implementation="pallas_gpu")  # a new shape traces again: no second warning
    run(23, implementation="pallas_gpu", config=attn_jax.PallasGpuConfig(interpret=True, block_q=16))
    x = jnp.asarray(rng.standard_normal((1, 19, 1, 8)), jnp.float32)
    attn_jax.linear_attention(x, x, x, implementation="pallas_gpu")
  messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
  assert len(messages) == 2, messages
  assert "pallas_gpu softmax kernel runs in Pallas interpret mode on platform 'cpu'" in messages[0]
  assert "pallas_gpu linear kernel" in messages[1]
