"""What changed for runs made before the mixer registry, said in error messages.

Before the registry, ``config.model.mechanism`` named an entry of a separate experiments registry
(``softmax``, ``sliding_window``, ``conv_window``, ...) and ``config.model.window`` replaced the
window of every windowed layer. Both are gone: ``config.model.mixer`` names a mechanism of
``attn_jax.layers`` (or several, comma-separated, for a hybrid) and
``config.model.mixer_fields.<name>.<field>`` sets its fields. Checkpoints of the old runs keep
their parameter structure (the softmax, linear, short-convolution and neighborhood layers did not
change), so they resume under the equivalent new flags, which :func:`legacy_flags` spells out.
"""

from __future__ import annotations

import json
import math
import os

_SOFTMAX = "--config.model.mixer_fields.softmax"


def _window(seq_len, window):
  if window:
    return str(window)
  return str(max(4, seq_len // 4)) if seq_len else "<max(4, seq_len // 4)>"


def legacy_flags(mechanism: str, seq_len: int | None = None, window: int = 0) -> list[str] | None:
  """The new flags equal to the old ``--config.model.mechanism=<mechanism>`` (and
  ``--config.model.window=<window>``) for a task of ``seq_len`` tokens; None for an unknown name."""
  w = _window(seq_len, window)
  kernel = str(max(2, math.isqrt(seq_len) // 2)) if seq_len else "<max(2, isqrt(seq_len) // 2)>"
  table = {
      "softmax": ["--config.model.mixer=softmax"],
      "sliding_window": ["--config.model.mixer=softmax", f"{_SOFTMAX}.window={w}"],
      "sliding_window_sinks": ["--config.model.mixer=softmax", f"{_SOFTMAX}.window={w}",
                               f"{_SOFTMAX}.num_sink_tokens=4"],
      "chunked": ["--config.model.mixer=softmax", f"{_SOFTMAX}.chunk_size={w}"],
      "conv_window": ["--config.model.mixer=short_conv,softmax", f"{_SOFTMAX}.window={w}"],
      "linear": ["--config.model.mixer=linear"],
      "linear_decay": ["--config.model.mixer=linear", "--config.model.mixer_fields.linear.decay=data"],
      "linear_window": ["--config.model.mixer=linear,softmax", f"{_SOFTMAX}.window={w}"],
      "neighborhood": ["--config.model.mixer=neighborhood",
                       f"--config.model.mixer_fields.neighborhood.kernel_size={kernel}"],
  }
  if mechanism not in table:
    return None
  flags = list(table[mechanism])
  if window and mechanism == "softmax":
    flags.append(f"{_SOFTMAX}.window={window}")
  return flags


def explain(mechanism: str | None, seq_len: int | None = None, window: int = 0) -> str:
  """One message: what replaced ``model.mechanism`` / ``model.window``, and the equivalent flags."""
  head = ("config.model.mechanism and config.model.window were replaced by config.model.mixer (a "
          "mixer registry name, or names joined by commas for a hybrid: python -m experiments.benchmark "
          "--list) and config.model.mixer_fields.<name>.<field> (that mechanism's own fields)")
  if mechanism is None:
    return f"{head}; a window is now {_SOFTMAX}.window={window}"
  flags = legacy_flags(mechanism, seq_len, window)
  if flags is None:
    return f"{head}; the old mechanism {mechanism!r} has no direct equivalent."
  return f"{head}; the old mechanism {mechanism!r} is now: {' '.join(flags)}"


def scan_argv(argv) -> str | None:
  """The explanation when a command line still uses the removed flags, else None."""
  mechanism, window = None, 0
  for arg in argv:
    for name in ("--config.model.mechanism=", "-config.model.mechanism="):
      if arg.startswith(name):
        mechanism = arg[len(name):]
    if arg.startswith(("--config.model.window=", "-config.model.window=")):
      window = int(arg.split("=", 1)[1]) if arg.split("=", 1)[1].isdigit() else 0
  if mechanism is None and not window:
    return None
  return explain(mechanism, None, window)


def _seq_len(config: dict) -> int | None:
  model, data = config.get("model", {}), config.get("data", {})
  if model.get("kind") == "vit":
    size, patch = data.get("image_size"), model.get("patch_size")
    if size and patch:
      return (size[0] // patch) * (size[1] // patch)
    return None
  return data.get("seq_len")


def workdir_hint(workdir: str | None) -> str:
  """For a workdir whose ``config.json`` predates the registry: how to resume it; else ``""``."""
  if workdir is None:
    return ""
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return ""
  model = old.get("model", {})
  if "mechanism" not in model:
    return ""
  return (f". This workdir was written before the mixer registry (its config.json has "
          f"model.mechanism={model['mechanism']!r}): "
          + explain(model["mechanism"], _seq_len(old), int(model.get("window") or 0)))
