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

import copy
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
    "per_head",
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
  """All-True array of the two index arrays' broadcast shape, for NumPy and JAX alike.

  A constant rather than arithmetic on the indices: inside a kernel it costs nothing, where
  ``q * 0 + kv * 0 == 0`` costs two vector operations per element of the tile.
  """
  shape = np.broadcast_shapes(np.shape(q_idx), np.shape(kv_idx))
  for x in (q_idx, kv_idx):
    namespace = getattr(x, "__array_namespace__", None)
    if namespace is not None and not isinstance(x, np.ndarray):
      return namespace().ones(shape, dtype=bool)
  return np.ones(shape, bool)


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

  @property
  def num_heads(self) -> int | None:
    """The number of query heads this mask is written for (``per_head`` masks), else None."""
    return None

  def for_head(self, head: int) -> "Mask | None":
    """This mask seen by query head ``head`` alone, as a head-independent mask, or None when it
    cannot be written so (a head-dependent user function).

    The BlockMask compiler builds the block structure of a head-dependent mask from the analytic
    bounds of these per-head masks instead of evaluating every token pair of every head.
    """
    return None if self.depends_on_head else self

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

  @property
  def num_heads(self):
    a, b = self.a.num_heads, self.b.num_heads
    if a is not None and b is not None and a != b:
      raise ValueError(f"per-head masks combined with different head counts: {a} in {self.a!r} "
                       f"and {b} in {self.b!r}")
    return a if a is not None else b

  def for_head(self, head):
    a, b = self.a.for_head(head), self.b.for_head(head)
    return None if a is None or b is None else type(self)(a, b)


@dataclasses.dataclass(frozen=True)
class And(_Binary):

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    a, b = self._both("evaluate", q_idx, kv_idx, head, ctx, xp)
    return a & b

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    (any_a, all_a), (any_b, all_b) = self._both("block_bounds", q_lo, q_hi, k_lo, k_hi, ctx)
    return any_a & any_b, all_a & all_b

  def block_bounds_exact(self, q_lo, q_hi, k_lo, k_hi, ctx):
    # An exactly partial operand stays exactly partial when the other one is full.
    (_, all_a), (_, all_b) = self._both("block_bounds", q_lo, q_hi, k_lo, k_hi, ctx)
    ex_a, ex_b = self._both("block_bounds_exact", q_lo, q_hi, k_lo, k_hi, ctx)
    return (all_a & ex_b) | (all_b & ex_a)

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

  def block_bounds_exact(self, q_lo, q_hi, k_lo, k_hi, ctx):
    # An exactly partial operand stays exactly partial when the other one is empty.
    (any_a, _), (any_b, _) = self._both("block_bounds", q_lo, q_hi, k_lo, k_hi, ctx)
    ex_a, ex_b = self._both("block_bounds_exact", q_lo, q_hi, k_lo, k_hi, ctx)
    return (~any_b & ex_a) | (~any_a & ex_b)

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

  @property
  def num_heads(self):
    return self.a.num_heads

  def for_head(self, head):
    a = self.a.for_head(head)
    return None if a is None else Not(a)

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    any_a, all_a = self.a.block_bounds(q_lo, q_hi, k_lo, k_hi, ctx)
    return ~all_a, ~any_a

  def block_bounds_exact(self, q_lo, q_hi, k_lo, k_hi, ctx):
    return self.a.block_bounds_exact(q_lo, q_hi, k_lo, k_hi, ctx)

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

  def block_bounds_exact(self, q_lo, q_hi, k_lo, k_hi, ctx):
    return True

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

  def block_bounds_exact(self, q_lo, q_hi, k_lo, k_hi, ctx):
    # kv - q takes every value of [k_lo - q_hi, k_hi - q_lo] on a rectangle, so the bounds
    # (that interval meets / lies inside the visible one) are exact.
    return True

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

  def block_bounds_exact(self, q_lo, q_hi, k_lo, k_hi, ctx):
    # As for causal: the bounds compare the interval of kv - q with the visible band exactly.
    return True

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

  def block_bounds_exact(self, q_lo, q_hi, k_lo, k_hi, ctx):
    # Every row sees the same keys, so a block straddling key n is exactly partial.
    return True

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


