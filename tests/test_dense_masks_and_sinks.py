"""Dense boolean masks (masks.from_array), from_fn's error on NumPy tables, causal-safe sink tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import block_mask as bm_lib
from attn_jax import masks
from tests.softmax import helpers
from tests.test_block_mask import brute_kinds, check_lists

_BACKENDS = {
    "xla": attn_jax.XlaConfig(block_q=16, block_kv=16),
    "pallas_tpu": attn_jax.PallasTpuConfig(block_q=16, block_kv=16, interpret=True),
    "pallas_gpu": attn_jax.PallasGpuConfig(block_q=16, block_kv=16, interpret=True),
}


def _random_dense(seed, shape):
  """A mask with FULL (first 16 columns), EMPTY (columns 16-31) and PARTIAL (random) tiles."""
  rng = np.random.RandomState(seed)
  dense = rng.rand(*shape) < 0.3
  dense[..., :16] = True
  dense[..., 16:32] = False
  return dense


@pytest.mark.parametrize("shape,blocks", [((37, 70), (16, 16)), ((64, 64), (32, 16)), ((3, 40, 50), (8, 16))])
def test_from_array_block_mask_equals_brute_force(shape, blocks):
  dense = _random_dense(0, shape)
  q_len, kv_len = shape[-2:]
  heads = shape[0] if len(shape) == 3 else None
  bm = attn_jax.make_block_mask(masks.from_array(dense), q_len, kv_len, *blocks, num_heads=heads)
  want = brute_kinds(dense if heads else dense[None], *blocks)
  np.testing.assert_array_equal(bm.dense_kinds(), want)
  assert {bm_lib.EMPTY, bm_lib.PARTIAL, bm_lib.FULL} <= set(np.unique(bm.dense_kinds()).tolist())
  check_lists(bm)


def test_from_array_block_mask_is_built_without_evaluating_elements(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("the BlockMask of a dense array must come from block reductions")

  monkeypatch.setattr(masks.ArrayMask, "evaluate", fail)
  dense = _random_dense(1, (100, 90))
  bm = attn_jax.make_block_mask(masks.from_array(dense), 100, 90, 32, 32)
  np.testing.assert_array_equal(bm.dense_kinds(), brute_kinds(dense[None], 32, 32))


# Per-head tiles go through the same kernel code as per-head from_fn tiles (tests/softmax/
# test_pallas.py); the TPU interpret twin of the per-head case is left out for CI time.
@pytest.mark.parametrize("backend,per_head", [("xla", False), ("xla", True), ("pallas_tpu", False),
                                              ("pallas_gpu", False), ("pallas_gpu", True)])
def test_from_array_attention_matches_reference(backend, per_head):
  """Forward and backward against the reference, on a mask with every tile kind; the reference
  itself is checked against a NumPy softmax over the dense mask."""
  q_len, kv_len, hq = 37, 50, 2
  dense = _random_dense(2, (hq, q_len, kv_len) if per_head else (q_len, kv_len))
  mask = masks.from_array(dense)
  q, k, v, sinks, d_out, d_lse = helpers.make_inputs(0, 1, q_len, kv_len, hq, 1, 16, 16, jnp.float32)
  _, want = helpers.compare_backends(backend, _BACKENDS[backend], q, k, v, None, d_out, d_lse, mask=mask)

  logits = np.einsum("bqhd,bkd->bhqk", np.asarray(q), np.asarray(k)[:, :, 0]) / 4.0
  logits = np.where(dense, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.einsum("bhqk,bkd->bqhd", p, np.asarray(v)[:, :, 0]), want[0], atol=1e-5)


def test_from_array_composes_and_hashes_by_content():
  dense = _random_dense(3, (40, 40))
  a, b = masks.from_array(dense), masks.from_array(dense.copy())
  assert a == b and hash(a) == hash(b)
  assert a != masks.from_array(~dense)
  combined = a & masks.causal()
  np.testing.assert_array_equal(combined.materialize(40, 40), dense & np.tril(np.ones((40, 40), bool)))
  q, k, v, _, _, _ = helpers.make_inputs(1, 1, 40, 40, 2, 2, 8, 8, jnp.float32)
  got = attn_jax.attention(q, k, v, mask=combined, config=_BACKENDS["xla"])
  want = attn_jax.attention(q, k, v, mask=combined, implementation="reference")
  np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("make,match", [
    (lambda: masks.from_array(np.ones((4, 5, 6, 7), bool)), "boolean \\[q_len, kv_len\\]"),
    (lambda: masks.from_array(np.full((4, 4), 2)), "boolean \\(or 0/1\\)"),
    (lambda: masks.from_array(np.ones((0, 4), bool)), "must not be empty"),
])
def test_from_array_rejects_bad_arrays(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_from_array_rejects_mismatched_calls():
  q = jnp.zeros((1, 8, 2, 4))
  with pytest.raises(ValueError, match="does not match q_len=8, kv_len=8"):
    attn_jax.attention(q, q, q, mask=masks.from_array(np.ones((8, 9), bool)))
  with pytest.raises(ValueError, match="3 heads but the call has 2 query heads"):
    attn_jax.attention(q, q, q, mask=masks.from_array(np.ones((3, 8, 8), bool)))
  with pytest.raises(ValueError, match="concrete array"):
    jax.jit(lambda m: masks.from_array(m))(jnp.ones((8, 8), bool))


def test_from_fn_indexing_a_numpy_table_names_the_cause():
  table = np.tril(np.ones((24, 24), bool))
  mask = masks.from_fn(lambda q, k: table[q, k], name="numpy table")
  q = jnp.zeros((1, 24, 1, 8))
  for backend in ("reference", "xla"):
    with pytest.raises(ValueError, match="'numpy table' failed on JAX arrays.*from_array") as info:
      attn_jax.attention(q, q, q, mask=mask, implementation=backend)
    assert isinstance(info.value.__cause__, jax.errors.TracerArrayConversionError)
  # What the message recommends works.
  np.testing.assert_allclose(attn_jax.attention(q, q, q, mask=masks.from_array(table)),
                             attn_jax.attention(q, q, q, mask=masks.causal()), atol=1e-6)


def test_from_fn_other_errors_pass_through():
  mask = masks.from_fn(lambda q, k: q.undefined_attribute)
  with pytest.raises(AttributeError):
    attn_jax.attention(jnp.zeros((1, 8, 1, 4)), jnp.zeros((1, 8, 1, 4)), jnp.zeros((1, 8, 1, 4)), mask=mask)


@pytest.mark.parametrize("q_len,kv_len", [(20, 20), (6, 20), (20, 6)])
def test_sink_tokens_never_expose_a_later_token(q_len, kv_len):
  """The README's window-plus-sinks mask is causal: no query sees a key after its position."""
  window_sinks = masks.sliding_window(3) | masks.sink_tokens(4)
  dense = window_sinks.materialize(q_len, kv_len)
  causal = masks.causal().materialize(q_len, kv_len)
  assert not (dense & ~causal).any()
  np.testing.assert_array_equal(dense, (window_sinks & masks.causal()).materialize(q_len, kv_len))
  i, j = np.meshgrid(np.arange(q_len), np.arange(kv_len), indexing="ij")
  o = kv_len - q_len
  np.testing.assert_array_equal(masks.sink_tokens(4).materialize(q_len, kv_len), (j < 4) & (j <= i + o))


