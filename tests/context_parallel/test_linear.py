"""Context-parallel linear attention (state passing over the sequence shards) equals the
unsharded reference recurrence: outputs, final state and every gradient, for every decay kind,
segments crossing shard boundaries, initial states, GQA, normalisation, the non-causal form and
the Pallas kernels in interpret mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import sharding
from tests import tolerances

MESH = sharding.make_mesh(data=2, sequence=4)
HEADS_MESH = sharding.make_mesh(data=2, sequence=2, tensor=2)
B, T, HQ, HKV, D = 2, 32, 4, 2, 8


def _inputs(decay, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (B, T, HQ, D))
  k = jax.random.normal(ks[1], (B, T, HKV, D))
  v = jax.random.normal(ks[2], (B, T, HKV, D))
  small = lambda key, shape: -0.2 * jax.nn.sigmoid(jax.random.normal(key, shape))
  log_decay = {"none": None, "fixed": small(ks[3], (HKV,)), "step": small(ks[3], (B, T, HQ)),
               "channel": small(ks[3], (B, T, HKV, D))}[decay]
  return q, k, v, log_decay, ks[4]


def _segments():
  # Boundaries inside the second shard, exactly at the third shard's start, and at token 30.
  ids = np.searchsorted([11, 16, 30], np.arange(T), side="right")
  return jnp.asarray(np.stack([ids, np.zeros(T, int)]), jnp.int32)


def _value_and_grads(cp, implementation, config, q, k, v, log_decay, init, **kwargs):
  def loss(q, k, v, log_decay, init):
    o, s = attn_jax.linear_attention(q, k, v, log_decay=log_decay, initial_state=init, return_final_state=True,
                                     implementation=implementation, config=config, context_parallel=cp,
                                     **kwargs)
    w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
    return (o * w).sum() + 0.3 * (s * s).sum(), (o, s)

  argnums = tuple(i for i, x in enumerate((q, k, v, log_decay, init)) if x is not None)
  fn = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))
  (_, (o, s)), grads = fn(q, k, v, log_decay, init)
  return o, s, grads


CASES = {
    # decay: (segments, initial state, heads split over "tensor", other kwargs)
    "none": (True, False, False, dict(normalize=True, feature_map="elu+1")),
    "fixed": (False, True, True, {}),
    "step": (True, True, False, dict(scale=0.5)),
    "channel": (True, True, True, {}),
}


@pytest.mark.parametrize("decay", sorted(CASES))
def test_matches_unsharded_reference(decay):
  use_seg, use_init, split_heads, kwargs = CASES[decay]
  q, k, v, log_decay, key = _inputs(decay)
  if use_seg:
    kwargs = dict(kwargs, segment_ids=_segments())
  hs = HQ if decay == "step" else HKV
  init = jax.random.normal(key, (B, hs, D, D)) if use_init else None
  if split_heads:
    cp = attn_jax.ContextParallel(HEADS_MESH, "sequence", batch_axes="data", head_axes="tensor")
  else:
    cp = attn_jax.ContextParallel(MESH, "sequence", batch_axes="data")
  got = _value_and_grads(cp, "xla", attn_jax.LinearXlaConfig(chunk_size=4), q, k, v, log_decay, init, **kwargs)
  want = _value_and_grads(None, "reference", None, q, k, v, log_decay, init, **kwargs)
  tolerances.assert_close(got[0], want[0], jnp.float32, "o", factor=2)
  tolerances.assert_close(got[1], want[1], jnp.float32, "final state", factor=2)
  for i, (a, b) in enumerate(zip(got[2], want[2])):
    tolerances.assert_close(a, b, jnp.float32, f"grad {i}", factor=2)


def test_non_causal_with_segments():
  # The per-document global state runs as a causal and an anti-causal context-parallel pass.
  q, k, v, _, _ = _inputs("none", seed=1)
  cp = attn_jax.ContextParallel(MESH, "sequence", batch_axes="data")
  kwargs = dict(causal=False, segment_ids=_segments(), feature_map="relu")
  got = _value_and_grads(cp, "xla", None, q, k, v, None, None, **kwargs)
  want = _value_and_grads(None, "reference", None, q, k, v, None, None, **kwargs)
  for name, a, b in zip(["o", "state", "dq", "dk", "dv"], got[:2] + tuple(got[2]), want[:2] + tuple(want[2])):
    tolerances.assert_close(a, b, jnp.float32, name, factor=2)


def test_pallas_kernels_on_local_shards():
  mesh = sharding.make_mesh(data=2, sequence=2, devices=jax.devices()[:4])
  cp = attn_jax.ContextParallel(mesh, "sequence", batch_axes="data")
  q, k, v, log_decay, key = _inputs("step")
  config = attn_jax.LinearPallasTpuConfig(chunk_size=8, interpret=True)
  kwargs = dict(segment_ids=_segments())
  init = jax.random.normal(key, (B, HQ, D, D))
  got = _value_and_grads(cp, "pallas_tpu", config, q, k, v, log_decay, init, **kwargs)
  want = _value_and_grads(None, "reference", None, q, k, v, log_decay, init, **kwargs)
  for i, (a, b) in enumerate(zip(got[:2] + tuple(got[2]), want[:2] + tuple(want[2]))):
    tolerances.assert_close(a, b, jnp.float32, f"output {i}", factor=2)


def test_state_passing_is_a_log_depth_scan():
  # 4 shards: log2(4) = 2 rounds that pass states (2 ppermutes) and decay maps (1: the last
  # round's map is unused), one shift of the states to the next shard and one of the last
  # segment id: 5 collective permutes of state-sized (or smaller) messages, and no all-gather.
  q, k, v, log_decay, _ = _inputs("step")
  cp = attn_jax.ContextParallel(MESH, "sequence", batch_axes="data")
  f = jax.jit(lambda q, k, v, a: attn_jax.linear_attention(q, k, v, log_decay=a, segment_ids=_segments(),
                                                           context_parallel=cp))
  text = f.lower(q, k, v, log_decay).as_text()
  assert text.count("collective_permute") == 5
  assert "all_gather" not in text and "all-gather" not in text


def test_bad_sequence_length():
  cp = attn_jax.ContextParallel(MESH, "sequence")
  x = jnp.zeros((2, 30, 2, 8))
  with pytest.raises(ValueError, match=r"seq_len 30 must be divisible by the size 4 of mesh axis 'sequence'"):
    attn_jax.linear_attention(x, x, x, context_parallel=cp)
  x = jnp.zeros((2, 32, 2, 8))
  with pytest.raises(ValueError, match=r"times chunk_size 16 \(= 64\)"):
    attn_jax.linear_attention(x, x, x, chunk_size=16, context_parallel=cp)