@dataclasses.dataclass(frozen=True)
class PerHead(Mask):
  """One head-independent mask per query head (see :func:`per_head`)."""

  masks: tuple[Mask, ...]

  depends_on_head = True

  @property
  def in_kernel(self):
    return all(m.in_kernel for m in self.masks)

  @property
  def distinct(self) -> tuple[Mask, ...]:
    """The distinct masks, in order of first use."""
    return tuple(dict.fromkeys(self.masks))

  @property
  def head_to_distinct(self) -> tuple[int, ...]:
    index = {m: i for i, m in enumerate(self.distinct)}
    return tuple(index[m] for m in self.masks)

  def validate(self, ctx):
    for m in self.distinct:
      m.validate(ctx)

  @property
  def num_heads(self):
    return len(self.masks)

  def for_head(self, head):
    return self.masks[head]

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    # Sound for every head at once: some head may see a pair, every head must see it.
    may = must = None
    for m in self.distinct:
      a, b = m.block_bounds(q_lo, q_hi, k_lo, k_hi, ctx)
      may = a if may is None else may | a
      must = b if must is None else must & b
    return may, must

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    if head is None:
      raise ValueError(f"the per-head mask {self!r} needs the query head index, got head=None")
    distinct = self.distinct
    if len(distinct) == 1:
      return distinct[0].evaluate(q_idx, kv_idx, None, ctx, xp)
    template = _field_template(distinct)
    if template is not None:
      # The masks differ only in integer fields (e.g. window sizes): evaluate once with each
      # field chosen per head, instead of once per distinct mask.
      values = {path: _per_head_value([vals[d] for d in self.head_to_distinct], head, xp)
                for path, vals in template[1].items()}
      try:
        return _instantiate(template[0], values).evaluate(q_idx, kv_idx, None, ctx, xp)
      except Exception:  # noqa: BLE001  A field used in Python control flow: evaluate each mask.
        pass
    which = _per_head_value(list(self.head_to_distinct), head, xp)
    # Selected as int32: Mosaic (TPU kernels) has no select between boolean vectors.
    out = None
    for d, m in enumerate(distinct):
      value = m.evaluate(q_idx, kv_idx, None, ctx, xp).astype(np.int32)
      if out is not None:
        shape = np.broadcast_shapes(np.shape(which), np.shape(value), np.shape(out))
        # Explicit broadcasts: the Triton lowering does not broadcast a scalar condition.
        value = xp.where(xp.broadcast_to(which == d, shape), xp.broadcast_to(value, shape),
                         xp.broadcast_to(out, shape))
      out = value
    return out != 0

  def __repr__(self):
    return f"per_head([{', '.join(repr(m) for m in self.masks)}])"


def _per_head_value(values, head, xp):
  """``values[head]`` for an index array, or a select chain for a scalar head inside a kernel
  (Pallas kernels cannot index a captured constant array)."""
  if xp is np or np.ndim(head) > 0:
    return xp.asarray(np.asarray(values, np.int32))[head]
  # Arithmetic rather than selects: the Triton lowering rejects a select between scalars.
  out = values[0]
  for h in range(1, len(values)):
    if values[h] != values[0]:
      out = out + (head == h).astype(np.int32) * (values[h] - values[0])
  return out


def _field_template(ms):
  """``(template, {path: [value per mask]})`` when the masks are one structure that differs only
  in integer fields, else None. ``path`` is a tuple of field names from the root."""
  first = ms[0]
  if any(type(m) is not type(first) for m in ms) or not dataclasses.is_dataclass(first):
    return None
  varying = {}
  for f in dataclasses.fields(first):
    vals = [getattr(m, f.name) for m in ms]
    if all(isinstance(v, Mask) for v in vals):
      sub = _field_template(vals)
      if sub is None:
        return None
      varying.update({(f.name,) + p: v for p, v in sub[1].items()})
    elif all(v == vals[0] for v in vals) if not isinstance(vals[0], np.ndarray) else False:
      continue
    elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
      varying[(f.name,)] = [int(v) for v in vals]
    else:
      return None
  return first, varying


def _instantiate(template, values):
  """A copy of ``template`` with the fields at the given paths replaced (no validation, so that
  traced scalars can stand in for ints)."""
  out = copy.copy(template)
  children = {}
  for path, value in values.items():
    if len(path) == 1:
      object.__setattr__(out, path[0], value)
    else:
      children.setdefault(path[0], {})[path[1:]] = value
  for name, sub in children.items():
    object.__setattr__(out, name, _instantiate(getattr(template, name), sub))
  return out
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


def per_head(masks) -> Mask:
  """One mask per query head: head ``h`` uses ``masks[h]``.

  Each mask keeps its analytic block bounds, so the BlockMask is built per distinct mask (once
  per distinct mask, whatever the number of heads using it) without evaluating token pairs. Under
  ``shard_map`` over heads each shard uses its own heads' masks.

  Args:
    masks: a sequence of head-independent masks whose length is the number of query heads of the
      calls that use it (checked when the BlockMask is built).
  """
  try:
    masks = tuple(masks)
  except TypeError:
    raise ValueError(f"masks must be a sequence of attn_jax masks, got {masks!r}") from None
  if not masks:
    raise ValueError("masks must hold one mask per query head, got an empty sequence")
  for h, m in enumerate(masks):
    _check_mask(m, f"masks[{h}]")
    if m.depends_on_head:
      raise ValueError(f"masks[{h}] must be head-independent (it is the mask of one head), got {m!r}")
  tables = [(h, getattr(m, "layout", None)) for h, m in enumerate(masks) if isinstance(m, BlockLayout)]
  for h, layout in tables[1:]:
    if layout.shape != tables[0][1].shape:
      raise ValueError(f"masks mixes shapes: masks[{tables[0][0]}] is a block layout of shape "
                       f"{tables[0][1].shape}, masks[{h}] one of shape {layout.shape}")
  return PerHead(masks)


