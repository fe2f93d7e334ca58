"""Registry of the mechanisms that experiments train and compare: name -> model change.

A quality-benchmark mechanism is a function from the base mixer config of a model (heads,
backend, RoPE: :class:`attn_jax.layers.AttentionConfig`) and the task's sequence length to the
model's mixer *schedule* (one config, or a tuple cycled over the layers for hybrids). The model
zoo's own registry (:mod:`attn_jax.layers.mechanisms`) turns each config into a layer, so an
entry here is a few lines::

    mechanisms.register(mechanisms.Entry(
        "my_window", lambda base, seq_len: base.replace(window=seq_len // 8),
        description="sliding window of seq_len / 8"))

Entries whose ``requires`` names are missing from ``attn_jax`` (a primitive that this
installation lacks) are registered but not *available*: :func:`available` skips them and
:func:`schedule` raises, so the linear family joins the benchmark by itself once
``attn_jax.linear_attention`` exists.

``experiments.train`` configs select an entry with ``config.model.mechanism``; the benchmark runs
every available entry with ``default=True`` unless told otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import attn_jax
from attn_jax.layers import config as config_lib

Schedule = config_lib.AttentionConfig | tuple[config_lib.AttentionConfig, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
  """One named mechanism.

  Attributes:
    name: the registry key (``config.model.mechanism``, ``--quality_mechanisms``).
    make: ``(base, seq_len) -> schedule``; ``base`` is the model's mixer config.
    requires: names that must exist on ``attn_jax`` for the entry to be available.
    default: part of the benchmark's default mechanism list (keep these cheap on a CPU).
    description: one line for reports.
  """

  name: str
  make: Callable[[config_lib.AttentionConfig, int], Schedule]
  requires: tuple[str, ...] = ()
  default: bool = True
  description: str = ""

  @property
  def is_available(self) -> bool:
    return all(getattr(attn_jax, name, None) is not None for name in self.requires)


_REGISTRY: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
  """Adds (or replaces) ``entry``; returns it."""
  if not isinstance(entry, Entry):
    raise ValueError(f"entry must be an experiments.mechanisms.Entry, got {type(entry).__name__}")
  _REGISTRY[entry.name] = entry
  return entry


def names() -> tuple[str, ...]:
  """Every registered name, available or not."""
  return tuple(_REGISTRY)


def available(default_only: bool = False) -> tuple[str, ...]:
  """Registered names whose required primitives exist (only ``default=True`` ones if asked)."""
  return tuple(n for n, e in _REGISTRY.items() if e.is_available and (e.default or not default_only))


def get(name: str) -> Entry:
  if name not in _REGISTRY:
    raise ValueError(f"mechanism must be one of {sorted(_REGISTRY)}, got {name!r}")
  return _REGISTRY[name]


def schedule(name: str, base: config_lib.AttentionConfig, seq_len: int) -> Schedule:
  """The mixer schedule of mechanism ``name`` for a model whose base mixer config is ``base``."""
  entry = get(name)
  if not entry.is_available:
    missing = [n for n in entry.requires if getattr(attn_jax, n, None) is None]
    raise ValueError(f"mechanism {name!r} needs attn_jax.{', attn_jax.'.join(missing)}, which this "
                     f"installation lacks; available: {list(available())}")
  return entry.make(base, seq_len)


def default_window(seq_len: int) -> int:
  """The benchmark's sliding window: a quarter of the sequence, at least 4 tokens."""
  return max(4, seq_len // 4)


register(Entry("softmax", lambda base, seq_len: base.replace(mechanism="softmax"),
               description="dense causal softmax attention"))
register(Entry("sliding_window",
               lambda base, seq_len: base.replace(mechanism="softmax", window=default_window(seq_len)),
               description="causal sliding window of seq_len / 4 tokens"))
register(Entry("sliding_window_sinks",
               lambda base, seq_len: base.replace(mechanism="softmax", window=default_window(seq_len),
                                                  num_sink_tokens=4),
               default=False, description="sliding window of seq_len / 4 plus 4 sink tokens"))
register(Entry("chunked", lambda base, seq_len: base.replace(mechanism="softmax",
                                                             chunk_size=default_window(seq_len)),
               default=False, description="chunked causal attention, chunks of seq_len / 4"))
register(Entry("conv_window",
               lambda base, seq_len: (base.replace(mechanism="short_conv"),
                                      base.replace(mechanism="softmax", window=default_window(seq_len))),
               default=False, description="short convolution and sliding window layers, alternating"))
register(Entry("linear", lambda base, seq_len: base.replace(mechanism="linear"),
               requires=("linear_attention",),
               description="normalised linear attention (elu + 1 feature map)"))
register(Entry("linear_decay", lambda base, seq_len: base.replace(mechanism="linear", decay="data"),
               requires=("linear_attention",), default=False,
               description="linear attention with data-dependent decay (simple GLA / Mamba-2)"))
register(Entry("linear_window",
               lambda base, seq_len: (base.replace(mechanism="linear"),
                                      base.replace(mechanism="softmax", window=default_window(seq_len))),
               requires=("linear_attention",), default=False,
               description="linear attention and sliding window layers, alternating (Based's mix, "
                           "without its convolutions)"))
register(Entry("neighborhood",
               lambda base, seq_len: base.replace(
                   mechanism="neighborhood", kernel_size=max(2, math.isqrt(seq_len) // 2)),
               requires=("neighborhood_attention",), default=False,
               description="neighborhood attention, kernel half the grid side (ViT configs)"))
