"""Token permutation into spatially contiguous tiles (Generalized Neighborhood Attention).

Neighborhood attention over a grid is a banded pattern in every axis. Flattened in the usual
row-major order, the keys of a query tile are scattered over many rows, so almost every
``block_q x block_kv`` tile of the attention matrix is partial. GNA's fix is to reorder the tokens
so that each tile of the *grid* (``tile_shape`` tokens, e.g. 16x8) is contiguous in the
sequence; with ``block_q = block_kv = prod(tile_shape)`` every attention block is then a pair
of grid tiles, and most visited blocks are full.

Dilation is folded into the same permutation. With dilation ``d`` along an axis, position ``x``
belongs to residue class ``r = x % d`` at position ``c = x // d`` inside it, and neighborhood
attention runs separately inside each class. The permutation therefore splits each axis into
``(r, c)`` first and tiles ``c``, so that a tile never mixes residue classes.

Layout of one axis of length ``L``, dilation ``d``, tile ``T``: each residue class holds at most
``M = ceil(L / d)`` positions, padded to ``G * T`` with ``G = ceil(M / T)``. Position ``x`` maps
to the digits ``(r, g, t)`` with ``c = x // d = g * T + t``. The permuted (flat) index of a
token orders the digits of all axes as ``(r_1..r_n, g_1..g_n, t_1..t_n)``, row-major, so that
the token index is ``(residue class, tile, offset in tile)`` from the most to the least
significant. Positions ``x >= L`` (``c >= L_r``, the length of class ``r``) are padding.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from attn_jax import masks as masks_lib
from attn_jax.neighborhood import windows


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


@dataclasses.dataclass(frozen=True)
class TileLayout:
  """Geometry of the tiled token order for one grid.

  Attributes:
    spatial_shape: the grid ``(L_1, ..., L_n)``, n in 1..3.
    dilation: ``(d_1, ..., d_n)``.
    tile_shape: ``(T_1, ..., T_n)`` tokens per tile along each axis (inside a residue class).
  """

  spatial_shape: tuple[int, ...]
  dilation: tuple[int, ...]
  tile_shape: tuple[int, ...]

  @property
  def ndim(self) -> int:
    return len(self.spatial_shape)

  @property
  def residue_len(self) -> tuple[int, ...]:
    """``M_a = ceil(L_a / d_a)``: the longest residue class of each axis."""
    return tuple(_cdiv(n, d) for n, d in zip(self.spatial_shape, self.dilation))

  @property
  def grid(self) -> tuple[int, ...]:
    """``G_a``: tiles per residue class along each axis."""
    return tuple(_cdiv(m, t) for m, t in zip(self.residue_len, self.tile_shape))

  @property
  def tile_size(self) -> int:
    """Tokens per tile, ``prod(tile_shape)``: the block size that aligns blocks with tiles."""
    return math.prod(self.tile_shape)

  @property
  def num_tokens(self) -> int:
    """Length of the permuted sequence, padding included."""
    return math.prod(d * g * t for d, g, t in zip(self.dilation, self.grid, self.tile_shape))

  @property
  def radices(self) -> tuple[int, ...]:
    """Digit sizes of the permuted index, most significant first: ``(d.., G.., T..)``."""
    return self.dilation + self.grid + self.tile_shape

  @functools.cached_property
  def place_values(self) -> tuple[int, ...]:
    """Weight of each digit of :attr:`radices` in the flat index."""
    values = []
    acc = 1
    for radix in reversed(self.radices):
      values.append(acc)
      acc *= radix
    return tuple(reversed(values))

  def axis_coords(self, idx, xp):
    """Per-axis ``(r_a, c_a)`` of permuted indices ``idx``: integer arithmetic only.

    Indices past :attr:`num_tokens` (additional keys) give meaningless but in-range digits;
    callers override them. Axes without dilation return ``r_a = None``.
    """
    n = self.ndim
    # Digits of size 1 are always 0; skipping them keeps the in-kernel predicate short.
    digits = [masks_lib.rem_nonneg(masks_lib.div_nonneg(idx, p, xp), radix, xp) if radix > 1 else 0
              for p, radix in zip(self.place_values, self.radices)]
    out = []
    for a in range(n):
      r = digits[a] if self.dilation[a] > 1 else None
      g, t = digits[n + a], digits[2 * n + a]
      c = t if self.grid[a] == 1 else g * self.tile_shape[a] + t
      out.append((r, c))
    return out

  def axis_hulls(self, lo, hi):
    """Per-axis bounding boxes of the tokens with permuted index in ``[lo, hi]`` (host NumPy).

    Returns one ``(r_lo, r_hi, c_lo, c_hi)`` per axis. Row-major ranges are not boxes; the hull
    is exact for whole tiles (and for whole residue classes) and a sound superset otherwise: once
    a more significant digit varies inside the range, every less significant digit may take all
    its values.
    """
    lo = np.asarray(lo, np.int64)
    hi = np.asarray(hi, np.int64)
    same = np.ones(np.broadcast_shapes(lo.shape, hi.shape), bool)
    digit_lo, digit_hi = [], []
    for p, radix in zip(self.place_values, self.radices):
      a, b = (lo // p) % radix, (hi // p) % radix
      digit_lo.append(np.where(same, a, 0))
      digit_hi.append(np.where(same, b, radix - 1))
      same = same & (a == b)
    n = self.ndim
    hulls = []
    for a in range(n):
      t = self.tile_shape[a]
      c_lo = digit_lo[n + a] * t + digit_lo[2 * n + a]
      c_hi = digit_hi[n + a] * t + digit_hi[2 * n + a]
      hulls.append((digit_lo[a], digit_hi[a], c_lo, c_hi))
    return hulls

  def range_is_box(self, lo, hi):
    """Whether the tokens with permuted index in ``[lo, hi]`` are exactly their hull (host NumPy).

    True for whole tiles and for runs of whole tiles that do not wrap around a row of the tile
    grid; :meth:`axis_hulls` is then exact.
    """
    lo = np.asarray(lo, np.int64)
    hi = np.asarray(hi, np.int64)
    volume = np.ones(np.broadcast_shapes(lo.shape, hi.shape), np.int64)
    for r_lo, r_hi, c_lo, c_hi in self.axis_hulls(lo, hi):
      volume = volume * (r_hi - r_lo + 1) * (c_hi - c_lo + 1)
    return volume == hi - lo + 1

  def permute(self, x, xp=jnp):
    """``[B, *spatial, H, D] -> [B, num_tokens, H, D]`` in tiled order, zero padded."""
    n = self.ndim
    b = x.shape[0]
    rest = x.shape[1 + n:]
    widths = [(0, 0)]
    split = [b]
    for length, d, g, t in zip(self.spatial_shape, self.dilation, self.grid, self.tile_shape):
      widths.append((0, d * g * t - length))
      # Position x = c * d + r = (g * T + t) * d + r: row-major digits (g, t, r).
      split += [g, t, d]
    widths += [(0, 0)] * len(rest)
    x = xp.pad(x, widths).reshape(tuple(split) + rest)
    g_axes = [1 + 3 * a for a in range(n)]
    t_axes = [2 + 3 * a for a in range(n)]
    r_axes = [3 + 3 * a for a in range(n)]
    tail = list(range(1 + 3 * n, x.ndim))
    x = x.transpose([0] + r_axes + g_axes + t_axes + tail)
    return x.reshape((b, self.num_tokens) + rest)

  def unpermute(self, y):
    """Inverse of :meth:`permute`: ``[B, num_tokens, ...] -> [B, *spatial, ...]``."""
    n = self.ndim
    b = y.shape[0]
    rest = y.shape[2:]
    y = y.reshape((b,) + self.dilation + self.grid + self.tile_shape + rest)
    order = [0]
    for a in range(n):
      # Back to per-axis digits (g, t, r) from the permuted (r.., g.., t..).
      order += [1 + n + a, 1 + 2 * n + a, 1 + a]
    y = y.transpose(order + list(range(1 + 3 * n, y.ndim)))
    padded = tuple(d * g * t for d, g, t in zip(self.dilation, self.grid, self.tile_shape))
    y = y.reshape((b,) + padded + rest)
    return y[(slice(None),) + tuple(slice(0, length) for length in self.spatial_shape)]

  def permutation(self) -> np.ndarray:
    """For tests and plots: ``perm[x_flat]`` = permuted index of row-major grid position x."""
    grid = np.arange(math.prod(self.spatial_shape)).reshape((1,) + self.spatial_shape + (1,))
    # Mark padding with -1 so that the inverse mapping can be read off the permuted sequence.
    permuted = self.permute(grid + 1, np)[0, :, 0] - 1
    perm = np.empty(math.prod(self.spatial_shape), np.int64)
    valid = permuted >= 0
    perm[permuted[valid]] = np.nonzero(valid)[0]
    return perm


def _divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


def _axis_candidates(m: int, kernel: int, stride: int, target: int) -> list[int]:
  if stride == kernel:
    # Blocked axis: a tile that divides the window group lies inside one group, so every block
    # is full or empty (exactly block-sparse) when the groups are aligned with the axis.
    return [t for t in _divisors(kernel) if t <= m]
  cands = {t for t in _divisors(m) if t <= target}
  cands |= {1 << e for e in range(target.bit_length()) if (1 << e) <= min(m, target)}
  return sorted(cands)


def axis_tile_counts(length: int, dilation: int, kernel: int, stride: int, causal: bool,
                     tile: int) -> tuple[int, int]:
  """Exact ``(visited, full)`` (query tile, key tile) pairs along one axis.

  Because the N-D mask is the product of the per-axis masks and tiles are boxes, an N-D block
  is visited (full) iff it is visited (full) along every axis, and the N-D counts of the
  BlockMask with ``block = prod(tile_shape)`` are the products of these per-axis counts.
  """
  visited = full = 0
  m = _cdiv(length, dilation)
  g = _cdiv(m, tile)
  for r in range(dilation):
    axis_len = windows.residue_length(length, dilation, r)
    first = np.arange(g) * tile
    last = first + tile - 1
    start_a, end_a = windows.axis_window(first, axis_len, kernel, stride, causal, np)
    start_b, end_b = windows.axis_window(last, axis_len, kernel, stride, causal, np)
    # The queries of a tile see the contiguous key range [start(first), end(last)], and all of
    # them see [start(last), end(first)] (see windows.py); end never passes the last real key.
    lo = np.maximum(start_a, 0)
    visited += int((end_b // tile - lo // tile + 1).sum())
    full += int(np.maximum(0, (end_a + 1) // tile - (-(-np.maximum(start_b, 0) // tile))).sum())
  return visited, full


# A partial block costs the predicate's evaluation on top of a full block's work.
_PARTIAL_COST = 0.5
# How much more estimated work a tile of exactly `target` tokens may cost and still be preferred.
_EXACT_SLACK = 1.25


@functools.lru_cache(maxsize=256)
def choose_tile_shape(spatial_shape: tuple[int, ...], kernel_size: tuple[int, ...],
                      stride: tuple[int, ...], dilation: tuple[int, ...],
                      is_causal: tuple[bool, ...], target: int = 128,
                      volume_ok=None) -> tuple[int, ...]:
  """Heuristic tile shape (tokens per axis) for the tiled token order.

  Minimises the attention work predicted exactly from the per-axis block counts: each visited
  block costs ``max(V, target)^2`` with ``V = prod(tile)`` (tiles below ``target`` tokens, 128
  being the TPU lane width and a good GPU block, cost a kernel step about as much as a
  ``target`` one), and partial blocks cost ``1 + 0.5`` times a full one. Padding of the axes to
  whole tiles counts as work. Candidate tiles per axis are powers of two and divisors of the
  axis (per residue class) up to ``target``. Blocked axes (stride == kernel_size) only take
  tile sizes that divide the kernel size, so that aligned blocked configurations are exactly
  block-sparse (no partial blocks). A tile of exactly ``target`` tokens is preferred unless it
  costs over 25% more than the best tile (kernels want block sizes that are multiples of 128).
  ``volume_ok(tokens)``, if given, restricts the tile volumes to those a kernel accepts as its
  block size (powers of two on GPU, multiples of 128 on TPU); when no candidate satisfies it, the
  unrestricted best is returned and the kernel runs with its own block sizes.
  """
  n = len(spatial_shape)
  per_axis = []
  for a in range(n):
    m = _cdiv(spatial_shape[a], dilation[a])
    options = []
    for t in _axis_candidates(m, kernel_size[a], stride[a], target):
      visited, full = axis_tile_counts(spatial_shape[a], dilation[a], kernel_size[a], stride[a],
                                       is_causal[a], t)
      options.append((t, visited, full))
    per_axis.append(options)

  def cost_key(combo):
    volume = math.prod(t for t, _, _ in combo)
    visited = math.prod(v for _, v, _ in combo)
    full = math.prod(f for _, _, f in combo)
    cost = (visited + _PARTIAL_COST * (visited - full)) * max(volume, target) ** 2
    # Ties go to the larger tile, then to the more balanced one.
    return cost, -volume, max(t for t, _, _ in combo)

  combos = [c for c in _product(per_axis) if math.prod(t for t, _, _ in c) <= target]
  if volume_ok is not None:
    allowed = [c for c in combos if volume_ok(math.prod(t for t, _, _ in c))]
    combos = allowed or combos
  best = min(combos, key=cost_key)
  # Kernels want blocks of exactly `target` tokens (a multiple of the TPU lane width): take the
  # best such tile unless it costs much more (padding, a blocked axis that admits none).
  exact = [c for c in combos if math.prod(t for t, _, _ in c) == target]
  if exact:
    best_exact = min(exact, key=cost_key)
    if cost_key(best_exact)[0] <= _EXACT_SLACK * cost_key(best)[0]:
      best = best_exact
  return tuple(t for t, _, _ in best)


def _product(options):
  if not options:
    yield ()
    return
  for head in options[0]:
    for tail in _product(options[1:]):
      yield (head,) + tail
