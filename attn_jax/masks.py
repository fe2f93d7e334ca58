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
  n: int

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    return (kv_idx < self.n) & _true_like(q_idx, kv_idx)

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    shape = np.broadcast_shapes(np.shape(q_lo), np.shape(k_lo))
    return np.broadcast_to(k_lo < self.n, shape), np.broadcast_to(k_hi < self.n, shape)

  def block_bounds_exact(self, q_lo, q_hi, k_lo, k_hi, ctx):
    # Every row sees the same keys, so a block straddling key n is exactly partial.
    return True

  def __repr__(self):
    return f"sink_tokens({self.n})"


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
    return SinkTokens(self.prefix_len) | Causal(self.offset)

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
    out = self.fn(q_idx, kv_idx, head) if self.with_head else self.fn(q_idx, kv_idx)
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


def sink_tokens(n: int) -> Mask:
  """The first ``n`` keys are visible to every query (StreamingLLM's attention sinks).

  Combine with a window: ``sliding_window(1023) | sink_tokens(4)``.
  """
  return SinkTokens(_check_int(n, "n", 0))


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
