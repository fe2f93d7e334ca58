"""Content-dependent sparse mechanisms (issue 14): each against its materialised oracle (values and
gradients), each converging to dense attention when its budget covers every key, and bad input."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import block_mask as bm_lib
from attn_jax import masks
from attn_jax import mechanisms as mech
from attn_jax.mechanisms import routing as routing_lib
from tests import tolerances
from tests.mechanisms.helpers import check_grads, normal

B, T, HQ, HKV = 2, 45, 4, 2


def _qkv(seed=0, t=T, dtype=jnp.float32, dv=8):
  return (normal(seed, B, t, HQ, 16).astype(dtype), normal(seed + 1, B, t, HKV, 16).astype(dtype),
          normal(seed + 2, B, t, HKV, dv).astype(dtype))


def _dense_causal(q, k, v):
  return attn_jax.attention(q, k, v, mask=masks.causal(), implementation="reference")


def _chunk_ids(t=T, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.stack([np.cumsum(np.r_[0, rng.random(t - 1) < 0.2]) for _ in range(B)]), jnp.int32)


# name: (fast, reference, extra differentiated inputs builder, differentiable?)
def _cases():
  lk = normal(7, B, T // 8, HKV, 16)
  bias = normal(8, B, T, HKV)
  cent = routing_lib._unit(normal(9, HQ, 5, 16))
  proj = normal(10, 16, 4)
  ids = _chunk_ids()
  return {
      "topk_block_k2": (lambda q, k, v: mech.topk_block_attention(q, k, v, block_size=8, top_k=2),
                        lambda q, k, v: mech.topk_block_attention_reference(q, k, v, block_size=8, top_k=2)),
      "topk_block_noncausal": (
          lambda q, k, v: mech.topk_block_attention(q, k, v, block_size=16, top_k=1, causal=False),
          lambda q, k, v: mech.topk_block_attention_reference(q, k, v, block_size=16, top_k=1, causal=False)),
      "hyper_causal": (
          lambda q, k, v: mech.hyper_attention(q[:, :32], k[:, :32], v[:, :32], proj, jax.random.PRNGKey(1),
                                               block_size=4, sample_size=6, min_seq_len=8),
          lambda q, k, v: mech.hyper_attention_reference(q[:, :32], k[:, :32], v[:, :32], proj, jax.random.PRNGKey(1),
                                                         block_size=4, sample_size=6, min_seq_len=8)),
      "hyper_cross": (
          lambda q, k, v: mech.hyper_attention(q[:, :16], k[:, :32], v[:, :32], proj, jax.random.PRNGKey(2),
                                               block_size=4, sample_size=5, causal=False, min_seq_len=4),
          lambda q, k, v: mech.hyper_attention_reference(q[:, :16], k[:, :32], v[:, :32], proj, jax.random.PRNGKey(2),
                                                         block_size=4, sample_size=5, causal=False, min_seq_len=4)),
      "routing_local_heads": (
          lambda q, k, v: mech.routing_attention(q, k, v, cent, cluster_size=10, num_local_heads=2, local_window=6),
          lambda q, k, v: mech.routing_attention_reference(q, k, v, cent, cluster_size=10, num_local_heads=2,
                                                           local_window=6)),
      "landmark_train": (lambda q, k, v: mech.landmark_attention(q, k, v, lk, block_size=8),
                         lambda q, k, v: mech.landmark_attention_reference(q, k, v, lk, block_size=8)),
      "landmark_retrieve": (lambda q, k, v: mech.landmark_attention(q, k, v, lk, block_size=8, top_k=2),
                            lambda q, k, v: mech.landmark_attention_reference(q, k, v, lk, block_size=8, top_k=2)),
      "dynamic_mask": (lambda q, k, v: mech.dynamic_mask_attention(q, k, v, bias, window=7, block_size=8),
                       lambda q, k, v: mech.dynamic_mask_attention_reference(q, k, v, bias, window=7, block_size=8)),
      "core_context": (lambda q, k, v: mech.core_context_attention(q, k, v, group_size=4, window=8,
                                                                   config=attn_jax.XlaConfig(block_q=8, block_kv=8)),
                       lambda q, k, v: mech.core_context_attention_reference(q, k, v, group_size=4, window=8)),
      "dhsa": (lambda q, k, v: mech.dhsa_attention(q, k, v, ids, num_chunks=16, budget=12, block_q=4, block_kv=8),
               lambda q, k, v: mech.dhsa_attention_reference(q, k, v, ids, num_chunks=16, budget=12)),
      "superlinear": (lambda q, k, v: mech.superlinear_attention(q, k, v, span_size=7, top_k=2),
                      lambda q, k, v: mech.superlinear_attention_reference(q, k, v, span_size=7, top_k=2)),
  }


@pytest.mark.parametrize("name", list(_cases()))
def test_fast_form_matches_its_oracle_values_and_gradients(name):
  fast, slow = _cases()[name]
  check_grads(fast, slow, _qkv(), ["q", "k", "v"])


def test_trainable_parameters_get_their_gradients():
  """DMA's bias (and its projection) and Landmark's landmark keys are learned through the attention."""
  q, k, v = (x[:, :24] for x in _qkv(3))
  bias, lk = normal(4, B, 24, HKV), normal(5, B, 3, HKV, 16)
  check_grads(lambda bias, q, k, v: mech.dynamic_mask_attention(q, k, v, bias, window=5, block_size=8),
              lambda bias, q, k, v: mech.dynamic_mask_attention_reference(q, k, v, bias, window=5, block_size=8),
              (bias, q, k, v), ["bias"])
  check_grads(lambda lk, q, k, v: mech.landmark_attention(q, k, v, lk, block_size=8, top_k=1),
              lambda lk, q, k, v: mech.landmark_attention_reference(q, k, v, lk, block_size=8, top_k=1),
              (lk, q, k, v), ["landmark_k"])
  dt_w, a = normal(6, HKV * 8, HKV), normal(7, HKV)
  grads = jax.jit(jax.grad(lambda w, a: mech.dynamic_mask_attention(
      q, k, v, mech.dynamic_mask_bias(v, w, a), window=5, block_size=8).sum(), argnums=(0, 1)))(dt_w, a)
  assert all(np.abs(np.asarray(g)).max() > 0 for g in grads)


def test_recycled_decoding_matches_its_oracle():
  q, k, v = normal(0, B, 12, HQ, 16), normal(1, B, 42, HKV, 16), normal(2, B, 42, HKV, 8)
  for stride, top_k in ((4, 5), (3, 1)):
    got = jax.jit(lambda q, k, v: mech.recycled_attention(q, k, v, prompt_len=30, stride=stride, top_k=top_k))(q, k, v)
    want = mech.recycled_attention_reference(q, k, v, prompt_len=30, stride=stride, top_k=top_k)
    tolerances.assert_close(got, want, jnp.float32, f"stride={stride}, top_k={top_k}")
  # Between full steps the output differs from dense decoding (the point of recycling).
  dense = attn_jax.attention(q, k, v, mask=masks.causal(), implementation="reference")
  assert np.abs(np.asarray(got - dense))[:, 1].max() > 1e-3


def test_routing_centroid_update_is_one_online_kmeans_step():
  """``mu_c <- normalise(decay mu_c + (1 - decay) mean of the unit queries *and keys* nearest to c)``;
  a centroid without members (here: a duplicate, which loses every argmax tie) keeps its value."""
  q, k, _ = (x[:, :12] for x in _qkv(23))
  cent = np.array(routing_lib._unit(normal(24, HQ, 4, 16)))
  cent[:, 3] = cent[:, 0]
  got = np.asarray(mech.routing_update_centroids(jnp.asarray(cent), q, k, decay=0.9))

  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  want = np.empty_like(cent)
  for h in range(HQ):
    vecs = unit(np.concatenate([np.asarray(q)[:, :, h].reshape(-1, 16),
                                np.asarray(k)[:, :, h // (HQ // HKV)].reshape(-1, 16)]).astype(np.float64))
    nearest = np.argmax(vecs @ cent[h].T, axis=-1)
    sizes = np.bincount(nearest, minlength=4)
    assert sizes[3] == 0 and (sizes[:3] > 0).sum() >= 2, sizes
    for c in range(4):
      members = vecs[nearest == c]
      want[h, c] = cent[h, c] if len(members) == 0 else unit(0.9 * cent[h, c] + 0.1 * members.mean(0))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _full_budget_cases():
  proj, cent = normal(1, 16, 4), routing_lib._unit(normal(2, HQ, 3, 16))
  lk = normal(3, B, T // 8, HKV, 16)
  causal = lambda q, k, v: attn_jax.attention(q, k, v, mask=masks.causal(), implementation="reference")  # noqa: E731
  return {
      "topk_block": (lambda q, k, v: mech.topk_block_attention(q, k, v, block_size=8, top_k=6), causal),
      "hyper_causal": (lambda q, k, v: mech.hyper_attention(q[:, :32], k[:, :32], v[:, :32], proj, jax.random.PRNGKey(0),
                                                            block_size=4, sample_size=4, min_seq_len=32),
                       lambda q, k, v: causal(q[:, :32], k[:, :32], v[:, :32])),
      "hyper_one_block": (lambda q, k, v: mech.hyper_attention(q, k, v, proj, jax.random.PRNGKey(0), block_size=T,
                                                               sample_size=3, causal=False, min_seq_len=4),
                          lambda q, k, v: attn_jax.attention(q, k, v, implementation="reference")),
      "routing": (lambda q, k, v: mech.routing_attention(q, k, v, cent[:, :1], cluster_size=T), causal),
      "dynamic_mask": (lambda q, k, v: mech.dynamic_mask_attention(q, k, v, jnp.zeros((B, T, HKV)), window=T,
                                                                   block_size=8), causal),
      "core_context": (lambda q, k, v: mech.core_context_attention(q, k, v, group_size=4, window=48), causal),
      "dhsa": (lambda q, k, v: mech.dhsa_attention(q, k, v, _chunk_ids(seed=3), num_chunks=16, budget=T, block_q=8,
                                                   block_kv=8), causal),
      "superlinear": (lambda q, k, v: mech.superlinear_attention(q, k, v, span_size=T, top_k=1), causal),
      # Landmark's "dense" is its training-time grouped softmax over every earlier block.
      "landmark": (lambda q, k, v: mech.landmark_attention(q, k, v, lk, block_size=8, top_k=5),
                   lambda q, k, v: mech.landmark_attention(q, k, v, lk, block_size=8)),
      "recycled": (lambda q, k, v: mech.recycled_attention(q[:, 33:], k, v, prompt_len=33, stride=4, top_k=T),
                   lambda q, k, v: attn_jax.attention(q[:, 33:], k, v, mask=masks.causal(), implementation="reference")),
  }


@pytest.mark.parametrize("name", list(_full_budget_cases()))
def test_a_budget_covering_every_key_gives_dense_attention(name):
  fast, dense = _full_budget_cases()[name]
  args = _qkv(11)
  tolerances.assert_close(jax.jit(fast)(*args), dense(*args), jnp.float32, name)


def test_dynamic_mask_with_zero_bias_is_a_sliding_window():
  """Ties go to recent keys: DMA at its initialisation (A = 0) is sliding-window attention."""
  q, k, v = _qkv(12)
  out = jax.jit(lambda q, k, v: mech.dynamic_mask_attention(q, k, v, jnp.zeros((B, T, HKV)), window=6,
                                                           block_size=8))(q, k, v)
  want = attn_jax.attention(q, k, v, mask=masks.sliding_window(5), implementation="reference")
  tolerances.assert_close(out, want, jnp.float32, "dma window")


@pytest.mark.parametrize("dtype", [jnp.bfloat16])
def test_bfloat16_inputs_follow_the_float32_oracle(dtype):
  q, k, v = _qkv(13, dtype=dtype)
  bias = normal(14, B, T, HKV)
  pairs = {
      "topk_block": (jax.jit(lambda q, k, v: mech.topk_block_attention(q, k, v, block_size=8, top_k=2))(q, k, v),
                     mech.topk_block_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), block_size=8,
                                                         top_k=2)),
      "dynamic_mask": (jax.jit(lambda q, k, v: mech.dynamic_mask_attention(q, k, v, bias, window=7,
                                                                           block_size=8))(q, k, v),
                       mech.dynamic_mask_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), bias,
                                                             window=7, block_size=8)),
      "core_context": (jax.jit(lambda q, k, v: mech.core_context_attention(q, k, v, group_size=4, window=8))(q, k, v),
                       mech.core_context_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)),
                                                             group_size=4, window=8)),
  }
  for name, (got, want) in pairs.items():
    assert got.dtype == dtype, name
    tolerances.assert_close(got, want, dtype, name)


def test_topk_block_mask_is_the_oracles_selection_and_one_per_kv_group():
  q, k, _ = _qkv(15)
  tb = mech.topk_block_mask(q, k, block_size=8, top_k=2)
  assert (tb.num_batch, tb.num_heads) == (B, HKV)
  dense = np.asarray(tb.dense_kinds())
  static = bm_lib.make_block_mask(masks.causal(), T, T, 8, 8).dense_kinds()[0]
  scores = np.asarray(mech.block_scores(q, k, block_size=8))
  for b in range(B):
    for h in range(HKV):
      for i in range(6):
        cand = [j for j in range(i)]
        best = sorted(cand, key=lambda j: (-scores[b, h, i, j], j))[:2]
        assert set(np.flatnonzero(dense[b, h, i])) == set(best) | {i}
        np.testing.assert_array_equal(dense[b, h, i][dense[b, h, i] > 0], static[i][dense[b, h, i] > 0])


def test_block_scores_pool_every_query_head_of_the_group():
  """The selection score is the mean over the query block's tokens *and* the GQA group's query heads
  of ``q . mean(k over the key block)`` (NSA's shared selection), ragged last blocks included. The
  selection oracles call :func:`block_scores` themselves, so this checks it against its definition."""
  q, k, _ = _qkv(22)
  got = np.asarray(mech.block_scores(q, k, block_size=8))
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
  g, nb = HQ // HKV, -(-T // 8)
  want = np.zeros((B, HKV, nb, nb))
  for b in range(B):
    for h in range(HKV):
      for i in range(nb):
        for j in range(nb):
          kbar = kn[b, j * 8:(j + 1) * 8, h].mean(0)
          want[b, h, i, j] = (qn[b, i * 8:(i + 1) * 8, h * g:(h + 1) * g] @ kbar).mean()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dhsa_is_exact_whether_its_blocks_fit_the_static_width_or_not():
  """``max_blocks`` at the largest need takes the narrow branch; one less takes the full-width one."""
  from attn_jax.mechanisms import dhsa as dhsa_lib
  q, k, v = _qkv(16)
  ids = _chunk_ids(seed=4)
  needed = np.asarray(dhsa_lib._needed_blocks(dhsa_lib._tables(q, k, ids, 16), ids, 10, 4, 8, 16))
  widest = int(needed.sum(-1).max())
  assert 1 < widest < needed.shape[-1], "the case must need some but not all blocks"
  want = mech.dhsa_attention_reference(q, k, v, ids, num_chunks=16, budget=10)
  for max_blocks in (widest, widest - 1):
    got = jax.jit(lambda q, k, v: mech.dhsa_attention(q, k, v, ids, num_chunks=16, budget=10, block_q=4, block_kv=8,
                                                      max_blocks=max_blocks))(q, k, v)
    tolerances.assert_close(got, want, jnp.float32, f"max_blocks={max_blocks}")


def test_dynamic_mask_visits_only_blocks_with_kept_keys():
  """The BlockMask of DMA is exact: every selected tile holds a kept pair, every kept pair is in a
  selected tile, and its width never truncates."""
  q, k, v = _qkv(17, t=64)
  bias = normal(18, B, 64, HKV)
  tb = mech.dynamic_mask_block_mask(bias, q_len=64, window=5, block_size=8)
  assert tb.width == 6   # window + the own block
  sel = np.asarray(tb.dense_kinds()) > 0                                       # [B, Hkv, 8, 8]
  # Kept pairs from the oracle's ranking.
  s = np.asarray(bias).transpose(0, 2, 1)
  kept = np.zeros((B, HKV, 64, 64), bool)
  for b in range(B):
    for h in range(HKV):
      for i in range(64):
        order = sorted(range(i + 1), key=lambda j: (-s[b, h, j], -j))[:5]
        kept[b, h, i, order] = True
  kept_blocks = kept.reshape(B, HKV, 8, 8, 8, 8).any((3, 5))
  diag = np.eye(8, dtype=bool)
  np.testing.assert_array_equal(sel, kept_blocks | diag)


def test_power_attention_block_structure_and_backends():
  m = masks.power_attention(8, window_blocks=2, sink_blocks=1)
  dense = m.materialize(100, 100)
  for i in range(100):
    for j in range(100):
      d = i // 8 - j // 8
      want = j <= i and (d < 2 or (d & (d - 1)) == 0 or j < 8)
      assert dense[i, j] == want, (i, j)
  for block in (8, 16, 4):
    bm = bm_lib.make_block_mask(m, 100, 100, block, block)
    for i in range(bm.dense_kinds().shape[1]):
      for j in range(bm.dense_kinds().shape[2]):
        tile = dense[i * block:(i + 1) * block, j * block:(j + 1) * block]
        full = tile.all() and (j + 1) * block <= 100
        assert bm.dense_kinds()[0, i, j] == (2 if full else (1 if tile.any() else 0)), (block, i, j)
  assert m.in_kernel
  q, k, v = _qkv(19, t=70)
  from tests.softmax import helpers
  d_out, d_lse = normal(20, B, 70, HQ, 8), normal(21, B, 70, HQ)
  mask = masks.power_attention(8, window_blocks=1, sink_blocks=1, offset=0)
  helpers.compare_backends("xla", attn_jax.XlaConfig(block_q=8, block_kv=8), q, k, v, None, d_out, d_lse, mask=mask)
  helpers.compare_backends("pallas_gpu", attn_jax.PallasGpuConfig(block_q=16, block_kv=16, interpret=True), q, k, v,
                           None, d_out, d_lse, mask=mask)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_power_attention_and_traced_masks_lower_for_hardware(platform):
  """The power-of-two predicate (one bitwise AND) lowers in-kernel; the GPU kernel lowers with
  traced lists."""
  sd = jax.ShapeDtypeStruct
  impl, config = {"tpu": ("pallas_tpu", attn_jax.PallasTpuConfig(interpret=False)),
                  "cuda": ("pallas_gpu", attn_jax.PallasGpuConfig(interpret=False))}[platform]
  marker = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}[platform]
  args = [sd((1, 512, 4, 128), jnp.bfloat16), sd((1, 512, 2, 128), jnp.bfloat16), sd((1, 512, 2, 128), jnp.bfloat16)]
  loss = lambda q, k, v: attn_jax.attention(q, k, v, mask=masks.power_attention(128), implementation=impl,  # noqa: E731
                                            config=config).astype(jnp.float32).sum()
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  # Forward and backward: three kernels on GPU, two on TPU (fused backward).
  assert text.count(marker) >= (2 if platform == "tpu" else 3)
  if platform == "cuda":
    def traced_loss(q, k, v):
      tb = mech.topk_block_mask(q, k, block_size=64, top_k=2)
      return attn_jax.attention(q, k, v, block_mask=tb, implementation=impl, config=config).astype(jnp.float32).sum()
    text = jax.jit(jax.grad(traced_loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) >= 3


def test_bad_input_names_the_argument_and_the_range():
  q, k, v = _qkv()
  cases = [
      (lambda: mech.topk_block_attention(q, k, v, block_size=8, top_k=-1), r"top_k must be an int in \[0, num_kv_blocks=6\]"),
      (lambda: mech.topk_block_attention(q, k, v, block_size=8, top_k=7), r"top_k must be an int in \[0, num_kv_blocks=6\].*got 7"),
      (lambda: mech.topk_block_attention(q, k, v, block_size=0, top_k=1), "block_size must be a positive int, got 0"),
      (lambda: mech.dynamic_mask_attention(q, k, v, jnp.zeros((B, T, HKV)), window=46), r"window must be an int in \[1, 45\]"),
      (lambda: mech.dynamic_mask_attention(q, k, v, jnp.zeros((B, T, 1)), window=4), r"bias must have shape"),
      (lambda: mech.core_context_attention(q, k, v, group_size=4, window=6), "window must be a multiple of group_size=4"),
      (lambda: mech.core_context_attention(q, k, v, group_size=4, window=52), r"window must be an int in \[4, 48\]"),
      (lambda: mech.dhsa_attention(q, k, v, _chunk_ids(), num_chunks=16, budget=46), r"budget must be an int in \[1, 45\]"),
      (lambda: mech.dhsa_attention(q, k, v, _chunk_ids() * 2, num_chunks=32, budget=4), "chunk_ids must start at 0 and grow by 0 or 1"),
      (lambda: mech.hyper_attention(q, k, v, normal(0, 16, 4), jax.random.PRNGKey(0), block_size=4, sample_size=4,
                                    min_seq_len=8),
       "block_size=4 must divide every half"),
      (lambda: mech.hyper_attention(q, k, v, normal(0, 16, 4), jax.random.PRNGKey(0), block_size=5, sample_size=46,
                                    min_seq_len=8), r"sample_size must be an int in \[0, 45\]"),
      (lambda: mech.routing_attention(q, k, v, jnp.zeros((HQ, 3, 16)), cluster_size=46), r"cluster_size must be an int in \[1, 45\]"),
      (lambda: mech.routing_attention(q, k, v, jnp.zeros((HQ, 3, 16)), cluster_size=4, num_local_heads=1, local_window=3),
       "num_local_heads must be a multiple of the GQA group size 2"),
      (lambda: mech.landmark_attention(q, k, v, jnp.zeros((B, 5, HKV, 16)), block_size=8, top_k=6),
       r"top_k must be an int in \[0, 5\]"),
      (lambda: mech.landmark_attention(q, k, v, jnp.zeros((B, 4, HKV, 16)), block_size=8), "landmark_k must have shape"),
      (lambda: mech.superlinear_attention(q, k, v, span_size=7, top_k=7), r"top_k must be an int in \[0, 6\]"),
      (lambda: mech.recycled_attention(q[:, :5], k, v, prompt_len=40, stride=2, top_k=46),
       r"top_k must be an int in \[1, 45\]"),
      (lambda: mech.recycled_attention(q[:, :5], k, v, prompt_len=39, stride=2, top_k=4), "kv_len = prompt_len \\+ steps"),
      (lambda: masks.power_attention(0), "block_size must be >= 1, got 0"),
      (lambda: masks.power_attention(4, window_blocks=0), "window_blocks must be >= 1, got 0"),
  ]
  for call, match in cases:
    with pytest.raises(ValueError, match=match):
      call()


def test_topk_selection_recompiles_never():
  traces = collections.Counter()

  @jax.jit
  def step(q, k, v):
    traces["step"] += 1
    return jax.grad(lambda q: mech.topk_block_attention(q, k, v, block_size=8, top_k=2).sum())(q)

  grads = [step(*_qkv(seed)) for seed in (0, 3, 6)]
  assert traces["step"] == 1
  assert not np.allclose(grads[0], grads[1])