def check_num_heads(mask: Mask, num_heads: int) -> None:
  """ValueError unless a per-head mask has exactly one mask per query head."""
  n = mask.num_heads
  if n is not None and n != num_heads:
    raise ValueError(f"the per-head mask has {n} masks but the call has {num_heads} query heads; "
                     f"expected one mask per query head")
# Masks for multimodal and position studies: modality-mutual, concentric causal,
# Video-CCAM, PINE and lookahead masks, with the position-id functions that some of them pair with.
# All positions below are absolute key positions: query ``i`` sits at ``p = i + offset`` as for
# ``causal`` (``offset = kv_len - q_len`` by default, 0 for self attention).

__all__ += ["modality_mutual", "concentric_causal", "concentric_position_ids", "video_ccam", "pine",
            "pine_position_ids", "lookahead"]


def _resolve_offset(offset, ctx):
  return ctx.default_offset if offset is None else offset


class _RangeTable:
  """Range minimum and maximum of a fixed 1-D integer array in O(1) per query (sparse table).

  Block bounds of masks built from per-position tables (ring indices, per-query lookaheads) need
  ``min/max(values[lo..hi])`` for arrays of intervals; a sparse table answers them vectorised.
  """

  def __init__(self, values):
    values = np.asarray(values, np.int64)
    n = len(values)
    self.n = n
    lows, highs = [values], [values]
    width = 1
    while 2 * width <= n:
      lo, hi = lows[-1], highs[-1]
      lows.append(np.minimum(lo[:-width], lo[width:]))
      highs.append(np.maximum(hi[:-width], hi[width:]))
      width *= 2
    # Pad every level to length n so that the levels stack into one [levels, n] table.
    pad = lambda a: np.concatenate([a, np.zeros(n - len(a), np.int64)])  # noqa: E731
    self._min = np.stack([pad(a) for a in lows])
    self._max = np.stack([pad(a) for a in highs])

  def _query(self, table, op, lo, hi):
    lo = np.clip(np.asarray(lo, np.int64), 0, self.n - 1)
    hi = np.clip(np.asarray(hi, np.int64), 0, self.n - 1)
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    level = np.floor(np.log2(hi - lo + 1)).astype(np.int64)
    return op(table[level, lo], table[level, hi - (1 << level) + 1])

  def min(self, lo, hi):
    return self._query(self._min, np.minimum, lo, hi)

  def max(self, lo, hi):
    return self._query(self._max, np.maximum, lo, hi)


