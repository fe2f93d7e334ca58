"""Attention masks as predicates of ``(q_idx, kv_idx[, head])``.

A mask says which keys each query may attend to. It is a small immutable, hashable object, so
that ``jax.jit`` caches on it and the :mod:`attn_jax.block_mask` compiler can memoise the block
structure it derives from it. Masks combine with ``&`` (both), ``|`` (either) and ``~`` (not).

Every mask knows two things:

* ``evaluate(q_idx, kv_idx, head, ctx, xp)``: the exact predicate on integer index arrays that
  broadcast against each other, written with operators only so that the same code runs on
  NumPy arrays (host-side block-mask compilation) and on JAX arrays (inside a traced backend or
  kernel). ``ctx`` carries the query and key lengths, which masks such as ``causal`` need for
  their default alignment.
* ``block_bounds(q_lo, q_hi, k_lo, k_hi, ctx)``: for rectangles of index ranges (inclusive), a
  sound over-approximation ``(may_any, must_all)``: ``may_any`` is False only if no pair in the
  rectangle is visible, ``must_all`` is True only if every pair is. The block-mask compiler uses
  it to classify most blocks without touching their elements, and evaluates ``evaluate`` only
  on the undecided ones. A mask without useful bounds (a user function) is evaluated densely.
* ``in_kernel``: True when ``evaluate`` uses only elementwise integer arithmetic and comparisons
  (no table lookups, no captured arrays), so that a Pallas kernel can evaluate it on a tile from
  iotas. Kernels evaluate such masks in-kernel; for the others (``block_layout``, ``from_fn``
  unless declared) they read precomputed, deduplicated tiles of the partial blocks.

Alignment of causal-type masks: query ``i`` is placed at key position ``i + offset`` with
``offset = kv_len - q_len`` by default (bottom-right alignment, as in FlashAttention and in
KV-cache decoding, where the last query is the newest token). For self-attention the offset is 0.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import numpy as np

__all__ = [
    "Mask",
    "MaskContext",
    "full",
    "causal",
    "sliding_window",
    "sink_tokens",
    "chunked_causal",
    "prefix_lm",
    "block_layout",
    "from_fn",
    "from_array",
]


@dataclasses.dataclass(frozen=True)
class MaskContext:
  """Lengths that a mask is evaluated against (unpadded)."""

  q_len: int
  kv_len: int

  @property
  def default_offset(self) -> int:
    return self.kv_len - self.q_len


def _true_like(q_idx, kv_idx):
  # Broadcasts to the common shape of both index arrays and works for NumPy and JAX alike.
  return (q_idx * 0 + kv_idx * 0) == 0


def div_nonneg(x, d: int, xp):
  """``x // d`` for non-negative integer arrays ``x`` and a positive constant ``d``.

  In JAX this is ``lax.div`` (truncating): ``jnp.floor_divide`` on signed integers adds a sign
  correction whose Mosaic lowering is chip-specific and slower, and masks evaluated in-kernel only
  ever divide non-negative indices. Callers shift possibly negative values first.
  """
  if isinstance(x, (int, np.integer, np.ndarray)):
    return np.floor_divide(x, d)
  from jax import lax  # Deferred: masks.py itself stays importable without initialising jax.
  return lax.div(x, xp.asarray(d, dtype=x.dtype))


def rem_nonneg(x, d: int, xp):
  """``x % d`` for non-negative integer arrays and a positive constant (see :func:`div_nonneg`)."""
  if isinstance(x, (int, np.integer, np.ndarray)):
    return np.remainder(x, d)
  from jax import lax
  return lax.rem(x, xp.asarray(d, dtype=x.dtype))


class Mask:
  """Base class of all masks. Subclasses are frozen dataclasses (hashable)."""

  depends_on_head: bool = False
  in_kernel: bool = True

  def evaluate(self, q_idx, kv_idx, head, ctx: MaskContext, xp) -> Any:
    """Boolean array: may query ``q_idx`` attend to key ``kv_idx`` (for query head ``head``)."""
    raise NotImplementedError

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx: MaskContext):
    """Sound ``(may_any, must_all)`` for the index rectangles ``[q_lo, q_hi] x [k_lo, k_hi]``."""
    shape = np.broadcast_shapes(np.shape(q_lo), np.shape(k_lo))
    return np.ones(shape, bool), np.zeros(shape, bool)

  def block_bounds_exact(self, q_lo, q_hi, k_lo, k_hi, ctx: MaskContext):
    """Where True, ``block_bounds`` is exact on the rectangle: ``may_any & ~must_all`` means
    some but not all pairs are visible, and the BlockMask compiler skips its element-wise check."""
    return False

  def validate(self, ctx: MaskContext) -> None:
    """Raises ValueError if the mask cannot be applied to these lengths."""

  def __and__(self, other: "Mask") -> "Mask":
    _check_mask(other, "right operand of &")
    return And(self, other)

  def __or__(self, other: "Mask") -> "Mask":
    _check_mask(other, "right operand of |")
    return Or(self, other)

  def __invert__(self) -> "Mask":
    return Not(self)

  def materialize(self, q_len: int, kv_len: int, num_heads: int | None = None) -> np.ndarray:
    """Dense boolean mask, ``[q_len, kv_len]`` or ``[num_heads, q_len, kv_len]`` if head-dependent.

    For debugging, plotting and tests: this is O(q_len * kv_len) host memory.
    """
    ctx = MaskContext(q_len, kv_len)
    self.validate(ctx)
    q = np.arange(q_len)[:, None]
    k = np.arange(kv_len)[None, :]
    if self.depends_on_head:
      if num_heads is None:
        raise ValueError(f"num_heads is required to materialise the head-dependent mask {self!r}")
      h = np.arange(num_heads)[:, None, None]
      out = self.evaluate(q[None], k[None], h, ctx, np)
      return np.broadcast_to(np.asarray(out, bool), (num_heads, q_len, kv_len)).copy()
    out = self.evaluate(q, k, None, ctx, np)
    return np.broadcast_to(np.asarray(out, bool), (q_len, kv_len)).copy()


def _check_mask(m, what):
  if not isinstance(m, Mask):
    raise TypeError(f"{what} must be an attn_jax.masks.Mask, got {type(m).__name__}: {m!r}")


def _check_int(value, name, minimum):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return int(value)


def _check_offset(offset):
  if offset is None:
    return None
  if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
    raise ValueError(f"offset must be an int or None, got {offset!r}")
  return int(offset)


@dataclasses.dataclass(frozen=True)
class _Binary(Mask):
  a: Mask
  b: Mask

  @property
  def depends_on_head(self):
    return self.a.depends_on_head or self.b.depends_on_head

  @property
  def in_kernel(self):
    return self.a.in_kernel and self.b.in_kernel

  def validate(self, ctx):
    self.a.validate(ctx)
    self.b.validate(ctx)

  def _both(self, method, *args):
    return getattr(self.a, method)(*args), getattr(self.b, method)(*args)


@dataclasses.dataclass(frozen=True)
class And(_Binary):

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    a, b = self._both("evaluate", q_idx, kv_idx, head, ctx, xp)
    return a & b

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    (any_a, all_a), (any_b, all_b) = self._both("block_bounds", q_lo, q_hi, k_lo, k_hi, ctx)
    return any_a & any_b, all_a & all_b

  def __repr__(self):
    return f"({self.a!r} & {self.b!r})"


@dataclasses.dataclass(frozen=True)
class Or(_Binary):

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    a, b = self._both("evaluate", q_idx, kv_idx, head, ctx, xp)
    return a | b

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    (any_a, all_a), (any_b, all_b) = self._both("block_bounds", q_lo, q_hi, k_lo, k_hi, ctx)
    return any_a | any_b, all_a | all_b

  def __repr__(self):
    return f"({self.a!r} | {self.b!r})"


@dataclasses.dataclass(frozen=True)
class Not(Mask):
  a: Mask

  @property
  def depends_on_head(self):
    return self.a.depends_on_head

  @property
  def in_kernel(self):
    return self.a.in_kernel

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    return ~self.a.evaluate(q_idx, kv_idx, head, ctx, xp)

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    any_a, all_a = self.a.block_bounds(q_lo, q_hi, k_lo, k_hi, ctx)
    return ~all_a, ~any_a

  def validate(self, ctx):
    self.a.validate(ctx)

  def __repr__(self):
    return f"~{self.a!r}"


@dataclasses.dataclass(frozen=True)
class Full(Mask):

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    return _true_like(q_idx, kv_idx)

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    shape = np.broadcast_shapes(np.shape(q_lo), np.shape(k_lo))
    return np.ones(shape, bool), np.ones(shape, bool)

  def __repr__(self):
    return "full()"


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
  offset: int | None = None

  def _offset(self, ctx):
    return ctx.default_offset if self.offset is None else self.offset

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    return kv_idx <= q_idx + self._offset(ctx)

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    o = self._offset(ctx)
    return k_lo <= q_hi + o, k_hi <= q_lo + o

  def __repr__(self):
    return f"causal(offset={self.offset})"


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
  left: int
  right: int = 0
  offset: int | None = None

  def _offset(self, ctx):
    return ctx.default_offset if self.offset is None else self.offset

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    d = q_idx + self._offset(ctx)
    return (kv_idx >= d - self.left) & (kv_idx <= d + self.right)

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    o = self._offset(ctx)
    may = (k_hi >= q_lo + o - self.left) & (k_lo <= q_hi + o + self.right)
    must = (k_lo >= q_hi + o - self.left) & (k_hi <= q_lo + o + self.right)
    return may, must

  def __repr__(self):
    return f"sliding_window(left={self.left}, right={self.right}, offset={self.offset})"


@dataclasses.dataclass(frozen=True)
class SinkTokens(Mask):
  """The first ``n`` keys; with ``causal`` only those at or before the query's position."""

  n: int
  causal: bool = True
  offset: int | None = None

  def _offset(self, ctx):
    return ctx.default_offset if self.offset is None else self.offset

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    visible = (kv_idx < self.n) & _true_like(q_idx, kv_idx)
    if self.causal:
      visible = visible & (kv_idx <= q_idx + self._offset(ctx))
    return visible

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    shape = np.broadcast_shapes(np.shape(q_lo), np.shape(k_lo))
    may, must = k_lo < self.n, k_hi < self.n
    if self.causal:
      o = self._offset(ctx)
      may, must = may & (k_lo <= q_hi + o), must & (k_hi <= q_lo + o)
    return np.broadcast_to(may, shape), np.broadcast_to(must, shape)

  def __repr__(self):
    if not self.causal:
      return f"sink_tokens({self.n}, causal=False)"
    return f"sink_tokens({self.n})" if self.offset is None else f"sink_tokens({self.n}, offset={self.offset})"


