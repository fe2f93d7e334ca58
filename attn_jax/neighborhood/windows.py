"""Per-axis neighborhood windows (NATTEN semantics) as integer arithmetic on index arrays."""

from __future__ import annotations

import numpy as np

from attn_jax import masks as masks_lib


def axis_window(c, length, kernel: int, stride: int, causal: bool, xp):
  """``(start, end)`` of the keys seen by query position ``c`` on one axis, both inclusive.

  ``c`` and ``length`` are non-negative integer arrays (or ints); only ``+ - *``, a truncating
  division of non-negative values (:func:`attn_jax.masks.div_nonneg`, which lowers to a plain
  integer division in Mosaic and Triton), ``xp.minimum`` and ``xp.maximum`` are used, so this
  runs on the host, in traced JAX and inside kernels.
  """
  group = masks_lib.div_nonneg(c, stride, xp) * stride
  if causal:
    leader = xp.minimum(group + (stride - 1), length - 1)
    return leader - (kernel - 1), xp.minimum(c, length - 1)
  left = kernel // 2
  right = kernel - 1 - left
  leader = xp.minimum(group + stride // 2, length - 1)
  centre = xp.maximum(xp.minimum(leader, length - 1 - right), left)
  return centre - left, centre + right


def residue_length(length: int, dilation: int, r, xp=None):
  """Length of residue class ``r`` of an axis of ``length`` with ``dilation``: ceil((L - r) / d).

  ``0 <= r < dilation <= length``, so the dividend is non-negative.
  """
  return masks_lib.div_nonneg(length - r + (dilation - 1), dilation, np if xp is None else xp)