def test_sink_tokens_opt_out_and_offset():
  i, j = np.meshgrid(np.arange(10), np.arange(10), indexing="ij")
  np.testing.assert_array_equal(masks.sink_tokens(3, causal=False).materialize(10, 10), np.broadcast_to(j < 3, (10, 10)))
  np.testing.assert_array_equal(masks.sink_tokens(3, offset=-2).materialize(10, 10), (j < 3) & (j <= i - 2))
  # prefix-LM stays bidirectional inside the prefix.
  np.testing.assert_array_equal(masks.prefix_lm(4).materialize(10, 10), (j < 4) | (j <= i))
  assert repr(masks.sink_tokens(3)) == "sink_tokens(3)"
  assert repr(masks.sink_tokens(3, causal=False)) == "sink_tokens(3, causal=False)"
  with pytest.raises(ValueError, match="offset applies to causal sink tokens only"):
    masks.sink_tokens(3, causal=False, offset=1)
  with pytest.raises(ValueError, match="causal must be a bool"):
    masks.sink_tokens(3, causal="yes")


@pytest.mark.parametrize("mask", [masks.sink_tokens(5), masks.sink_tokens(5, offset=-3),
                                  masks.sink_tokens(5, causal=False),
                                  masks.sliding_window(4) | masks.sink_tokens(9, offset=2)])
@pytest.mark.parametrize("q_len,kv_len,bq,bk", [(33, 33, 8, 8), (9, 40, 4, 8), (40, 12, 8, 4)])
def test_sink_tokens_block_bounds_are_sound(mask, q_len, kv_len, bq, bk):
  bm = attn_jax.make_block_mask(mask, q_len, kv_len, bq, bk)
  np.testing.assert_array_equal(bm.dense_kinds(), brute_kinds(mask.materialize(q_len, kv_len)[None], bq, bk))


@pytest.mark.parametrize("backend", ["reference"] + list(_BACKENDS))
def test_window_with_sinks_equals_window_with_sinks_and_causal(backend):
  """The in-kernel predicate and the tiles agree with the explicitly causal composition."""
  q, k, v, sinks, d_out, d_lse = helpers.make_inputs(3, 1, 45, 45, 2, 1, 16, 16, jnp.float32)
  config = _BACKENDS.get(backend)
  got = attn_jax.attention(q, k, v, mask=masks.sliding_window(10) | masks.sink_tokens(20),
                           implementation=backend, config=config)
  want = attn_jax.attention(q, k, v, mask=(masks.sliding_window(10) | masks.sink_tokens(20)) & masks.causal(),
                            implementation="reference")
  np.testing.assert_allclose(got, want, atol=2e-5)
