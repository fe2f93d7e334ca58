"""The traced BlockMask: construction inside jit, its lists, and every backend that serves it."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import block_mask as bm_lib
from attn_jax import block_mask_traced as traced
from attn_jax import masks
from tests import tolerances
from tests.softmax import helpers

DIAG = masks.from_fn(lambda q, k: q // 8 == k // 8, name="diag8", in_kernel=True)


def _oracle_selection(scores, top_k, static_kinds, keep_dense):
  """NumPy: per row, the keep blocks plus the top_k eligible blocks by score (ties: lower index; NaN
  and -inf scores are not eligible)."""
  scores = np.asarray(scores, np.float64)
  out = np.zeros(scores.shape, bool)
  for idx in np.ndindex(scores.shape[:-1]):
    row = idx[-1]
    eligible = (static_kinds[row] != bm_lib.EMPTY) & ~np.isnan(scores[idx]) & (scores[idx] > -np.inf)
    kept = eligible & keep_dense[row]
    cand = np.flatnonzero(eligible & ~kept)
    order = cand[np.lexsort((cand, -scores[idx][cand]))][:top_k]
    out[idx][kept] = True
    out[idx][order] = True
  return out


@pytest.mark.parametrize("mask_name", ["causal", "window", "full_cross"])
def test_from_scores_matches_numpy_selection_and_transposes(mask_name):
  q_len, kv_len = (45, 45) if mask_name != "full_cross" else (30, 52)
  mask = {"causal": masks.causal(), "window": masks.sliding_window(17), "full_cross": None}[mask_name]
  keep = DIAG if mask_name != "full_cross" else None
  nq, nk = -(-q_len // 8), -(-kv_len // 8)
  scores = jax.random.normal(jax.random.PRNGKey(1), (2, 3, nq, nk))
  tb = jax.jit(lambda s: traced.from_scores(s, 2, q_len=q_len, kv_len=kv_len, block_q=8, block_kv=8,
                                            mask=mask, keep=keep))(scores)
  static = bm_lib.make_block_mask(mask, q_len, kv_len, 8, 8).dense_kinds()[0]
  keep_dense = (np.zeros_like(static, bool) if keep is None else
                bm_lib.make_block_mask(keep & (mask or masks.full()), q_len, kv_len, 8, 8).dense_kinds()[0] != 0)
  want = _oracle_selection(scores, 2, static, keep_dense)
  dense = np.asarray(tb.dense_kinds())
  np.testing.assert_array_equal(dense != bm_lib.EMPTY, want)
  # Selected entries carry the static kinds (PARTIAL stays PARTIAL, FULL stays FULL).
  np.testing.assert_array_equal(np.where(want, static, bm_lib.EMPTY), dense)
  idx, kinds, counts = (np.asarray(a) for a in (tb.kv_indices, tb.kv_kinds, tb.kv_counts))
  for b, h, i in np.ndindex(counts.shape):
    c = counts[b, h, i]
    assert list(idx[b, h, i, :c]) == list(np.flatnonzero(want[b, h, i]))
    assert (kinds[b, h, i, c:] == bm_lib.EMPTY).all()
    assert (idx[b, h, i, c:] == (idx[b, h, i, c - 1] if c else 0)).all(), "padding repeats the last index"
  offsets, q_idx, q_kinds = (np.asarray(a) for a in (tb.q_offsets, tb.q_indices, tb.q_kinds))
  for b, h in np.ndindex(offsets.shape[:2]):
    assert offsets[b, h, -1] == counts[b, h].sum()
    for j in range(nk):
      run = slice(offsets[b, h, j], offsets[b, h, j + 1])
      assert list(q_idx[b, h, run]) == list(np.flatnonzero(want[b, h, :, j]))
      np.testing.assert_array_equal(q_kinds[b, h, run], static[want[b, h, :, j], j])


def test_nan_and_minus_inf_scores_are_never_selected():
  """A NaN or -inf score neither gets selected nor takes a top-k slot from an eligible block; +inf
  is an ordinary (best) score; a row with fewer eligible blocks than top_k keeps all of them."""
  nq = nk = 6
  scores = np.array(jax.random.normal(jax.random.PRNGKey(3), (1, 2, nq, nk)))
  scores[0, 0, 5, [0, 3]] = np.nan
  scores[0, 0, 4, 2] = -np.inf
  scores[0, 1, 5, :4] = np.nan          # row 5 of head 1: one eligible block (4) besides the diagonal
  scores[0, 1, 3, 1] = np.inf
  tb = jax.jit(lambda s: traced.from_scores(s, 3, q_len=45, kv_len=45, block_q=8, block_kv=8, mask=masks.causal(),
                                            keep=DIAG))(jnp.asarray(scores))
  static = bm_lib.make_block_mask(masks.causal(), 45, 45, 8, 8).dense_kinds()[0]
  want = _oracle_selection(scores, 3, static, np.eye(nq, dtype=bool))
  np.testing.assert_array_equal(np.asarray(tb.dense_kinds()) != bm_lib.EMPTY, want)
  np.testing.assert_array_equal(tb.kv_counts[0, :, 5], [4, 2])
  assert 1 in set(np.asarray(tb.kv_indices[0, 1, 3, :tb.kv_counts[0, 1, 3]]))


def test_from_indices_sorts_dedups_and_drops_empty_blocks():
  # Causal, 4 x 4 blocks: row 1 may only see blocks 0, 1.
  idx = jnp.asarray([[[[3, 1, 1, -1], [0, 0, 2, 1], [5, 2, 0, 2], [3, 3, 3, 3]]]])
  valid = jnp.asarray([[[[True, True, True, True], [True, True, True, False], [True] * 4, [True] * 4]]])
  tb = traced.from_indices(idx, valid=valid, q_len=32, kv_len=32, block_q=8, block_kv=8, mask=masks.causal())
  np.testing.assert_array_equal(tb.kv_counts[0, 0], [0, 1, 2, 1])
  np.testing.assert_array_equal(tb.kv_indices[0, 0, 1:3, :2], [[0, 0], [0, 2]])
  np.testing.assert_array_equal(tb.kv_kinds[0, 0, 2, :2], [bm_lib.FULL, bm_lib.PARTIAL])
  np.testing.assert_array_equal(tb.kv_indices[0, 0, 3], [3, 3, 3, 3])


def test_changing_the_data_does_not_recompile():
  traces = collections.Counter()
  q, k, v, *_ = helpers.make_inputs(0, 1, 40, 40, 2, 1, 16, 16, jnp.float32)

  @jax.jit
  def f(q, k, v, scores):
    traces["f"] += 1
    tb = traced.from_scores(scores, 2, q_len=40, kv_len=40, block_q=8, block_kv=8, mask=masks.causal(),
                            keep=DIAG)
    return attn_jax.attention(q, k, v, block_mask=tb, implementation="xla")

  @jax.jit
  def g(q, k, v, tb):
    traces["g"] += 1
    return jax.grad(lambda q: attn_jax.attention(q, k, v, block_mask=tb, implementation="xla").sum())(q)

  outs = []
  for seed in range(3):
    scores = jax.random.normal(jax.random.PRNGKey(seed), (1, 1, 5, 5))
    outs.append(f(q, k, v, scores))
    g(q, k, v, traced.from_scores(scores, 2, q_len=40, kv_len=40, block_q=8, block_kv=8, mask=masks.causal()))
  assert traces == {"f": 1, "g": 1}
  if hasattr(f, "_cache_size"):  # jax's private count of compiled executables, where it exists
    assert f._cache_size() == 1 and g._cache_size() == 1
  assert not np.allclose(outs[0], outs[1]), "different selections must give different outputs"


def _equivalent_static_mask(tb, b, h):
  """The selection of (b, h) as a static block_layout & the static mask: an independent oracle."""
  layout = np.asarray(tb.dense_kinds()[b, h]) != bm_lib.EMPTY
  return masks.block_layout(layout, tb.block_q, tb.block_kv) & tb.mask


def test_reference_equals_the_equivalent_static_mask():
  q, k, v, s, d_out, d_lse = helpers.make_inputs(3, 1, 37, 37, 2, 2, 16, 16, jnp.float32)
  tb = traced.from_scores(jax.random.normal(jax.random.PRNGKey(0), (1, 1, 5, 5)), 1, q_len=37, kv_len=37,
                          block_q=8, block_kv=8, mask=masks.sliding_window(20), keep=DIAG)
  got = helpers.value_and_grads("reference", None, q, k, v, s, d_out, d_lse, block_mask=tb)
  want = helpers.value_and_grads("reference", None, q, k, v, s, d_out, d_lse, mask=_equivalent_static_mask(tb, 0, 0))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-6)


# name: (batch, q_len, kv_len, hq, hkv, list heads, list batch, mask, top_k, dtype, sinks, cap, segments)
CASES = {
    "gqa_group_lists_sinks": (2, 45, 45, 4, 2, 2, 2, masks.causal(), 2, jnp.float32, True, None, False),
    "per_q_head_lists_cap_segments": (2, 40, 40, 4, 2, 4, 2, masks.causal(), 1, jnp.float32, False, 5.0, True),
    "shared_lists_window_bf16": (1, 50, 50, 2, 1, 1, 1, masks.sliding_window(20), 1, jnp.bfloat16, True, None, False),
    "cross_full_padding": (2, 21, 50, 2, 2, 2, 1, None, 3, jnp.float32, False, None, False),
    "empty_rows_top0": (1, 40, 40, 2, 1, 1, 1, masks.causal(), 0, jnp.float32, False, None, False),
}


def _case(name, keep_diag=True):
  batch, tq, tk, hq, hkv, hm, bm, mask, top_k, dtype, sinks, cap, segments = CASES[name]
  q, k, v, s, d_out, d_lse = helpers.make_inputs(len(name), batch, tq, tk, hq, hkv, 16, 8, dtype)
  nq, nk = -(-tq // 8), -(-tk // 8)
  scores = jax.random.normal(jax.random.PRNGKey(len(name)), (bm, hm, nq, nk))
  keep = DIAG if (keep_diag and mask is not None and top_k > 0) else None
  tb = traced.from_scores(scores, top_k, q_len=tq, kv_len=tk, block_q=8, block_kv=8, mask=mask, keep=keep)
  kwargs = dict(block_mask=tb, logits_soft_cap=cap)
  if segments:
    kwargs["q_segment_ids"] = jnp.asarray(np.repeat([[0] * 17 + [1] * (tq - 17)], batch, 0), jnp.int32)
  return (q, k, v, s if sinks else None, d_out, d_lse), kwargs


@pytest.mark.parametrize("case", list(CASES))
def test_xla_matches_reference(case):
  args, kwargs = _case(case)
  helpers.compare_backends("xla", None, *args, **kwargs)


@pytest.mark.parametrize("implementation", ["xla", "pallas_gpu"])
def test_query_and_key_blocks_of_different_sizes(implementation):
  q, k, v, s, d_out, d_lse = helpers.make_inputs(9, 2, 70, 70, 4, 2, 16, 8, jnp.float32)
  scores = jax.random.normal(jax.random.PRNGKey(9), (2, 2, 5, 3))
  tb = traced.from_scores(scores, 1, q_len=70, kv_len=70, block_q=16, block_kv=32, mask=masks.causal(),
                          keep=masks.from_fn(lambda q, k: q // 32 == k // 32, name="own32"))
  config = attn_jax.PallasGpuConfig(interpret=True) if implementation == "pallas_gpu" else None
  helpers.compare_backends(implementation, config, q, k, v, s, d_out, d_lse, block_mask=tb)


def test_rows_without_selection_are_zero_with_finite_gradients():
  (q, k, v, _, d_out, d_lse), kwargs = _case("empty_rows_top0", keep_diag=False)
  for impl in ("reference", "xla"):
    out, lse, grads = helpers.value_and_grads(impl, None, q, k, v, None, d_out, d_lse, **kwargs)
    np.testing.assert_array_equal(out, 0.0)
    assert np.isneginf(np.asarray(lse)).all()
    for g in grads:
      np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("case", ["gqa_group_lists_sinks", "per_q_head_lists_cap_segments"])
def test_gpu_kernel_matches_reference(case):
  batch, tq, tk, hq, hkv, hm, bm, mask, top_k, dtype, sinks, cap, segments = CASES[case]
  q, k, v, s, d_out, d_lse = helpers.make_inputs(1, batch, tq, tk, hq, hkv, 16, 8, dtype)
  scores = jax.random.normal(jax.random.PRNGKey(2), (bm, hm, 3, 3))
  tb = traced.from_scores(scores, 1, q_len=tq, kv_len=tk, block_q=16, block_kv=16, mask=mask,
                          keep=masks.from_fn(lambda q, k: q // 16 == k // 16, name="diag16"))
  kwargs = dict(block_mask=tb, logits_soft_cap=cap)
  if segments:
    kwargs["q_segment_ids"] = jnp.asarray(np.repeat([[0] * 17 + [1] * (tq - 17)], batch, 0), jnp.int32)
  helpers.compare_backends("pallas_gpu", attn_jax.PallasGpuConfig(interpret=True), q, k, v,
                           s if sinks else None, d_out, d_lse, **kwargs)


def _expected_visits(tb, batch, hq):
  """(batch, q head, q block, kv block, partial) for every selected tile."""
  dense = np.asarray(tb.dense_kinds())
  out = set()
  for b in range(batch):
    for h in range(hq):
      lists = dense[b if tb.num_batch > 1 else 0, h * tb.num_heads // hq]
      for i, j in zip(*np.nonzero(lists)):
        out.add((b, h, int(i), int(j), bool(lists[i, j] == bm_lib.PARTIAL)))
  return out


def test_gpu_kernel_visits_exactly_the_selected_tiles():
  """Forward, dQ and dK/dV visit each selected tile once per (batch, head), evaluate the mask on the
  PARTIAL ones only, and never touch an unselected tile."""
  visits = collections.Counter()

  def record(phase, b, h, i, j, evaluated):
    visits[(phase, int(b), int(h), int(i), int(j), bool(evaluated))] += 1

  batch, length, hq, hkv = 2, 80, 4, 2
  q, k, v, *_ = helpers.make_inputs(0, batch, length, length, hq, hkv, 16, 16, jnp.float32)
  scores = jax.random.normal(jax.random.PRNGKey(5), (batch, hkv, 5, 5))
  tb = traced.from_scores(scores, 2, q_len=length, kv_len=length, block_q=16, block_kv=16, mask=masks.causal())
  config = attn_jax.PallasGpuConfig(interpret=True, record_visits=record)
  grads = jax.grad(lambda q, k, v: attn_jax.attention(q, k, v, block_mask=tb, implementation="pallas_gpu",
                                                      config=config).sum(), argnums=(0, 1, 2))(q, k, v)
  jax.block_until_ready(grads)
  expected = _expected_visits(tb, batch, hq)
  full = {(b, h, i, j, i == j) for b in range(batch) for h in range(hq) for i in range(5) for j in range(i + 1)}
  assert expected < full, "the selection must skip some causal tiles"
  assert any(e[-1] for e in expected) and not all(e[-1] for e in expected)
  for phase in ("fwd", "dq", "dkv"):
    got = {key[1:]: n for key, n in visits.items() if key[0] == phase}
    assert set(got) == expected, phase
    assert set(got.values()) == {1}, f"{phase}: a tile was visited more than once"


def test_xla_records_exactly_the_selected_tiles():
  visits = collections.Counter()
  batch, length, hq, hkv = 2, 40, 4, 2
  q, k, v, *_ = helpers.make_inputs(0, batch, length, length, hq, hkv, 16, 16, jnp.float32)
  tb = traced.from_scores(jax.random.normal(jax.random.PRNGKey(7), (batch, hkv, 5, 5)), 2, q_len=length,
                          kv_len=length, block_q=8, block_kv=8, mask=masks.causal())
  config = attn_jax.XlaConfig(record_visits=lambda *a: visits.update([a]))
  jax.block_until_ready(jax.grad(lambda q: attn_jax.attention(q, k, v, block_mask=tb, config=config).sum())(q))
  dense = np.asarray(tb.dense_kinds())
  expected = {(b, h, int(i), int(j), bool(dense[b, h, i, j] == bm_lib.PARTIAL))
              for b in range(batch) for h in range(hkv) for i, j in zip(*np.nonzero(dense[b, h]))}
  for phase in ("fwd", "bwd"):
    got = {key[1:]: n for key, n in visits.items() if key[0] == phase}
    assert set(got) == expected and set(got.values()) == {1}, phase


def test_bad_input():
  q, k, v, *_ = helpers.make_inputs(0, 2, 40, 40, 4, 2, 16, 16, jnp.float32)
  kw = dict(q_len=40, kv_len=40, block_q=8, block_kv=8, mask=masks.causal())
  scores = jnp.zeros((2, 2, 5, 5))
  with pytest.raises(ValueError, match=r"top_k must be an int in \[0, num_kv_blocks=5\], got -1"):
    traced.from_scores(scores, -1, **kw)
  with pytest.raises(ValueError, match=r"top_k must be an int in \[0, num_kv_blocks=5\], got 6"):
    traced.from_scores(scores, 6, **kw)
  with pytest.raises(ValueError, match=r"scores must have shape \[batch or 1, heads, 5, 5\]"):
    traced.from_scores(jnp.zeros((2, 2, 5, 4)), 1, **kw)
  with pytest.raises(ValueError, match="block_q must be a positive int, got 0"):
    traced.from_scores(scores, 1, **dict(kw, block_q=0))
  with pytest.raises(ValueError, match="must not depend on the head"):
    traced.from_scores(scores, 1, **dict(kw, mask=masks.from_fn(lambda q, k, h: q >= k)))
  tb = traced.from_scores(scores, 1, **kw)
  with pytest.raises(ValueError, match="block_mask was built for q_len=40, kv_len=40; the call has q_len=39"):
    attn_jax.attention(q[:, :39], k, v, block_mask=tb)
  with pytest.raises(ValueError, match=r"block_mask has batch dimension 2: expected 1 or the batch size 1"):
    attn_jax.attention(q[:1], k[:1], v[:1], block_mask=tb)
  with pytest.raises(ValueError, match=r"block_mask has 3 heads: expected one of \[1, 2, 4\]"):
    attn_jax.attention(q, k, v, block_mask=traced.from_scores(jnp.zeros((2, 3, 5, 5)), 1, **kw))
  with pytest.raises(ValueError, match="differs from block_mask's static mask"):
    attn_jax.attention(q, k, v, block_mask=tb, mask=masks.full())
  with pytest.raises(ValueError, match="block_mask must be an attn_jax.TracedBlockMask"):
    attn_jax.attention(q, k, v, block_mask=np.ones((5, 5)))
  with pytest.raises(ValueError, match="XlaConfig.block_q=16 differs from the traced block_mask's block_q=8"):
    attn_jax.attention(q, k, v, block_mask=tb, config=attn_jax.XlaConfig(block_q=16))
  with pytest.raises(NotImplementedError, match="TPU kernel"):
    attn_jax.attention(q, k, v, block_mask=tb, implementation="pallas_tpu")
  with pytest.raises(NotImplementedError, match="powers of two >= 16"):
    attn_jax.attention(q, k, v, block_mask=tb, implementation="pallas_gpu")
  with pytest.raises(NotImplementedError, match="traced block_mask"):
    attn_jax.attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), block_mask=tb,
                       implementation="cudnn")