def _check_span_tuple(value, name, width):
  try:
    spans = tuple(tuple(int(x) for x in span) for span in value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a sequence of {width}-tuples of ints, got {value!r}") from None
  if any(len(s) != width for s in spans) or any(
      isinstance(x, bool) or not isinstance(x, (int, np.integer)) for span in value for x in span):
    raise ValueError(f"{name} must be a sequence of {width}-tuples of ints, got {value!r}")
  return spans


def _check_sorted_spans(spans, name):
  prev_end = 0
  for span in spans:
    start, end = span[0], span[1]
    if not 0 <= start < end:
      raise ValueError(f"{name} must contain half-open ranges 0 <= start < end, got {span}")
    if start < prev_end:
      raise ValueError(f"{name} must be sorted and non-overlapping, got {spans}")
    prev_end = span[-1]


@dataclasses.dataclass(frozen=True)
class _QueryRange(Mask):
  """Queries at absolute positions ``lo <= i + offset < hi`` see every key (a building block)."""

  lo: int
  hi: int
  offset: int | None = None

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    p = q_idx + _resolve_offset(self.offset, ctx)
    return (p >= self.lo) & (p < self.hi) & _true_like(q_idx, kv_idx)

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    o = _resolve_offset(self.offset, ctx)
    shape = np.broadcast_shapes(np.shape(q_lo), np.shape(k_lo))
    may = (q_hi + o >= self.lo) & (q_lo + o < self.hi)
    must = (q_lo + o >= self.lo) & (q_hi + o < self.hi)
    return np.broadcast_to(may, shape), np.broadcast_to(must, shape)


@dataclasses.dataclass(frozen=True)
class _KeyRange(Mask):
  """Every query sees the keys ``lo <= j < hi`` (a building block)."""

  lo: int
  hi: int

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    return (kv_idx >= self.lo) & (kv_idx < self.hi) & _true_like(q_idx, kv_idx)

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    shape = np.broadcast_shapes(np.shape(q_lo), np.shape(k_lo))
    may = (k_hi >= self.lo) & (k_lo < self.hi)
    must = (k_lo >= self.lo) & (k_hi < self.hi)
    return np.broadcast_to(may, shape), np.broadcast_to(must, shape)


def _any(parts):
  out = parts[0]
  for p in parts[1:]:
    out = Or(out, p)
  return out


@dataclasses.dataclass(frozen=True)
class _Composite(Mask):
  """A named mask defined by a composition of simpler masks (``_parts``)."""

  def _parts(self) -> Mask:
    raise NotImplementedError

  @property
  def in_kernel(self):
    return self._parts().in_kernel

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    return self._parts().evaluate(q_idx, kv_idx, head, ctx, xp)

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    return self._parts().block_bounds(q_lo, q_hi, k_lo, k_hi, ctx)


@dataclasses.dataclass(frozen=True)
class ModalityMutual(_Composite):
  spans: tuple
  offset: int | None = None

  def _parts(self):
    extra = [_QueryRange(s, e, self.offset) & _KeyRange(e, t) for s, e, t in self.spans if t > e]
    return _any([Causal(self.offset)] + extra)

  def __repr__(self):
    return f"modality_mutual({self.spans}, offset={self.offset})"


def modality_mutual(image_spans, offset: int | None = None) -> Mask:
  """Causal attention in which image tokens also see the text that follows their image.

  Modality-mutual attention (MMA, "Seeing is understanding: unlocking causal attention into
  modality-mutual attention for multimodal LLMs"): under a plain causal mask the image tokens of
  a multimodal LLM never see the instruction that comes after the image. MMA lets every image
  token attend to the text tokens after its image as well. Only the instruction may be opened
  this way (a later answer would leak into the image tokens the answer is predicted from), so
  each image names the end of the text it may read.

  Query ``i`` (absolute position ``p = i + offset``) sees key ``j`` iff ``j <= p``, or ``p`` lies
  in an image ``[img_start, img_end)`` and ``img_end <= j < text_end``.

  Args:
    image_spans: sorted, non-overlapping triples ``(img_start, img_end, text_end)`` of absolute
      positions, ``img_start < img_end <= text_end``; ``[img_end, text_end)`` is the text the
      image tokens may read (the instruction; not the answer).
    offset: query alignment as in :func:`causal`.

  The pattern is a union of rectangles with the causal triangle, so its block bounds are
  analytic and Pallas kernels evaluate it in-kernel. A per-sample layout (different image
  positions per batch row) is not a static mask: use segment ids or separate calls per layout.
  """
  spans = _check_span_tuple(image_spans, "image_spans", 3)
  for s, e, t in spans:
    if not (0 <= s < e <= t):
      raise ValueError(f"image_spans entries must satisfy 0 <= img_start < img_end <= text_end, got {(s, e, t)}")
  _check_sorted_spans(spans, "image_spans")
  return ModalityMutual(spans, _check_offset(offset))


def _ring_of(idx, height, width, xp):
  """Ring index (0 on the border, growing inward) of raster indices ``idx`` in ``[0, H*W)``."""
  r = div_nonneg(idx, width, xp)
  c = rem_nonneg(idx, width, xp)
  return xp.minimum(xp.minimum(r, c), xp.minimum(height - 1 - r, width - 1 - c))


@dataclasses.dataclass(frozen=True)
class ConcentricCausal(Mask):
  image_start: int
  height: int
  width: int
  offset: int | None = None

  def __post_init__(self):
    rings = _ring_of(np.arange(self.height * self.width), self.height, self.width, np)
    object.__setattr__(self, "_rings", _RangeTable(rings))

  @property
  def image_end(self):
    return self.image_start + self.height * self.width

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    p = q_idx + _resolve_offset(self.offset, ctx)
    s, e, n = self.image_start, self.image_end, self.height * self.width
    both = (p >= s) & (p < e) & (kv_idx >= s) & (kv_idx < e)
    # Clamp into the image before dividing: the ring formula needs non-negative raster indices,
    # and outside the image its value is unused.
    rq = _ring_of(xp.minimum(xp.maximum(p - s, 0), n - 1), self.height, self.width, xp)
    rk = _ring_of(xp.minimum(xp.maximum(kv_idx - s, 0), n - 1), self.height, self.width, xp)
    return (both & (rk <= rq)) | (~both & (kv_idx <= p))

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    o = _resolve_offset(self.offset, ctx)
    s, e = self.image_start, self.image_end
    p_lo, p_hi = q_lo + o, q_hi + o
    q_any, q_all = (p_hi >= s) & (p_lo < e), (p_lo >= s) & (p_hi < e)
    k_any, k_all = (k_hi >= s) & (k_lo < e), (k_lo >= s) & (k_hi < e)
    both_any, both_all = q_any & k_any, q_all & k_all
    # Ring ranges over the parts of the rectangle that lie inside the image.
    rq_min = self._rings.min(np.maximum(p_lo, s) - s, np.minimum(p_hi, e - 1) - s)
    rq_max = self._rings.max(np.maximum(p_lo, s) - s, np.minimum(p_hi, e - 1) - s)
    rk_min = self._rings.min(np.maximum(k_lo, s) - s, np.minimum(k_hi, e - 1) - s)
    rk_max = self._rings.max(np.maximum(k_lo, s) - s, np.minimum(k_hi, e - 1) - s)
    may_ring, must_ring = rk_min <= rq_max, rk_max <= rq_min
    may_causal, must_causal = k_lo <= p_hi, k_hi <= p_lo
    may = (both_any & may_ring) | (~both_all & may_causal)
    must = (both_all & must_ring) | (~both_any & must_causal) | (must_ring & must_causal)
    return may, must

  def __repr__(self):
    return (f"concentric_causal(image_start={self.image_start}, height={self.height}, "
            f"width={self.width}, offset={self.offset})")


def concentric_causal(image_start: int, height: int, width: int, offset: int | None = None) -> Mask:
  """Concentric causal attention (CCA, "Mitigating object hallucination via concentric causal
  attention", Sec. 3): the image's tokens are ordered in rings from the border to the centre.

  The ``height x width`` image occupies absolute positions ``[image_start, image_start + H*W)`` in
  raster order. Its token ``(r, c)`` lies on ring ``min(r, c, H-1-r, W-1-c)`` (0 on the border).
  An image token sees the image tokens of its own and every outer ring (the 2-D causal order of
  CCA: peripheral tokens first, central tokens last, so that the centre is nearest to the
  instruction); every other pair is plain causal. Pair it with :func:`concentric_position_ids`,
  which gives all tokens of a ring one position.

  The ring index is integer arithmetic on the index (division and remainder by ``W``, minima), so
  kernels evaluate it in-kernel; block bounds use range minima / maxima of the ring index.
  """
  image_start = _check_int(image_start, "image_start", 0)
  height = _check_int(height, "height", 1)
  width = _check_int(width, "width", 1)
  return ConcentricCausal(image_start, height, width, _check_offset(offset))


def concentric_position_ids(length: int, image_start: int, height: int, width: int) -> np.ndarray:
  """Position ids that go with :func:`concentric_causal` (CCA's visual token re-organisation).

  Tokens before the image keep their index; image token ``(r, c)`` gets ``image_start + ring``
  (one position per ring, ``ceil(min(H, W) / 2)`` rings); tokens after the image follow on from
  the innermost ring, so the text after the image is ``num_rings`` positions away from the image
  centre instead of ``H * W``.

  Returns:
    ``[length]`` int32 position ids for RoPE (or any position encoding).
  """
  length = _check_int(length, "length", 1)
  m = concentric_causal(image_start, height, width)
  end = m.image_end
  if end > length:
    raise ValueError(f"the image [{image_start}, {end}) must fit in length={length}")
  num_rings = (min(height, width) + 1) // 2
  idx = np.arange(length)
  rings = _ring_of(np.clip(idx - image_start, 0, height * width - 1), height, width, np)
  pos = np.where(idx < image_start, idx,
                 np.where(idx < end, image_start + rings, image_start + num_rings + (idx - end)))
  return pos.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class VideoCCAM(Mask):
  num_frames: int
  tokens_per_frame: int
  num_queries: int | None = None

  def _queries(self, ctx):
    return ctx.q_len if self.num_queries is None else self.num_queries

  def validate(self, ctx):
    if ctx.kv_len != self.num_frames * self.tokens_per_frame:
      raise ValueError(f"video_ccam expects kv_len = num_frames * tokens_per_frame = "
                       f"{self.num_frames * self.tokens_per_frame}, got kv_len={ctx.kv_len}")
    if self.num_queries is not None and ctx.q_len != self.num_queries:
      raise ValueError(f"video_ccam was built for num_queries={self.num_queries}, got q_len={ctx.q_len}")

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    nq = self._queries(ctx)
    q_frame = div_nonneg(q_idx * self.num_frames, nq, xp)
    k_frame = div_nonneg(kv_idx, self.tokens_per_frame, xp)
    return k_frame <= q_frame

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    nq = self._queries(ctx)
    # Both frame maps are non-decreasing, so the rectangle's extremes sit at its corners.
    fq_lo, fq_hi = (q_lo * self.num_frames) // nq, (q_hi * self.num_frames) // nq
    fk_lo, fk_hi = k_lo // self.tokens_per_frame, k_hi // self.tokens_per_frame
    return fk_lo <= fq_hi, fk_hi <= fq_lo

  def __repr__(self):
    return (f"video_ccam(num_frames={self.num_frames}, tokens_per_frame={self.tokens_per_frame}, "
            f"num_queries={self.num_queries})")


def video_ccam(num_frames: int, tokens_per_frame: int, num_queries: int | None = None) -> Mask:
  """Video-CCAM's causal cross-attention mask (Fan et al., "Video-CCAM", Sec. 3.2).

  A fixed set of learnable queries cross-attends to the visual tokens of ``num_frames`` frames
  (``kv_len = num_frames * tokens_per_frame``, frame-major). The queries are split evenly into
  one group per frame, query ``i`` belonging to frame ``floor(i * F / Q)``; a query sees the
  visual tokens of its own frame and of all earlier frames. With ``Q`` not a multiple of ``F`` the
  groups differ in size by one (our choice; the paper uses divisible sizes).

  Args:
    num_frames: ``F``.
    tokens_per_frame: visual tokens per frame.
    num_queries: ``Q``; default ``q_len``.
  """
  return VideoCCAM(_check_int(num_frames, "num_frames", 1), _check_int(tokens_per_frame, "tokens_per_frame", 1),
                   None if num_queries is None else _check_int(num_queries, "num_queries", 1))


@dataclasses.dataclass(frozen=True)
class Pine(_Composite):
  doc_spans: tuple
  offset: int | None = None

  def _parts(self):
    in_docs_q = _any([_QueryRange(s, e, self.offset) for s, e in self.doc_spans])
    in_docs_k = _any([_KeyRange(s, e) for s, e in self.doc_spans])
    same_doc = _any([_QueryRange(s, e, self.offset) & _KeyRange(s, e) for s, e in self.doc_spans])
    return Causal(self.offset) | (in_docs_q & in_docs_k & ~same_doc)

  def __repr__(self):
    return f"pine({self.doc_spans}, offset={self.offset})"


def pine(doc_spans, offset: int | None = None) -> Mask:
  """PINE's inter-document bidirectional mask (Wang et al., "Eliminating position bias of
  language models: a mechanistic approach", Sec. 3.2).

  Documents (retrieved passages, options to compare) given as sorted ``[start, end)`` spans of
  absolute positions attend to each other in both directions; inside a document attention stays
  causal, and every token outside the documents (the system prompt before, the question and the
  answer after) is causal. Query ``p`` sees key ``j`` iff ``j <= p``, or ``p`` and ``j`` lie in
  two different documents.

  PINE also re-positions the documents per query document by importance; the mask does not
  depend on that. :func:`pine_position_ids` gives those positions.
  """
  spans = _check_span_tuple(doc_spans, "doc_spans", 2)
  if not spans:
    raise ValueError("doc_spans must name at least one document")
  _check_sorted_spans(spans, "doc_spans")
  return Pine(spans, _check_offset(offset))


def pine_position_ids(length: int, doc_spans, importance) -> np.ndarray:
  """PINE's position re-assignment (Sec. 3.3): key positions as seen from each query group.

  PINE removes position bias between documents by giving each query its own view of where the
  documents are: the documents are laid out one after another from the first document's start,
  least important first and most important last (nearest to the query), and a query inside a
  document sees its own document last of all. Tokens outside the documents keep their index
  (the documents' total length is unchanged). Importance comes from the model's own attention
  (the paper sums position-free attention from the query group to each document); it is an
  input here.

  Args:
    length: sequence length ``T``.
    doc_spans: ``n`` sorted ``[start, end)`` spans, as for :func:`pine`. The documents must be
      contiguous (``end_d == start_{d+1}``): the re-layout permutes them inside that region.
    importance: ``[n + 1, n]`` scores: row ``g < n`` for queries in document ``g``, row ``n``
      for the queries outside the documents; larger is more important. Ties keep input order.

  Returns:
    ``[n + 1, T]`` int32: ``pos[g, j]`` is the position of token ``j`` for queries of group
    ``g`` (a query ``i`` in group ``g`` also uses ``pos[g, i]`` itself). With rotary
    embeddings, rotate the keys once per group and run one attention call per group of query
    rows; this is the price of query-dependent positions.
  """
  length = _check_int(length, "length", 1)
  spans = _check_span_tuple(doc_spans, "doc_spans", 2)
  if not spans:
    raise ValueError("doc_spans must name at least one document")
  _check_sorted_spans(spans, "doc_spans")
  for (_, e), (s, _) in zip(spans[:-1], spans[1:]):
    if e != s:
      raise ValueError(f"doc_spans must be contiguous for re-positioning, got a gap between {e} and {s}")
  if spans[-1][1] > length:
    raise ValueError(f"doc_spans end at {spans[-1][1]}, beyond length={length}")
  n = len(spans)
  importance = np.asarray(importance, np.float64)
  if importance.shape != (n + 1, n):
    raise ValueError(f"importance must have shape [num_docs + 1, num_docs] = {(n + 1, n)}, got {importance.shape}")
  pos = np.tile(np.arange(length, dtype=np.int64), (n + 1, 1))
  for g in range(n + 1):
    # Ascending importance (stable), then the query's own document moved to the end.
    order = [d for d in np.argsort(importance[g], kind="stable") if d != g]
    if g < n:
      order.append(g)
    cursor = spans[0][0]
    for d in order:
      s, e = spans[d]
      pos[g, s:e] = cursor + np.arange(e - s)
      cursor += e - s
  return pos.astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class Lookahead(Mask):
  size: Any
  left: int | None = None
  offset: int | None = None

  def __post_init__(self):
    if isinstance(self.size, np.ndarray):
      table = self.size.astype(np.int64)
      table.setflags(write=False)
      object.__setattr__(self, "size", table)
      object.__setattr__(self, "_table", _RangeTable(table))

  @property
  def in_kernel(self):
    return not isinstance(self.size, np.ndarray)

  def _key(self):
    size = (self.size.shape, self.size.tobytes()) if isinstance(self.size, np.ndarray) else self.size
    return (size, self.left, self.offset)

  def __eq__(self, other):
    return isinstance(other, Lookahead) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def validate(self, ctx):
    if isinstance(self.size, np.ndarray) and len(self.size) != ctx.q_len:
      raise ValueError(f"lookahead sizes have length {len(self.size)}, expected q_len={ctx.q_len}")

  def _sizes(self, q_idx, xp):
    if not isinstance(self.size, np.ndarray):
      return self.size
    table = self.size if xp is np else xp.asarray(self.size, dtype=q_idx.dtype)
    return table[xp.minimum(xp.maximum(q_idx, 0), len(self.size) - 1)]

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    p = q_idx + _resolve_offset(self.offset, ctx)
    visible = kv_idx <= p + self._sizes(q_idx, xp)
    if self.left is not None:
      visible = visible & (kv_idx >= p - self.left)
    return visible & _true_like(q_idx, kv_idx)

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    o = _resolve_offset(self.offset, ctx)
    if isinstance(self.size, np.ndarray):
      big, small = self._table.max(q_lo, q_hi), self._table.min(q_lo, q_hi)
    else:
      big = small = self.size
    may = k_lo <= q_hi + o + big
    must = k_hi <= q_lo + o + small
    if self.left is not None:
      may = may & (k_hi >= q_lo + o - self.left)
      must = must & (k_lo >= q_hi + o - self.left)
    return may, must

  def __repr__(self):
    size = f"<{len(self.size)} sizes>" if isinstance(self.size, np.ndarray) else self.size
    return f"lookahead({size}, left={self.left}, offset={self.offset})"


def lookahead(size, left: int | None = None, offset: int | None = None) -> Mask:
  """Causal attention with a bounded look-ahead, for streaming models (Strimel et al., "Lookahead
  when it matters: adaptive non-causal transformers for streaming neural transducers", ANCAT).

  Query ``i`` (at ``p = i + offset``) sees keys ``j <= p + size`` (``size`` future frames) and, if
  ``left`` is given, only ``j >= p - left``. A streaming model delays each output by its
  look-ahead, so the look-ahead is what it pays in latency.

  Args:
    size: the look-ahead in frames: an int for a fixed per-layer look-ahead, or a 1-D array of
      ``q_len`` non-negative ints, one per query frame, for ANCAT's adaptive look-ahead (the
      policy's per-frame decision times the look-ahead it grants; 0 where it stays causal). The
      array is host data: a decision traced inside ``jit`` cannot make a static mask.
    left: optional bound on the past context.
    offset: query alignment as in :func:`causal`.

  A fixed ``size`` is integer arithmetic (evaluated in-kernel); an array is a per-query table
  whose block bounds use range maxima and minima.
  """
  if isinstance(size, (list, tuple, np.ndarray)):
    arr = np.asarray(size)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer) or (arr < 0).any():
      raise ValueError(f"size must be an int >= 0 or a non-empty 1-D array of ints >= 0, got {size!r}")
    size = arr
  else:
    size = _check_int(size, "size", 0)
  left = None if left is None else _check_int(left, "left", 0)
  return Lookahead(size, left, _check_offset(offset))
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


