"""Eager calls of the primitives reuse one compiled computation per static configuration.

An eager (not jitted) call of a backend re-traces its Python and, because its loops
(``lax.map``, ``fori_loop``, ``scan``) and custom VJPs are built from closures created anew on
every call, compiles them again: at 1k tokens that made a repeated eager call ~10x slower than
the same call under ``jax.jit``. The primitives therefore run their array work through
:func:`cached`, a ``jax.jit`` whose static argument is the call's hashable static description
(family, backend, ``Spec`` with its mask, config). The jit's own cache then keys on that
description plus the arrays' shapes, dtypes and shardings, so a repeated eager call with the
same static arguments goes straight to the compiled executable.

Under an outer ``jax.jit`` (or anything else that stages out a jaxpr: ``scan`` bodies,
``checkpoint``) the function is called directly, not through its own jit: a nested jit would be
inlined by XLA, but its boundary still changes XLA's fusion decisions (measured: +7 % temporary
memory for a linear-attention gradient), and the outer jit already caches the whole program.
Eager ``grad`` and ``vmap`` do go through the cached jit.

A static description that cannot be hashed (a user object without ``__hash__`` inside a config)
falls back to the uncached call, which computes the same result as before.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Hashable

import jax
import jax.extend.core

# JAX's own "is a jaxpr being staged out" probe (exported by jax.extend.core, named
# unsafe because the trace-state internals behind it change); None if a version lacks it.
_UNDER_JIT = getattr(jax.extend.core, "unsafe_am_i_under_a_jit_DO_NOT_USE", None)

__all__ = ["cached", "disabled", "is_disabled"]

_state = threading.local()


def is_disabled() -> bool:
  """True inside :func:`disabled` (on this thread)."""
  return getattr(_state, "disabled", 0) > 0


@contextlib.contextmanager
def disabled():
  """Runs the wrapped functions uncached (traced Python every call) inside the block.

  :func:`attn_jax.explain` uses it so that the dispatcher's Python runs and reports its choice,
  instead of a cached trace that would skip it.
  """
  _state.disabled = getattr(_state, "disabled", 0) + 1
  try:
    yield
  finally:
    _state.disabled -= 1


def _under_jit(arrays) -> bool:
  """True while a jaxpr is being staged out (inside ``jit``, a ``scan`` body, ...)."""
  if _UNDER_JIT is not None:
    return _UNDER_JIT()
  # Without JAX's probe: a tracer among the arrays (which also catches eager grad and vmap).
  tracer = getattr(jax.core, "Tracer", ())
  return any(isinstance(x, tracer) for x in jax.tree_util.tree_leaves(arrays))


def _hashable(static: Hashable) -> bool:
  try:
    hash(static)
  except TypeError:
    return False
  return True


def cached(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps ``fn(static, *arrays)`` so that calls go through ``jax.jit(fn, static_argnums=0)``.

  ``static`` must be hashable and compare by value (frozen dataclasses, tuples, masks);
  ``arrays`` are arrays, None or pytrees of arrays.
  """
  jitted = jax.jit(fn, static_argnums=0)

  @functools.wraps(fn)
  def call(static, *arrays):
    if is_disabled() or _under_jit(arrays) or not _hashable(static):
      return fn(static, *arrays)
    return jitted(static, *arrays)

  call.jitted = jitted
  return call
