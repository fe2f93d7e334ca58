"""Backend registry and ``implementation=`` dispatch shared by every primitive family.

Each family (softmax attention, linear attention, ...) registers named backends. A backend is a
callable that either serves the call or raises ``NotImplementedError`` naming the feature it
lacks, before doing any expensive work. With ``implementation=None`` the dispatcher tries the
platform's ordered list and returns the first backend that serves the call; an explicit name is
called alone and its ``NotImplementedError`` propagates, so a request is never silently served
by another backend.

Calls go through :mod:`attn_jax._jit_cache`: the backend runs inside a ``jax.jit`` keyed on the
family, the requested implementation and the static keyword arguments (``spec``, ``config``), so
an eager call with the same static arguments reuses its compiled computation.

While :func:`recording` is active, every dispatch appends a :class:`Choice` (what was tried,
why each backend declined, what the chosen one noted, e.g. its BlockMask or interpret mode):
:func:`attn_jax.explain` reads these.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from typing import Any, Callable

import jax

from attn_jax import _jit_cache

__all__ = ["register", "backends", "platform_order", "dispatch", "current_platform", "recording",
           "note", "interpret_mode", "pallas_interpret", "Attempt", "Choice"]

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}

# The order in which implementation=None tries backends on each platform. Names not registered
# for a family (a kernel that does not exist yet) are skipped. On GPU, cuDNN comes first: it is
# the fastest kernel for the calls it serves and refuses the others (masks beyond causal bands,
# sinks, soft-cap, segments, float32) before doing any work.
_PLATFORM_ORDER = {
    "tpu": ("pallas_tpu", "xla"),
    "gpu": ("cudnn", "pallas_gpu", "xla"),
    "cpu": ("xla",),
}



def round_up(x: int, m: int) -> int:
  """``x`` rounded up to a multiple of ``m``."""
  return -(-x // m) * m


def next_pow2(x: int) -> int:
  """The smallest power of two ``>= x`` (1 for ``x <= 1``)."""
  return 1 << max(0, (x - 1).bit_length())


def check_config_int(owner: str, name: str, value, rule: str, ok: Callable[[int], bool]) -> None:
  """ValueError naming ``owner.name`` unless ``value`` is None or an int (not bool) with ``ok``."""
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not ok(value)):
    raise ValueError(f"{owner}.{name} must be {rule} or None, got {value!r}")

def register(family: str, name: str, fn: Callable[..., Any]) -> None:
  _REGISTRY.setdefault(family, {})[name] = fn


def backends(family: str) -> tuple[str, ...]:
  """Names of the backends registered for ``family``, ``reference`` included."""
  return tuple(_REGISTRY.get(family, {}))


def current_platform() -> str:
  platform = jax.default_backend()
  # ROCm and CUDA both lower through the GPU path.
  return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def interpret_mode(interpret: bool | None, platform: str) -> bool:
  """Whether a Pallas kernel of ``platform`` ("tpu" / "gpu") runs in interpret mode.

  Every Pallas config has ``interpret: bool | None``: True and False are obeyed anywhere (False
  off the kernel's platform is how the compile check lowers the real kernel on a CPU); None
  means "interpret unless running on the kernel's platform".
  """
  if interpret is None:
    return current_platform() != platform
  return bool(interpret)


def platform_order(family: str, platform: str | None = None) -> tuple[str, ...]:
  platform = platform or current_platform()
  table = _REGISTRY.get(family, {})
  return tuple(n for n in _PLATFORM_ORDER.get(platform, ("xla",)) if n in table)


@dataclasses.dataclass
class Attempt:
  """One backend the dispatcher called: ``declined`` holds its NotImplementedError message."""

  backend: str
  declined: str | None = None
  notes: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Choice:
  """What one dispatch did: the backends tried in order; the last one served unless declined."""

  family: str
  requested: str | None
  platform: str
  attempts: list[Attempt] = dataclasses.field(default_factory=list)

  @property
  def chosen(self) -> Attempt | None:
    last = self.attempts[-1] if self.attempts else None
    return last if last is not None and last.declined is None else None


_local = threading.local()


def _records() -> list | None:
  return getattr(_local, "records", None)


def _attempt_stack() -> list:
  if not hasattr(_local, "attempts"):
    _local.attempts = []
  return _local.attempts


@contextlib.contextmanager
def recording():
  """Collects a :class:`Choice` per dispatch inside the block (tracing only: no warnings).

  Dispatches inside the block run uncached (see :func:`attn_jax._jit_cache.disabled`), so that
  their Python runs and reports even when an identical call was compiled before.
  """
  previous = _records()
  _local.records = []
  try:
    with _jit_cache.disabled():
      yield _local.records
  finally:
    _local.records = previous


def note(key: str, value: Any) -> None:
  """Attaches ``key: value`` to the backend attempt in progress (no-op outside a dispatch)."""
  stack = _attempt_stack()
  if stack:
    stack[-1].notes[key] = value


# Kernels that already warned about running in interpret mode in this process.
_WARNED_INTERPRET: set[tuple[str, str]] = set()


def pallas_interpret(requested: bool | None, platform: str) -> bool:
  """Resolves a Pallas config's ``interpret`` flag and notes it for the attempt in progress.

  ``None`` means "unless running on the kernel's own platform" (``"tpu"`` or ``"gpu"``). When
  that falls back to interpret mode, the dispatcher warns once per process and kernel (after the
  backend has accepted the call); an explicit ``interpret=True`` never warns.
  """
  interpret = interpret_mode(requested, platform)
  note("interpret", interpret)
  note("interpret_implicit", interpret and requested is None)
  return interpret


def _warn_interpret(family: str, attempt: Attempt) -> None:
  if not attempt.notes.get("interpret_implicit") or _records() is not None:
    return
  key = (family, attempt.backend)
  if key in _WARNED_INTERPRET:
    return
  _WARNED_INTERPRET.add(key)
  warnings.warn(
      f"attn_jax: the {attempt.backend} {family} kernel runs in Pallas interpret mode on platform "
      f"{current_platform()!r} (exact but slow, for tests and debugging). Pass implementation=None "
      f"to use this platform's default backend, or interpret=True in the config to silence this.",
      RuntimeWarning, stacklevel=2)


def _call(family: str, name: str, fn, choice: Choice, args, kwargs):
  attempt = Attempt(name)
  choice.attempts.append(attempt)
  stack = _attempt_stack()
  stack.append(attempt)
  try:
    out = fn(*args, **kwargs)
  except NotImplementedError as e:
    attempt.declined = str(e)
    raise
  finally:
    stack.pop()
  _warn_interpret(family, attempt)
  return out


def _dispatch_now(family: str, implementation: str | None, *args, **kwargs):
  table = _REGISTRY.get(family, {})
  if implementation is not None and implementation not in table:
    raise ValueError(
        f"implementation must be one of {sorted(table)} or None for {family}, got {implementation!r}")
  choice = Choice(family, implementation, current_platform())
  records = _records()
  if records is not None:
    records.append(choice)
  if implementation is not None:
    return _call(family, implementation, table[implementation], choice, args, kwargs)
  reasons = []
  for name in platform_order(family):
    try:
      return _call(family, name, table[name], choice, args, kwargs)
    except NotImplementedError as e:
      reasons.append(f"{name}: {e}")
  raise NotImplementedError(
      f"no {family} backend on platform {current_platform()!r} supports this call: " + "; ".join(reasons))


@_jit_cache.cached
def _dispatch_cached(static, *args):
  family, implementation, kwargs = static[:3]
  return _dispatch_now(family, implementation, *args, **dict(kwargs))


def dispatch(family: str, implementation: str | None, *args, **kwargs):
  """Calls the chosen backend of ``family`` with ``args`` (arrays or None) and ``kwargs`` (static).

  The call is compiled once per (family, implementation, kwargs, array shapes and dtypes) and
  reused by later eager calls; under an outer ``jax.jit`` it is traced inline.
  """
  static = (family, implementation, tuple(sorted(kwargs.items())), state_key(family))
  return _dispatch_cached(static, *args)


def state_key(family: str) -> tuple:
  """What a dispatch of ``family`` depends on besides its arguments: the platform and the
  registered backends. Cached computations that dispatch put it in their static key, so that a
  compiled choice does not outlive a change of either (tests swap both)."""
  return current_platform(), tuple(_REGISTRY.get(family, {}).items())
