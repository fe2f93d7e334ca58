"""``attn_jax.explain``: which backend a call would use, and why.

``explain`` traces the call abstractly (``jax.eval_shape``: nothing is computed or compiled) with
the dispatcher recording what it does: the backends it tries in order, the reason each one that
declines gives, whether the chosen Pallas kernel runs in interpret mode, and the BlockMask (tile
counts) or chunk size it uses.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import numpy as np

from attn_jax import dispatch

__all__ = ["explain", "Explanation"]


def _functions() -> dict[str, Callable[..., Any]]:
  # Imported here: diagnostics is imported by attn_jax/__init__ next to the APIs themselves.
  from attn_jax.linear import api as linear_api
  from attn_jax.neighborhood import api as neighborhood_api
  from attn_jax.softmax import api as softmax_api
  return {
      "softmax": softmax_api.attention,
      "attention": softmax_api.attention,
      "linear": linear_api.linear_attention,
      "linear_attention": linear_api.linear_attention,
      "neighborhood": neighborhood_api.neighborhood_attention,
      "neighborhood_attention": neighborhood_api.neighborhood_attention,
  }


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


@dataclasses.dataclass(frozen=True)
class Explanation:
  """What one call does, as found by :func:`explain`.

  Attributes:
    function: name of the explained function.
    platform: the platform the call would run on (``"cpu"``, ``"gpu"``, ``"tpu"``).
    choices: one :class:`attn_jax.dispatch.Choice` per backend dispatch of the call (one for
      most calls; neighborhood attention dispatches softmax attention once, non-causal linear
      attention with segments twice).
    error: the ``NotImplementedError`` message when no backend serves the call, else None.
  """

  function: str
  platform: str
  choices: tuple[dispatch.Choice, ...]
  error: str | None = None

  @property
  def backends(self) -> tuple[str | None, ...]:
    """The backend that serves each dispatch (None where none does)."""
    return tuple(c.chosen.backend if c.chosen else None for c in self.choices)

  @property
  def interpret(self) -> bool:
    """True if a Pallas kernel of the call runs in interpret mode."""
    return any(c.chosen is not None and c.chosen.notes.get("interpret", False) for c in self.choices)

  def rows(self) -> list[tuple[str, str, str, str, str]]:
    """``(family, backend, outcome, interpret, detail)`` for every backend tried, in order."""
    out = []
    for c in self.choices:
      for a in c.attempts:
        if a.declined is not None:
          out.append((c.family, a.backend, "declined", "", a.declined))
          continue
        interpret = a.notes.get("interpret")
        flag = "-" if interpret is None else ("yes (implicit)" if a.notes.get("interpret_implicit")
                                               else "yes" if interpret else "no")
        out.append((c.family, a.backend, "chosen" if c.requested is None else "requested", flag,
                    _detail(a)))
    return out

  def __str__(self) -> str:
    head = [f"attn_jax.explain: {self.function} on platform {self.platform!r}"]
    for c in self.choices:
      order = ", ".join(dispatch.platform_order(c.family, c.platform)) or "(none)"
      requested = f"implementation={c.requested!r}" if c.requested else f"implementation=None tries: {order}"
      head.append(f"  {c.family}: {requested}")
    table = [("family", "backend", "outcome", "interpret", "detail")] + self.rows()
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines = ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in table]
    lines.insert(1, "  " + "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    tail = [f"  error: {self.error}"] if self.error else []
    return "\n".join(head + lines + tail)


def _detail(attempt: dispatch.Attempt) -> str:
  bm = attempt.notes.get("block_mask")
  if bm is not None:
    tiles = bm.num_tiles
    empty = tiles - bm.num_nonempty
    heads = f" x {bm.num_heads} heads" if bm.num_heads > 1 else ""
    return (f"BlockMask {bm.block_q}x{bm.block_kv} blocks, {bm.num_q_blocks}x{bm.num_kv_blocks} tiles{heads}: "
            f"{bm.num_full} full, {bm.num_partial} partial, {empty} empty (density {bm.density:.3f})")
  tbm = attempt.notes.get("traced_block_mask")
  if tbm is not None:
    return (f"traced BlockMask {tbm.block_q}x{tbm.block_kv} blocks, {tbm.width} key blocks per row, lists per "
            f"(batch {tbm.num_batch}, heads {tbm.num_heads}), over {tbm.mask!r}")
  if "chunk" in attempt.notes:
    return f"chunk {attempt.notes['chunk']}"
  if attempt.backend == "reference":
    return "materialised float32 scores / token-by-token recurrence (the oracle)"
  return ""


def explain(fn, *args, **kwargs) -> Explanation:
  """Which backend a call would use on this platform, why the others declined, and its tiles.

  Nothing is computed: the call is traced with :func:`jax.eval_shape`, so arrays may be given
  as ``jax.ShapeDtypeStruct``. Argument errors (``ValueError``) are raised as the call would
  raise them.

  Args:
    fn: :func:`attn_jax.attention`, :func:`attn_jax.linear_attention` or
      :func:`attn_jax.neighborhood_attention`, or a family name (``"softmax"``, ``"linear"``,
      ``"neighborhood"``).
    *args, **kwargs: the call's arguments, exactly as for ``fn``.

  Returns:
    An :class:`Explanation`; ``print`` it for a table, or read ``.backends``, ``.interpret`` and
    ``.choices``.

  Example::

    print(attn_jax.explain(attn_jax.attention, q, k, v, mask=masks.causal()))
  """
  functions = _functions()
  if isinstance(fn, str):
    if fn not in functions:
      raise ValueError(f"fn must be one of {sorted(functions)} or one of those functions, got {fn!r}")
    fn = functions[fn]
  else:
    fn = inspect.unwrap(fn)  # a functools.wraps wrapper of one of them (a logging shim, say)
  if fn not in functions.values():
    raise ValueError(f"fn must be attn_jax.attention, linear_attention or neighborhood_attention (or a family "
                     f"name), got {fn!r}")
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  where = [i for i, x in enumerate(leaves) if _is_array(x)]

  def call(*arrays):
    filled = list(leaves)
    for i, a in zip(where, arrays):
      filled[i] = a
    call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, filled)
    return fn(*call_args, **call_kwargs)

  structs = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) for i in where]
  error = None
  with dispatch.recording() as records:
    try:
      jax.eval_shape(call, *structs)
    except NotImplementedError as e:
      error = str(e)
  return Explanation(fn.__name__, dispatch.current_platform(), tuple(records), error)
