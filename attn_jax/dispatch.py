"""Backend registry and ``implementation=`` dispatch shared by every primitive family.

Each family (softmax attention, linear attention, ...) registers named backends. A backend is a
callable that either serves the call or raises ``NotImplementedError`` naming the feature it
lacks, before doing any expensive work. With ``implementation=None`` the dispatcher tries the
platform's ordered list and returns the first backend that serves the call; an explicit name is
called alone and its ``NotImplementedError`` propagates, so a request is never silently served
by another backend.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

__all__ = ["register", "backends", "platform_order", "dispatch", "current_platform"]

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}

# The order in which implementation=None tries backends on each platform. Names not registered
# for a family (a kernel that does not exist yet) are skipped.
_PLATFORM_ORDER = {
    "tpu": ("pallas_tpu", "xla"),
    "gpu": ("pallas_gpu", "xla"),
    "cpu": ("xla",),
}


def register(family: str, name: str, fn: Callable[..., Any]) -> None:
  _REGISTRY.setdefault(family, {})[name] = fn


def backends(family: str) -> tuple[str, ...]:
  """Names of the backends registered for ``family``, ``reference`` included."""
  return tuple(_REGISTRY.get(family, {}))


def current_platform() -> str:
  platform = jax.default_backend()
  # ROCm and CUDA both lower through the GPU path.
  return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def platform_order(family: str, platform: str | None = None) -> tuple[str, ...]:
  platform = platform or current_platform()
  table = _REGISTRY.get(family, {})
  return tuple(n for n in _PLATFORM_ORDER.get(platform, ("xla",)) if n in table)


def dispatch(family: str, implementation: str | None, *args, **kwargs):
  """Calls the chosen backend of ``family`` with ``args``/``kwargs``."""
  table = _REGISTRY.get(family, {})
  if implementation is not None:
    if implementation not in table:
      raise ValueError(
          f"implementation must be one of {sorted(table)} or None for {family}, got {implementation!r}")
    return table[implementation](*args, **kwargs)
  reasons = []
  for name in platform_order(family):
    try:
      return table[name](*args, **kwargs)
    except NotImplementedError as e:
      reasons.append(f"{name}: {e}")
  raise NotImplementedError(
      f"no {family} backend on platform {current_platform()!r} supports this call: " + "; ".join(reasons))
