"""Mask predicates against their definitions written out element by element."""

import numpy as np
import pytest

from attn_jax import masks


def brute(fn, q_len, kv_len):
  return np.array([[fn(i, j) for j in range(kv_len)] for i in range(q_len)], bool)


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (5, 5), (4, 9), (9, 4), (1, 7)])
def test_constructors_match_definitions(q_len, kv_len):
  off = kv_len - q_len
  cases = [
      (masks.full(), lambda i, j: True),
      (masks.causal(), lambda i, j: j <= i + off),
      (masks.causal(offset=0), lambda i, j: j <= i),
      (masks.causal(offset=2), lambda i, j: j <= i + 2),
      (masks.sliding_window(2), lambda i, j: i + off - 2 <= j <= i + off),
      (masks.sliding_window(1, 2), lambda i, j: i + off - 1 <= j <= i + off + 2),
      (masks.sliding_window(1, offset=0), lambda i, j: i - 1 <= j <= i),
      (masks.sink_tokens(2), lambda i, j: j < 2 and j <= i + off),
      (masks.sink_tokens(2, causal=False), lambda i, j: j < 2),
      (masks.chunked_causal(3), lambda i, j: (i + off) // 3 == j // 3 and j <= i + off),
      (masks.prefix_lm(3), lambda i, j: j < 3 or j <= i + off),
  ]
  for m, fn in cases:
    np.testing.assert_array_equal(m.materialize(q_len, kv_len), brute(fn, q_len, kv_len), err_msg=repr(m))


def test_block_layout_and_from_fn():
  layout = np.array([[1, 0, 1], [0, 1, 0]], bool)
  m = masks.block_layout(layout, 3, 2)
  expected = brute(lambda i, j: layout[i // 3, j // 2], 6, 6)
  np.testing.assert_array_equal(m.materialize(6, 6), expected)

  f = masks.from_fn(lambda q, k: (q + k) % 3 == 0)
  np.testing.assert_array_equal(f.materialize(4, 5), brute(lambda i, j: (i + j) % 3 == 0, 4, 5))
  h = masks.from_fn(lambda q, k, head: k <= q + head)
  assert h.depends_on_head and not f.depends_on_head
  dense = h.materialize(3, 4, num_heads=2)
  assert dense.shape == (2, 3, 4)
  np.testing.assert_array_equal(dense[1], brute(lambda i, j: j <= i + 1, 3, 4))
  with pytest.raises(ValueError, match="num_heads"):
    h.materialize(3, 4)


def test_algebra():
  a, b = masks.causal(), masks.sliding_window(2) | masks.sink_tokens(1)
  da, db = a.materialize(7, 7), b.materialize(7, 7)
  np.testing.assert_array_equal((a & b).materialize(7, 7), da & db)
  np.testing.assert_array_equal((a | b).materialize(7, 7), da | db)
  np.testing.assert_array_equal((~a).materialize(7, 7), ~da)
  np.testing.assert_array_equal((~(a & ~b)).materialize(7, 7), ~(da & ~db))
  with pytest.raises(TypeError, match="Mask"):
    a & np.ones((7, 7), bool)


def test_masks_are_hashable_values():
  assert masks.causal() == masks.causal() and hash(masks.causal()) == hash(masks.causal())
  assert masks.causal(1) != masks.causal(2)
  assert masks.sliding_window(4) | masks.sink_tokens(2) == masks.sliding_window(4) | masks.sink_tokens(2)
  lay = np.eye(3, dtype=bool)
  assert masks.block_layout(lay, 2, 2) == masks.block_layout(lay.copy(), 2, 2)
  assert hash(masks.block_layout(lay, 2, 2)) == hash(masks.block_layout(lay.copy(), 2, 2))
  assert masks.block_layout(lay, 2, 2) != masks.block_layout(~lay, 2, 2)
  fn = lambda q, k: q >= k  # noqa: E731
  assert masks.from_fn(fn) == masks.from_fn(fn)
  # Usable as dict keys (jit static arguments, block-mask cache).
  assert len({masks.causal(), masks.causal(), masks.full()}) == 2


@pytest.mark.parametrize("call,match", [
    (lambda: masks.sliding_window(-1), "left must be >= 0, got -1"),
    (lambda: masks.sliding_window(2, -3), "right must be >= 0, got -3"),
    (lambda: masks.sliding_window(2.5), "left must be an int"),
    (lambda: masks.sink_tokens(-2), "n must be >= 0"),
    (lambda: masks.chunked_causal(0), "chunk must be >= 1"),
    (lambda: masks.prefix_lm(-1), "prefix_len must be >= 0"),
    (lambda: masks.causal(offset=1.5), "offset must be an int"),
    (lambda: masks.block_layout(np.ones(3, bool), 2, 2), "layout must be a 2-D"),
    (lambda: masks.block_layout(np.full((2, 2), 3), 2, 2), "layout must be boolean"),
    (lambda: masks.block_layout(np.ones((2, 2), bool), 0, 2), "block_q must be >= 1"),
    (lambda: masks.from_fn(lambda q: q), "fn must take"),
    (lambda: masks.from_fn(3), "fn must be callable"),
])
def test_bad_constructor_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_block_layout_must_cover_lengths():
  m = masks.block_layout(np.ones((2, 2), bool), 4, 4)
  m.materialize(8, 8)
  with pytest.raises(ValueError, match=r"does not cover q_len=9"):
    m.materialize(9, 8)