@dataclasses.dataclass(frozen=True)
class ChunkedCausal(Mask):
  chunk: int
  offset: int | None = None

  def _offset(self, ctx):
    return ctx.default_offset if self.offset is None else self.offset

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    o, c = self._offset(ctx), self.chunk
    # Shift by a multiple of the chunk so that both dividends are non-negative.
    shift = c * (-(-max(0, -o) // c))
    same_chunk = div_nonneg(q_idx + (o + shift), c, xp) == div_nonneg(kv_idx + shift, c, xp)
    return same_chunk & (kv_idx <= q_idx + o)

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    o, c = self._offset(ctx), self.chunk
    qc_lo, qc_hi = np.floor_divide(q_lo + o, c), np.floor_divide(q_hi + o, c)
    kc_lo, kc_hi = np.floor_divide(k_lo, c), np.floor_divide(k_hi, c)
    may = (np.maximum(qc_lo, kc_lo) <= np.minimum(qc_hi, kc_hi)) & (k_lo <= q_hi + o)
    must = (qc_lo == qc_hi) & (kc_lo == kc_hi) & (qc_lo == kc_lo) & (k_hi <= q_lo + o)
    return may, must

  def __repr__(self):
    return f"chunked_causal({self.chunk}, offset={self.offset})"


@dataclasses.dataclass(frozen=True)
class PrefixLM(Mask):
  prefix_len: int
  offset: int | None = None

  def _parts(self):
    # The prefix is bidirectional: its queries see all of it, later keys of the prefix included.
    return SinkTokens(self.prefix_len, causal=False) | Causal(self.offset)

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    return self._parts().evaluate(q_idx, kv_idx, head, ctx, xp)

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    return self._parts().block_bounds(q_lo, q_hi, k_lo, k_hi, ctx)

  def __repr__(self):
    return f"prefix_lm({self.prefix_len}, offset={self.offset})"


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout(Mask):
  """An explicit boolean pattern over blocks of ``block_q x block_kv`` tokens."""

  layout: np.ndarray
  block_q: int
  block_kv: int

  in_kernel = False

  def __post_init__(self):
    layout = np.asarray(self.layout)
    if layout.ndim != 2:
      raise ValueError(f"layout must be a 2-D boolean array [q_blocks, kv_blocks], got shape {layout.shape}")
    if layout.dtype != bool:
      if not np.isin(layout, (0, 1)).all():
        raise ValueError(f"layout must be boolean (or 0/1), got dtype {layout.dtype} with other values")
      layout = layout.astype(bool)
    layout = layout.copy()
    layout.setflags(write=False)
    object.__setattr__(self, "layout", layout)
    # A 2-D prefix sum of the layout answers "how many visible layout blocks in a rectangle" in
    # O(1), which is what block_bounds needs when the kernel's blocks straddle layout blocks.
    cs = np.zeros((layout.shape[0] + 1, layout.shape[1] + 1), np.int64)
    cs[1:, 1:] = layout.astype(np.int64).cumsum(0).cumsum(1)
    object.__setattr__(self, "_cumsum", cs)

  def __eq__(self, other):
    return (isinstance(other, BlockLayout) and self.block_q == other.block_q
            and self.block_kv == other.block_kv and self.layout.shape == other.layout.shape
            and bool((self.layout == other.layout).all()))

  def __hash__(self):
    return hash((self.block_q, self.block_kv, self.layout.shape, self.layout.tobytes()))

  def validate(self, ctx):
    need = (-(-ctx.q_len // self.block_q), -(-ctx.kv_len // self.block_kv))
    if self.layout.shape[0] < need[0] or self.layout.shape[1] < need[1]:
      raise ValueError(
          f"layout of shape {self.layout.shape} with block_q={self.block_q}, block_kv={self.block_kv} "
          f"does not cover q_len={ctx.q_len}, kv_len={ctx.kv_len}: expected at least {need}")

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    table = self.layout if xp is np else xp.asarray(self.layout)
    return table[q_idx // self.block_q, kv_idx // self.block_kv]

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    r0, r1 = np.floor_divide(q_lo, self.block_q), np.floor_divide(q_hi, self.block_q) + 1
    c0, c1 = np.floor_divide(k_lo, self.block_kv), np.floor_divide(k_hi, self.block_kv) + 1
    r1 = np.minimum(r1, self.layout.shape[0])
    c1 = np.minimum(c1, self.layout.shape[1])
    cs = self._cumsum
    count = cs[r1, c1] - cs[r0, c1] - cs[r1, c0] + cs[r0, c0]
    area = (r1 - r0) * (c1 - c0)
    return count > 0, count == area

  def __repr__(self):
    return f"block_layout(<{self.layout.shape[0]}x{self.layout.shape[1]}>, {self.block_q}, {self.block_kv})"


@dataclasses.dataclass(frozen=True)
class FromFn(Mask):
  fn: Callable[..., Any]
  with_head: bool
  name: str | None = None
  in_kernel: bool = False

  @property
  def depends_on_head(self):
    return self.with_head

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    try:
      out = self.fn(q_idx, kv_idx, head) if self.with_head else self.fn(q_idx, kv_idx)
    except Exception as e:
      if not _is_tracer_error(e):
        raise
      name = self.name or getattr(self.fn, "__name__", "fn")
      raise ValueError(
          f"the from_fn mask function {name!r} failed on JAX arrays ({type(e).__name__}). Backends "
          f"evaluate masks inside jit with traced JAX index arrays, so the function must not index a "
          f"NumPy array or convert its arguments to NumPy or Python values. For a dense boolean mask "
          f"use masks.from_array(mask_array); for a lookup table, capture jnp.asarray(table) and "
          f"use jnp functions or operators.") from e
    return out & _true_like(q_idx, kv_idx)

  def __repr__(self):
    return f"from_fn({self.name or getattr(self.fn, '__name__', 'fn')})"


def _is_tracer_error(e: Exception) -> bool:
  """True for JAX's errors about converting a tracer to a NumPy array or a Python value."""
  import sys
  if "jax" not in sys.modules:  # No tracer can exist before jax is imported.
    return False
  import jax
  return isinstance(e, (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
                        jax.errors.TracerIntegerConversionError))


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayMask(Mask):
  """A dense boolean mask ``[q_len, kv_len]``, or ``[num_heads, q_len, kv_len]`` per query head."""

  array: np.ndarray

  in_kernel = False

  def __post_init__(self):
    array = self.array
    if not isinstance(array, np.ndarray):
      if hasattr(array, "shape") and hasattr(array, "dtype") and _is_tracer_like(array):
        raise ValueError("from_array needs a concrete array (its BlockMask is built on the host); got a "
                         "traced JAX array. Build the mask outside jit, or use segment ids for "
                         "data-dependent document masks.")
      array = np.asarray(array)
    if array.ndim not in (2, 3):
      raise ValueError(f"array must be a boolean [q_len, kv_len] or [num_heads, q_len, kv_len] array, got "
                       f"shape {array.shape}")
    if array.dtype != bool:
      if not np.isin(array, (0, 1)).all():
        raise ValueError(f"array must be boolean (or 0/1), got dtype {array.dtype} with other values")
      array = array.astype(bool)
    if min(array.shape) < 1:
      raise ValueError(f"array must not be empty, got shape {array.shape}")
    if array.ndim == 3 and array.shape[0] == 1:
      array = array[0]
    array = np.array(array, copy=True)
    array.setflags(write=False)
    object.__setattr__(self, "array", array)
    # Jit caches hash their static arguments on every call: hash the bytes once.
    object.__setattr__(self, "_hash", hash((array.shape, array.tobytes())))

  @property
  def depends_on_head(self):
    return self.array.ndim == 3

  @property
  def num_heads(self) -> int | None:
    """Number of query heads of a per-head array, None for a head-independent one."""
    return self.array.shape[0] if self.array.ndim == 3 else None

  def __eq__(self, other):
    if self is other:
      return True
    return (isinstance(other, ArrayMask) and self._hash == other._hash
            and self.array.shape == other.array.shape and bool((self.array == other.array).all()))

  def __hash__(self):
    return self._hash

  def validate(self, ctx):
    if self.array.shape[-2:] != (ctx.q_len, ctx.kv_len):
      raise ValueError(f"from_array mask of shape {self.array.shape} does not match q_len={ctx.q_len}, "
                       f"kv_len={ctx.kv_len}: expected [..., {ctx.q_len}, {ctx.kv_len}]")

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    table = self.array if xp is np else xp.asarray(self.array)
    q_len, kv_len = self.array.shape[-2:]
    # Backends evaluate padded tiles (rows past q_len, columns past kv_len) and discard those
    # positions afterwards; clipping keeps the lookup in range.
    q_idx = xp.minimum(q_idx, q_len - 1)
    kv_idx = xp.minimum(kv_idx, kv_len - 1)
    if self.array.ndim == 2:
      return table[q_idx, kv_idx]
    if head is None:
      raise ValueError(f"the per-head from_array mask of shape {self.array.shape} needs head indices")
    return table[xp.minimum(head, self.array.shape[0] - 1), q_idx, kv_idx]

  def __repr__(self):
    return f"from_array(<{'x'.join(map(str, self.array.shape))}>)"


def _is_tracer_like(x) -> bool:
  import sys
  if "jax" not in sys.modules:
    return False
  import jax
  return isinstance(x, getattr(jax.core, "Tracer", ()))


def submasks(mask: Mask):
  """``mask`` and every mask it is built from (depth first)."""
  yield mask
  if dataclasses.is_dataclass(mask):
    for field in dataclasses.fields(mask):
      value = getattr(mask, field.name)
      if isinstance(value, Mask):
        yield from submasks(value)


def check_heads(mask: Mask, num_heads: int) -> None:
  """ValueError if a per-head :func:`from_array` inside ``mask`` has another number of heads."""
  for sub in submasks(mask):
    if isinstance(sub, ArrayMask) and sub.num_heads not in (None, num_heads):
      raise ValueError(f"from_array mask has {sub.num_heads} heads but the call has {num_heads} query "
                       f"heads: expected an array of shape [{num_heads}, q_len, kv_len] or [q_len, kv_len]")


def full() -> Mask:
  """Every query sees every key (non-causal self or cross attention)."""
  return Full()


def causal(offset: int | None = None) -> Mask:
  """Query ``i`` sees key ``j`` iff ``j <= i + offset``.

  Args:
    offset: diagonal shift. ``None`` (default) means ``kv_len - q_len``: the last query is aligned
      with the last key (bottom-right), which is what KV-cache decoding and causal cross attention
      between a suffix and its full context need. ``offset=0`` gives top-left alignment.
  """
  return Causal(_check_offset(offset))


def sliding_window(left: int, right: int = 0, offset: int | None = None) -> Mask:
  """Query ``i`` sees keys ``j`` with ``i + offset - left <= j <= i + offset + right``.

  ``sliding_window(w - 1)`` is the causal local attention of Mistral / Gemma with window ``w``
  (the current token plus ``w - 1`` before it). ``offset`` aligns as in :func:`causal`.
  """
  return SlidingWindow(_check_int(left, "left", 0), _check_int(right, "right", 0), _check_offset(offset))


def sink_tokens(n: int, *, causal: bool = True, offset: int | None = None) -> Mask:
  """The first ``n`` keys (StreamingLLM's attention sinks), visible to every query that may see them.

  By default the sinks respect causality: query ``i`` sees key ``j`` iff ``j < n`` and
  ``j <= i + offset`` (``offset`` aligned as in :func:`causal`), so that
  ``sliding_window(1023) | sink_tokens(4)`` never shows the first queries a later token.
  ``causal=False`` makes the first ``n`` keys visible to every query (for non-causal masks, e.g.
  a bidirectional window with global tokens).

  Args:
    n: number of sink tokens (``>= 0``).
    causal: keep only sinks at or before the query's position (default True).
    offset: diagonal shift of the causal condition; ``None`` means ``kv_len - q_len``.
  """
  if not isinstance(causal, (bool, np.bool_)):
    raise ValueError(f"causal must be a bool, got {causal!r}")
  if not causal and offset is not None:
    raise ValueError(f"offset applies to causal sink tokens only, got offset={offset!r} with causal=False")
  return SinkTokens(_check_int(n, "n", 0), bool(causal), _check_offset(offset))


def chunked_causal(chunk: int, offset: int | None = None) -> Mask:
  """Causal attention restricted to aligned chunks of ``chunk`` key positions (Llama 4 style).

  Query ``i`` (at key position ``p = i + offset``) sees key ``j`` iff ``j <= p`` and
  ``j // chunk == p // chunk``.
  """
  return ChunkedCausal(_check_int(chunk, "chunk", 1), _check_offset(offset))


def prefix_lm(prefix_len: int, offset: int | None = None) -> Mask:
  """Bidirectional attention inside the first ``prefix_len`` keys, causal after them (T5 / PaLI)."""
  return PrefixLM(_check_int(prefix_len, "prefix_len", 0), _check_offset(offset))


def block_layout(layout, block_q: int, block_kv: int) -> Mask:
  """An explicit block-sparse pattern: ``layout[i // block_q, j // block_kv]``.

  Args:
    layout: boolean array ``[q_blocks, kv_blocks]`` covering at least ``ceil(q_len / block_q)``
      by ``ceil(kv_len / block_kv)`` blocks.
    block_q, block_kv: the layout's block sizes in tokens (independent of any kernel's blocks).
  """
  return BlockLayout(layout, _check_int(block_q, "block_q", 1), _check_int(block_kv, "block_kv", 1))


def from_fn(fn: Callable[..., Any], name: str | None = None, in_kernel: bool = False) -> Mask:
  """A user predicate ``fn(q_idx, kv_idx)`` or ``fn(q_idx, kv_idx, head)``.

  ``fn`` receives broadcastable integer arrays (NumPy on the host, JAX inside backends) and must
  return a boolean array, using operators (``<``, ``==``, ``&``, ``|``, ``%``, ``//``) or
  functions that accept both kinds of arrays. The mask hashes by the identity of ``fn``: build it
  once, not per call, so that block masks and compilations are reused. Such a mask has no
  analytic block bounds, so its block mask is computed by evaluating ``fn`` on every token pair
  on the host (once per shape).

  Args:
    fn: the predicate.
    name: label for ``repr``.
    in_kernel: declare that ``fn`` uses only elementwise integer arithmetic and comparisons on
      its arguments (no table lookups, no captured arrays), so Pallas kernels may evaluate it
      in-kernel on partial tiles instead of reading precomputed tiles.
  """
  if not callable(fn):
    raise ValueError(f"fn must be callable, got {fn!r}")
  try:
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    nargs = len(params)
  except (TypeError, ValueError):
    nargs = 2
  if nargs not in (2, 3):
    raise ValueError(f"fn must take (q_idx, kv_idx) or (q_idx, kv_idx, head), got {nargs} positional parameters")
  return FromFn(fn, with_head=nargs == 3, name=name, in_kernel=bool(in_kernel))


def from_array(array) -> Mask:
  """A dense boolean mask: query ``i`` sees key ``j`` iff ``array[i, j]`` (or ``array[h, i, j]``).

  For patterns that have no formula (a mask loaded from disk, a random sparsity pattern). The
  array must match the call's lengths exactly. Its BlockMask is built from the array by
  reducing each tile with any / all (vectorised, no element-wise Python); the xla backend looks
  the array up on partial tiles and the Pallas kernels read precomputed partial tiles, as for
  :func:`block_layout`. Memory is ``O(q_len * kv_len)`` on the host and, as a constant, in each
  compiled program: for long sequences prefer a predicate (:func:`from_fn`) or a block layout.
  The mask hashes by content (once, at construction), so equal arrays share compilations.

  Args:
    array: boolean (or 0/1) array ``[q_len, kv_len]``, or ``[num_heads, q_len, kv_len]`` with one
      slice per query head (``num_heads`` must equal the call's query heads). NumPy or a concrete
      JAX array; it is copied to the host.

  Example::

    dense = np.tril(np.ones((T, T), bool)) & (np.random.rand(T, T) < 0.5)
    out = attn_jax.attention(q, k, v, mask=masks.from_array(dense))
  """
  return ArrayMask(array)