# PowerAttention: block distances that are powers of two, with a local window and sinks.

__all__ += ["power_attention"]


def _is_pow2(d, xp):
  """``d > 0`` and ``d`` a power of two, for integer arrays (one AND: in-kernel on TPU and GPU)."""
  return (d > 0) & ((d & (d - 1)) == 0)


def _next_pow2_at_least(lo):
  """Smallest power of two ``>= lo`` for arrays ``lo >= 1`` (exact up to 2**62)."""
  lo = np.maximum(np.asarray(lo, np.int64), 1)
  return np.left_shift(np.int64(1), np.ceil(np.log2(lo)).astype(np.int64))


@dataclasses.dataclass(frozen=True)
class PowerAttention(Mask):
  block: int
  window_blocks: int
  sink_blocks: int
  offset: int | None = None

  def _offset(self, ctx):
    return ctx.default_offset if self.offset is None else self.offset

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    o, b = self._offset(ctx), self.block
    shift = b * (-(-max(0, -o) // b))   # keep both dividends non-negative (see div_nonneg)
    d = div_nonneg(q_idx + (o + shift), b, xp) - div_nonneg(kv_idx + shift, b, xp)
    kb = div_nonneg(kv_idx, b, xp)
    allowed = ((d >= 0) & (d < self.window_blocks)) | _is_pow2(d, xp) | (kb < self.sink_blocks)
    return allowed & (kv_idx <= q_idx + o)

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    o, b, w = self._offset(ctx), self.block, self.window_blocks
    qb_lo, qb_hi = np.floor_divide(q_lo + o, b), np.floor_divide(q_hi + o, b)
    kb_lo, kb_hi = np.floor_divide(k_lo, b), np.floor_divide(k_hi, b)
    d_lo, d_hi = qb_lo - kb_hi, qb_hi - kb_lo           # block distances in the rectangle
    lo = np.maximum(d_lo, 0)
    in_window = (lo < w) & (d_hi >= 0)
    lo1 = np.maximum(d_lo, 1)
    has_pow2 = (d_hi >= lo1) & (_next_pow2_at_least(lo1) <= d_hi)
    may = (in_window | has_pow2 | (kb_lo < self.sink_blocks)) & (k_lo <= q_hi + o)
    # Every distance in [d_lo, d_hi] is allowed iff the part beyond the window is all powers of
    # two, which for a range of integers means a single power of two or exactly {1, 2}.
    beyond = np.maximum(d_lo, w)
    single_pow2 = (beyond == d_hi) & (np.bitwise_and(np.maximum(d_hi, 1), np.maximum(d_hi, 1) - 1) == 0) & (d_hi > 0)
    all_allowed = (d_lo >= 0) & ((d_hi < w) | single_pow2 | ((beyond == 1) & (d_hi == 2)))
    must = (all_allowed | (kb_hi < self.sink_blocks)) & (k_hi <= q_lo + o)
    return may, must

  def __repr__(self):
    return (f"power_attention({self.block}, window_blocks={self.window_blocks}, sink_blocks={self.sink_blocks}, "
            f"offset={self.offset})")


def power_attention(block_size: int, window_blocks: int = 1, sink_blocks: int = 1,
                    offset: int | None = None) -> Mask:
  """PowerAttention (Chen et al., "PowerAttention: Exponentially Scaling of Receptive Fields for
  Effective Sparse Attention", 2025), in block form.

  Tokens are grouped into blocks of ``block_size`` positions. A query in block ``I`` (of its
  position ``p = i + offset``) sees the causal keys of block ``J`` iff the block distance
  ``d = I - J`` is below ``window_blocks`` (the local window, own block included), or a power of
  two (1, 2, 4, 8, ...), or ``J < sink_blocks`` (attention sinks). Each layer thus reaches
  ``log2(T / block_size)`` distant blocks, and stacked layers reach every earlier block in
  ``log2`` hops: the receptive field grows exponentially with depth (paper Sec. 3) at
  ``O(T log T)`` cost.

  Our choices where the paper leaves them open (Sec. 3.2, block-wise implementation): distances are
  counted in blocks, not tokens; the window and the sinks are whole blocks. The predicate is
  integer arithmetic and one bitwise AND (in-kernel on TPU and GPU), and its block bounds are
  analytic (exact on block-aligned tiles).

  Args:
    block_size: positions per block (>= 1).
    window_blocks: blocks of local window, the query's own block included (>= 1).
    sink_blocks: leading blocks every query sees (>= 0).
    offset: query alignment as in :func:`causal`.
  """
  return PowerAttention(_check_int(block_size, "block_size", 1), _check_int(window_blocks, "window_blocks", 1),
                        _check_int(sink_blocks, "sink_blocks", 0), _check_offset(offset))
