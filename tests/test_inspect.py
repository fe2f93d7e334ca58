"""attn_jax.inspect: probabilities against every backend's output, sinks and ACT calibration
against per-row definitions, retrieval scores, head hooks and multi-layer reachability."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import inspect as insp
from attn_jax import masks
from tests import tolerances

BACKENDS = {
    "reference": ("reference", None),
    "xla": ("xla", attn_jax.XlaConfig(block_q=8, block_kv=8)),
    "pallas_tpu": ("pallas_tpu", attn_jax.PallasTpuConfig(block_q=16, block_kv=16)),
}


def _inputs(seed, b=1, tq=21, tk=21, hq=4, hkv=2, d=16):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (b, tq, hq, d))
  k = jax.random.normal(ks[1], (b, tk, hkv, d))
  v = jax.random.normal(ks[2], (b, tk, hkv, 8))
  sinks = jax.random.normal(ks[3], (hq,))
  return q, k, v, sinks


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_probs_reproduce_the_backend_output(backend):
  q, k, v, sinks = _inputs(0)
  seg = jnp.asarray([[0] * 9 + [1] * 12])
  impl, config = BACKENDS[backend]
  kw = dict(mask=masks.causal() & masks.sliding_window(12), sinks=sinks, logits_soft_cap=4.0,
            q_segment_ids=seg, implementation=impl, config=config)
  probs, lse = jax.jit(lambda q, k: insp.attention_probs(q, k, **kw))(q, k)
  out, lse_ref = jax.jit(lambda q, k, v: attn_jax.attention(q, k, v, return_lse=True, **kw))(q, k, v)
  tolerances.assert_close(insp.attend(probs, v), out, jnp.float32, "out")
  tolerances.assert_close(lse, lse_ref, jnp.float32, "lse")
  # With sinks a row sums to 1 - p_sink, p_sink = exp(sink - lse).
  p_sink = jnp.exp(sinks[None, :, None] - lse.transpose(0, 2, 1))
  np.testing.assert_allclose(probs.sum(-1) + p_sink, 1.0, atol=1e-5)
  dense = (masks.causal() & masks.sliding_window(12)).materialize(21, 21) & (seg[0][:, None] == seg[0][None])
  assert not np.asarray(probs)[:, :, ~dense].any()


def test_probs_head_dependent_mask_and_empty_rows():
  q, k, _, _ = _inputs(1, tq=6, tk=3, hq=2, hkv=1)
  mask = masks.causal() & masks.from_fn(lambda i, j, h: j >= h)
  probs, lse = jax.jit(lambda q, k: insp.attention_probs(q, k, mask=mask, implementation="xla"))(q, k)
  dense = mask.materialize(6, 3, num_heads=2)
  assert not np.asarray(probs)[0][~dense].any()
  rows = np.asarray(probs.sum(-1))[0]
  np.testing.assert_allclose(rows, np.where(dense.any(-1), 1.0, 0.0), atol=1e-6)
  assert np.isneginf(np.asarray(lse)[0, :3, 0]).all()  # queries 0..2 see no key (offset -3)


def test_find_sinks():
  q, k, _, _ = _inputs(2, tq=32, tk=32, hq=2, hkv=2)
  # Key 5 of head 1 aligns with every query: a sink for head 1 only.
  k = k.at[:, 5, 1].set(6.0 * q[0, :, 1].mean(0) / jnp.linalg.norm(q[0, :, 1].mean(0)))
  q = q.at[:, :, 1].add(3.0 * k[0, 5, 1] / jnp.linalg.norm(k[0, 5, 1]))
  probs, _ = jax.jit(insp.attention_probs)(q, k)
  s = insp.find_sinks(probs, ratio=5.0)
  assert bool(s.is_sink[0, 1, 5]) and not bool(s.is_sink[0, 0].any())
  np.testing.assert_allclose(s.share.sum(-1), 1.0, atol=1e-5)
  assert float(s.head_mass[0, 1]) > 0.5 and float(s.head_mass[0, 0]) == 0.0
  assert not bool(insp.find_sinks(probs, ratio=5.0, ignore_first=6).is_sink[0, 1, 5])


def _calibrate_row(row, sink, beta):
  row = np.array(row, np.float64)
  rest = row[~sink].sum()
  if rest <= 0:
    return row
  removed = (1 - beta) * row[sink].sum()
  out = row.copy()
  out[sink] = beta * row[sink]
  out[~sink] = row[~sink] + removed * row[~sink] / rest
  return out


def test_calibrate_sinks_matches_per_row_definition():
  rng = np.random.RandomState(0)
  probs = rng.dirichlet(np.ones(7), size=(2, 3, 5)).astype(np.float32)
  probs[1, 2, 4] = 0.0
  probs[1, 2, 4, [1, 3]] = [0.3, 0.7]                   # a row whose mass sits on sinks only
  is_sink = np.zeros((3, 7), bool)
  is_sink[:, [1, 3]] = True
  beta = np.array([0.4, 1.0, 0.0], np.float32)
  got = np.asarray(insp.calibrate_sinks(jnp.asarray(probs), is_sink, beta))
  for b, h, i in itertools.product(range(2), range(3), range(5)):
    np.testing.assert_allclose(got[b, h, i], _calibrate_row(probs[b, h, i], is_sink[h], beta[h]), atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), probs.sum(-1), atol=1e-6)
  np.testing.assert_array_equal(got[:, 1], probs[:, 1])  # beta = 1 leaves head 1 alone
  with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):
    insp.calibrate_sinks(jnp.asarray(probs), is_sink, 1.5)
  with pytest.raises(ValueError, match="is_sink must have shape"):
    insp.calibrate_sinks(jnp.asarray(probs), is_sink[:, :3], 0.5)


def test_retrieval_head_scores():
  tk, tq = 12, 4
  key_tokens = jnp.asarray([[9, 9, 9, 1, 2, 3, 4, 9, 9, 9, 9, 9]])
  out_tokens = jnp.asarray([[1, 2, 3, 4]])
  probs = np.full((1, 3, tq, tk), 0.01, np.float32)
  for t in range(tq):
    probs[0, 0, t, 3 + t] = 0.9          # head 0 copies every needle token
    probs[0, 1, t, 0] = 0.9              # head 1 looks at the start
    probs[0, 2, t, 3] = 0.9              # head 2 always looks at needle token "1": copies once
  scores = insp.retrieval_head_scores(jnp.asarray(probs), key_tokens, out_tokens, (3, 7))
  np.testing.assert_allclose(scores, [[1.0, 0.0, 0.25]])
  mask = np.zeros((1, tk), bool)
  mask[0, 3:7] = True
  np.testing.assert_allclose(insp.retrieval_head_scores(jnp.asarray(probs), key_tokens, out_tokens, mask), scores)
  with pytest.raises(ValueError, match="needle must be a span"):
    insp.retrieval_head_scores(jnp.asarray(probs), key_tokens, out_tokens, (7, 3))


def test_head_hooks():
  out = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 4))
  hook = insp.head_hook(3, ablate=[1], scales=[2.0, 1.0, 0.5])
  got = hook(out)
  np.testing.assert_allclose(got[:, :, 0], 2 * out[:, :, 0])
  np.testing.assert_array_equal(got[:, :, 1], 0)
  np.testing.assert_allclose(got[:, :, 2], 0.5 * out[:, :, 2])
  mean = insp.ablate_heads(out, [2], mode="mean")
  np.testing.assert_allclose(mean[:, :, 2], jnp.broadcast_to(out[:, :, 2].mean(1, keepdims=True), (2, 5, 4)), atol=1e-6)
  np.testing.assert_array_equal(mean[:, :, :2], out[:, :, :2])
  np.testing.assert_allclose(insp.scale_heads(out, jnp.asarray([0.0, 1.0, 3.0])), out * jnp.asarray([0, 1, 3.0])[:, None])
  # Hashable, so usable as a static argument of jit inside a model's forward.
  assert hook == insp.head_hook(3, ablate=(1,), scales=(2.0, 1.0, 0.5)) and len({hook, hook}) == 1
  f = jax.jit(lambda x, h: h(x), static_argnums=1)
  np.testing.assert_allclose(f(out, hook), got)
  with pytest.raises(ValueError, match=r"ablate must name heads in \[0, 3\)"):
    insp.head_hook(3, ablate=[3])
  with pytest.raises(ValueError, match="expects outputs"):
    hook(out[:, :, :2])
  with pytest.raises(ValueError, match="mode must be"):
    insp.head_hook(3, mode="noise")


def _reach_brute(dense_layers, residual):
  t = dense_layers[0].shape[0]
  reach = [np.eye(t, dtype=bool)]
  for dense in dense_layers:
    prev = reach[-1]
    nxt = np.zeros_like(prev)
    for i in range(t):
      sources = [j for j in range(t) if dense[i, j] or (residual and i == j)]
      for j in sources:
        nxt[i] |= prev[j]
    reach.append(nxt)
  return np.stack(reach[1:])


def test_reachability():
  layer_masks = [masks.sliding_window(2), masks.from_fn(lambda i, j: (j <= i) & ((i - j) % 3 == 0)),
                 masks.lookahead(1, left=1)]
  dense = [m.materialize(13, 13) for m in layer_masks]
  for residual in (True, False):
    np.testing.assert_array_equal(insp.reachability(layer_masks, 13, residual=residual),
                                  _reach_brute(dense, residual))
  # A window of w reaches l * (w - 1) tokens back after l layers.
  r = insp.reachability([masks.sliding_window(3)] * 4, 20)
  assert [int(r[l, 19].sum()) for l in range(4)] == [4, 7, 10, 13]
  roll = insp.reachability([masks.causal()] * 6, 16, mode="rollout")
  np.testing.assert_allclose(roll.sum(-1), 1.0, atol=1e-12)
  # Under causal masks rollout mass piles up on the first token as depth grows.
  assert roll[-1, -1, 0] > roll[0, -1, 0] and roll[-1, -1, 0] > roll[-1, -1, 8]
  heads = insp.reachability([masks.from_fn(lambda i, j, h: j == i - 1 - h)], 6, residual=False, num_heads=2)
  np.testing.assert_array_equal(heads[0], np.eye(6, k=-1, dtype=bool) | np.eye(6, k=-2, dtype=bool))
  with pytest.raises(ValueError, match="sequence of masks"):
    insp.reachability(masks.causal(), 4)
  with pytest.raises(ValueError, match="mode must be"):
    insp.reachability([masks.causal()], 4, mode="paths")
