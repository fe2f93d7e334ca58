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

__all__ = ["register", "backends", "platform_order", "dispatch", "current_platform", "interpret_mode"]

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}

# The order in which implementation=None tries backends on each platform. Names not registered
# for a family (a kernel that does not exist yet) are skipped.
_PLATFORM_ORDER = {
    "tpu": ("pallas_tpu", "xla"),
    "gpu": ("pallas_gpu", "xla"),
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
