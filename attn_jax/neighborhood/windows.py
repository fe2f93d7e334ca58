"""Per-axis neighborhood windows (NATTEN semantics) as integer arithmetic on index arrays."""

from __future__ import annotations


def axis_window(c, length, kernel: int, stride: int, causal: bool, xp):
  """``(start, end)`` of the keys seen by query position ``c`` on one axis, both inclusive.

  ``c`` and ``length`` are integer arrays (or ints); only ``+ - * //``, ``xp.minimum`` and
  ``xp.maximum`` are used, so this runs on the host, in traced JAX and inside kernels.
  """
  if causal:
    leader = xp.minimum((c // stride) * stride + (stride - 1), length - 1)
    return leader - (kernel - 1), xp.minimum(c, length - 1)
  left = kernel // 2
  right = kernel - 1 - left
  leader = xp.minimum((c // stride) * stride + stride // 2, length - 1)
  centre = xp.maximum(xp.minimum(leader, length - 1 - right), left)
  return centre - left, centre + right


def residue_length(length: int, dilation: int, r):
  """Length of residue class ``r`` of an axis of ``length`` with ``dilation``: ceil((L - r) / d)."""
  return (length - r + (dilation - 1)) // dilation
