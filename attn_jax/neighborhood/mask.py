"""The neighborhood-attention mask on the tiled token order, with exact block bounds.

Per axis (inside one residue class of the dilation, of length ``L``), with window ``w``, stride
``s``, ``left = w // 2`` and ``right = w // 2 + w % 2 - 1`` (so ``left + right = w - 1``), query
position ``c`` sees the keys ``[start(c), end(c)]``:

* non-causal: ``leader = min((c // s) * s + s // 2, L - 1)`` (the centre of its stride group),
  ``centre = clamp(leader, left, L - 1 - right)``, ``start = centre - left``,
  ``end = centre + right``: the window of ``w`` keys around the leader, shifted inward at the
  borders;
* causal: ``leader = min((c // s) * s + s - 1, L - 1)`` (the last query of its group),
  ``start = leader - w + 1``, ``end = min(c, L - 1)``: keys at or before the query, within
  ``w`` of the leader.

Both ``start`` and ``end`` are non-decreasing in ``c`` and jump by at most ``s <= w``, so the
windows of an interval of queries ``[a, b]`` cover exactly ``[start(a), end(b)]`` and share
exactly ``[start(b), end(a)]``. That makes the per-axis block bounds exact, and the N-D bounds
exact on boxes because the N-D mask is the product of the per-axis ones.

Padding tokens (``c >= L``) are invisible as keys; as queries they see the window of a real
query of their stride group (their output is discarded), which keeps blocks containing them
full when their real rows are.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attn_jax import masks as masks_lib
from attn_jax.neighborhood import tiling
from attn_jax.neighborhood import windows


@dataclasses.dataclass(frozen=True)
class NeighborhoodMask(masks_lib.Mask):
  """Neighborhood attention (NATTEN semantics) between tokens in :class:`TileLayout` order.

  Queries are the ``layout.num_tokens`` permuted grid tokens; keys are the same tokens followed
  by any number of additional keys (``kv_idx >= layout.num_tokens``), visible to every query.
  ``evaluate`` uses only integer ``+ - *``, truncating division and remainder of non-negative
  values (:func:`attn_jax.masks.div_nonneg`), comparisons, ``& | ~`` and ``xp.minimum`` /
  ``xp.maximum`` on the index arrays, with Python-int constants, so kernels can evaluate it on
  partial tiles.

  Attributes:
    layout: the token permutation (grid, dilation, tile shape).
    kernel_size, stride: per-axis ints with ``2 <= kernel_size``, ``1 <= stride <= kernel_size``.
    is_causal: per-axis bools.
  """

  layout: tiling.TileLayout
  kernel_size: tuple[int, ...]
  stride: tuple[int, ...]
  is_causal: tuple[bool, ...]

  def validate(self, ctx: masks_lib.MaskContext) -> None:
    n = self.layout.num_tokens
    if ctx.q_len != n or ctx.kv_len < n:
      raise ValueError(
          f"{self!r} expects q_len == {n} permuted grid tokens and kv_len >= {n}, got "
          f"q_len={ctx.q_len}, kv_len={ctx.kv_len}")

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    lay = self.layout
    q_coords = lay.axis_coords(q_idx, xp)
    k_coords = lay.axis_coords(kv_idx, xp)
    visible = None
    for a, ((rq, cq), (rk, ck)) in enumerate(zip(q_coords, k_coords)):
      length, d = lay.spatial_shape[a], lay.dilation[a]
      axis_len = length if d == 1 else windows.residue_length(length, d, rq, xp)
      start, end = windows.axis_window(cq, axis_len, self.kernel_size[a], self.stride[a],
                                       self.is_causal[a], xp)
      ok = (start <= ck) & (ck <= end)
      if d > 1:
        ok = ok & (rq == rk)
      visible = ok if visible is None else visible & ok
    return visible | (lay.num_tokens <= kv_idx)

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    lay = self.layout
    n_sp = lay.num_tokens
    shape = np.broadcast_shapes(np.shape(q_lo), np.shape(k_lo))
    k_lo = np.asarray(k_lo)
    k_hi = np.asarray(k_hi)
    has_spatial = k_lo < n_sp
    q_hulls = lay.axis_hulls(q_lo, q_hi)
    k_hulls = lay.axis_hulls(np.minimum(k_lo, n_sp - 1), np.minimum(k_hi, n_sp - 1))
    may = np.ones(shape, bool)
    must = np.ones(shape, bool)
    for a, (qh, kh) in enumerate(zip(q_hulls, k_hulls)):
      rq_lo, rq_hi, a_lo, a_hi = qh
      rk_lo, rk_hi, e_lo, e_hi = kh
      length, d = lay.spatial_shape[a], lay.dilation[a]
      # Exact interval analysis needs a single residue class on both sides; ranges over several
      # classes (possible only for blocks larger than a class) are bounded conservatively.
      single = (rq_lo == rq_hi) & (rk_lo == rk_hi) & (rq_lo == rk_lo)
      overlap = (rq_lo <= rk_hi) & (rk_lo <= rq_hi)
      axis_len = windows.residue_length(length, d, rq_lo)
      kernel, stride, causal = self.kernel_size[a], self.stride[a], self.is_causal[a]
      start_a, end_a = windows.axis_window(a_lo, axis_len, kernel, stride, causal, np)
      start_b, end_b = windows.axis_window(a_hi, axis_len, kernel, stride, causal, np)
      may_a = (e_lo <= end_b) & (start_a <= e_hi)
      must_a = (start_b <= e_lo) & (e_hi <= end_a)
      may = may & np.where(single, may_a, overlap)
      must = must & single & must_a
    may = (may & has_spatial) | (k_hi >= n_sp)
    must = np.where(has_spatial, must, True)
    return np.broadcast_to(may, shape), np.broadcast_to(must, shape)

  def block_bounds_exact(self, q_lo, q_hi, k_lo, k_hi, ctx):
    # The per-axis analysis is exact on boxes inside one residue class per axis: whole tiles,
    # or runs of tiles that form a box (blocks that are multiples of the tile). Key ranges made
    # only of additional keys are all visible.
    lay = self.layout
    n_sp = lay.num_tokens
    k_lo, k_hi = np.asarray(k_lo), np.asarray(k_hi)
    k_lo_sp, k_hi_sp = np.minimum(k_lo, n_sp - 1), np.minimum(k_hi, n_sp - 1)
    exact = lay.range_is_box(q_lo, q_hi) & lay.range_is_box(k_lo_sp, k_hi_sp)
    for (rq_lo, rq_hi, _, _), (rk_lo, rk_hi, _, _) in zip(lay.axis_hulls(q_lo, q_hi),
                                                          lay.axis_hulls(k_lo_sp, k_hi_sp)):
      exact = exact & (rq_lo == rq_hi) & (rk_lo == rk_hi)
    return exact | (k_lo >= n_sp)

  def __repr__(self):
    lay = self.layout
    return (f"neighborhood(shape={lay.spatial_shape}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, dilation={lay.dilation}, is_causal={self.is_causal}, "
            f"tile_shape={lay.tile_shape})")
