"""The xla backend against the reference: every mask family x self/cross x dtype x length x heads.

The full product (12 masks x 2 patterns x 2 dtypes x 4 lengths x 3 head layouts = 576 compiled
cases) runs with ``-m slow``. The default run is a covering design of 96 cases: every mask meets
every pattern and every length, and the (dtype, head layout) pair rotates over those eight
(pattern, length) slots so that every mask also meets all six dtype x head-layout pairs.
"""

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax import masks
from tests.softmax import helpers


def _layout_mask():
  # Layout blocks of 37 tokens straddle the backend's 32 x 16 tiles, so some tiles are partial.
  rng = np.random.RandomState(3)
  return masks.block_layout(rng.rand(7, 7) < 0.5, 37, 37)


_ODD = masks.from_fn(lambda q, k: (q + 2 * k) % 5 != 0, name="(q+2k)%5!=0")
_PER_HEAD = masks.from_fn(lambda q, k, h: (k <= q + 8 * h) | (k < 2), name="k<=q+8h|k<2")

MASKS = {
    "full": masks.full(),
    "causal": masks.causal(),
    "causal_offset0": masks.causal(offset=0),
    "window": masks.sliding_window(20),
    "window_lr": masks.sliding_window(9, 12),
    "window_sinks": masks.sliding_window(16) | masks.sink_tokens(3),
    "sinks_only": masks.sink_tokens(4),
    "chunked": masks.chunked_causal(24),
    "prefix": masks.prefix_lm(40),
    "layout": _layout_mask(),
    "from_fn": _ODD & masks.causal(),
    "per_head": _PER_HEAD,
}
LENGTHS = [1, 63, 130, 257]
# For cross attention, each query length is paired with a different key length (257 -> 1 makes
# almost every causal row fully masked).
CROSS_KV = {1: 130, 63: 257, 130: 63, 257: 1}
CONFIG = attn_jax.XlaConfig(block_q=32, block_kv=16)


DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
PAIRS = [(d, h) for d in DTYPES for h in helpers.HEAD_LAYOUTS]


def _full_product():
  for mask_name in MASKS:
    for pattern in ("self", "cross"):
      for dtype in DTYPES:
        for head in helpers.HEAD_LAYOUTS:
          for q_len in LENGTHS:
            yield mask_name, pattern, dtype, head, q_len


def _covering():
  for m, mask_name in enumerate(MASKS):
    for p, pattern in enumerate(("self", "cross")):
      for n, q_len in enumerate(LENGTHS):
        dtype, head = PAIRS[(4 * p + n + m) % len(PAIRS)]
        yield mask_name, pattern, dtype, head, q_len


def _case_id(case):
  return "-".join(str(x) for x in case)


def _check(mask_name, pattern, dtype, head, q_len):
  kv_len = q_len if pattern == "self" else CROSS_KV[q_len]
  hq, hkv = helpers.HEAD_LAYOUTS[head]
  seed = zlib.crc32(f"{mask_name}/{pattern}/{q_len}".encode()) % 1000
  inputs = helpers.make_inputs(seed, 2, q_len, kv_len, hq, hkv, 16, 8, DTYPES[dtype])
  helpers.compare_backends("xla", CONFIG, *inputs, mask=MASKS[mask_name])


COVERING = list(_covering())


def test_covering_design_covers_every_pair():
  assert {(c[0], c[1], c[4]) for c in COVERING} == {(m, p, n) for m in MASKS for p in ("self", "cross") for n in LENGTHS}
  assert {(c[0], c[2], c[3]) for c in COVERING} == {(m, d, h) for m in MASKS for d, h in PAIRS}


@pytest.mark.parametrize("case", COVERING, ids=_case_id)
def test_xla_matches_reference(case):
  _check(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in _full_product() if c not in COVERING], ids=_case_id)
def test_xla_matches_reference_full_product(case):
  _check(*case)


@pytest.mark.parametrize("with_segments", [False, True])
@pytest.mark.parametrize("soft_cap", [None, 3.0])
def test_sinks_softcap_segments_combinations(with_segments, soft_cap):
  q, k, v, sinks, d_out, d_lse = helpers.make_inputs(7, 2, 70, 70, 4, 2, 16, 16, jnp.float32, scale=2.0)
  kwargs = dict(mask=masks.causal(), logits_soft_cap=soft_cap)
  if with_segments:
    seg = jnp.asarray(np.stack([np.repeat([0, 1, 2], [30, 25, 15]), np.repeat([5, 9], [1, 69])]), jnp.int32)
    kwargs["q_segment_ids"] = seg
  helpers.compare_backends("xla", CONFIG, q, k, v, sinks, d_out, d_lse, **kwargs)


def test_cross_segments_and_v_head_dim():
  q, k, v, sinks, d_out, d_lse = helpers.make_inputs(8, 2, 45, 77, 6, 3, 16, 24, jnp.float32)
  rng = np.random.RandomState(0)
  q_seg = jnp.asarray(np.sort(rng.randint(0, 4, (2, 45)), axis=1), jnp.int32)
  kv_seg = jnp.asarray(np.sort(rng.randint(0, 4, (2, 77)), axis=1), jnp.int32)
  helpers.compare_backends("xla", CONFIG, q, k, v, sinks, d_out, d_lse, mask=masks.causal(),
                           q_segment_ids=q_seg, kv_segment_ids=kv_seg)


def test_float16():
  inputs = helpers.make_inputs(9, 1, 100, 100, 4, 1, 32, 32, jnp.float16)
  helpers.compare_backends("xla", CONFIG, *inputs, mask=masks.sliding_window(30) | masks.sink_tokens(2))


def test_default_config_blocks():
  inputs = helpers.make_inputs(10, 1, 600, 600, 2, 2, 16, 16, jnp.float32)
  helpers.compare_backends("xla", None, *inputs, mask=masks.causal())
