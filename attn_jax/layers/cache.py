"""Decoding caches. A cache is a pytree chosen by its mechanism.

Each token mixer owns the pytree that carries its state from one decoding step to the next (its
registry entry names the class; a mixer may define its own, e.g. ``BasedCache``):

* :class:`KVCache` for softmax attention: keys, values and the absolute position of each slot.
  With ``window=None`` slot ``p`` holds position ``p`` (capacity = the longest sequence). With
  ``window=w`` it is a *rolling* cache of ``num_sinks + w`` slots: the first ``num_sinks``
  positions stay in their own slots forever (StreamingLLM's attention sinks) and every later
  position ``p`` overwrites slot ``num_sinks + (p - num_sinks) % w``, so memory is bounded by
  ``num_sinks + w`` however long the generation runs.
* :class:`CrossKVCache`: the encoder memory's keys and values for cross attention, computed once.
* :class:`RecurrentCache`: the state of a recurrent mixer (linear attention's ``S``, ``z``),
  whatever pytree its primitive returns.
* :class:`ConvCache`: the last ``width - 1`` inputs of a causal short convolution.

All caches are immutable; updates return new caches, so they pass through ``jax.jit``,
``lax.scan`` and ``lax.fori_loop`` as ordinary pytrees. Positions are shared by the whole batch
(sequences decode in lock-step).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax import masks as masks_lib
from attn_jax import sharding


def _register(cls, data, meta):
  return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys ``[B, S, Hkv, D]``, values ``[B, S, Hkv, Dv]`` and slot positions ``[S]`` (-1: empty)."""

  k: jax.Array
  v: jax.Array
  positions: jax.Array
  num_sinks: int = 0
  window: int | None = None

  @classmethod
  def create(cls, batch: int, capacity: int, kv_heads: int, head_dim: int, v_head_dim: int,
             dtype, *, num_sinks: int = 0, window: int | None = None) -> "KVCache":
    """An empty cache. For a rolling cache ``capacity`` is ignored: it holds ``num_sinks + window``."""
    if window is not None:
      capacity = num_sinks + window
    return cls(k=jnp.zeros((batch, capacity, kv_heads, head_dim), dtype),
               v=jnp.zeros((batch, capacity, kv_heads, v_head_dim), dtype),
               positions=jnp.full((capacity,), -1, jnp.int32), num_sinks=num_sinks, window=window)

  @property
  def capacity(self) -> int:
    return self.k.shape[1]

  @property
  def rolling(self) -> bool:
    return self.window is not None

  def slot(self, position):
    """The slot that stores ``position``."""
    if not self.rolling:
      return position
    n, w = self.num_sinks, self.window
    return jnp.where(position < n, position, n + (position - n) % w)

  def append(self, k, v, position) -> "KVCache":
    """Writes one token's ``k [B, 1, Hkv, D]`` and ``v`` at ``position`` (a traced int scalar).

    A full cache must have ``position < capacity``; :func:`attn_jax.models.generate`
    sizes it so.
    """
    slot = jnp.asarray(self.slot(position), jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    k_new = jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), (zero, slot, zero, zero))
    v_new = jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), (zero, slot, zero, zero))
    pos = jax.lax.dynamic_update_slice(self.positions, jnp.asarray(position, jnp.int32)[None], (slot,))
    return dataclasses.replace(self, k=k_new, v=v_new, positions=pos)

  def fill(self, k, v) -> "KVCache":
    """Stores a prompt's ``k [B, T, Hkv, D]`` and ``v`` for positions ``0 .. T-1`` (empty cache).

    A rolling cache keeps what it would hold after appending them one by one: the sinks and
    the last ``window`` positions. The surviving position of every slot is computed in closed
    form and gathered, rather than scattered, because a scatter with repeated slots has no
    defined order.
    """
    t = k.shape[1]
    if not self.rolling:
      if t > self.capacity:
        raise ValueError(f"prompt of length {t} does not fit a cache of capacity {self.capacity}")
      pad = ((0, 0), (0, self.capacity - t), (0, 0), (0, 0))
      positions = jnp.where(jnp.arange(self.capacity) < t, jnp.arange(self.capacity), -1)
      return dataclasses.replace(self, k=jnp.pad(k.astype(self.k.dtype), pad),
                                 v=jnp.pad(v.astype(self.v.dtype), pad),
                                 positions=positions.astype(jnp.int32))
    n, w = self.num_sinks, self.window
    sink_pos = jnp.arange(n)
    j = jnp.arange(w)
    # The largest p < t with p >= n and (p - n) % w == j, or -1.
    last = n + j + w * ((t - 1 - n - j) // w)
    win_pos = jnp.where(t - 1 - n - j >= 0, last, -1)
    positions = jnp.concatenate([jnp.where(sink_pos < t, sink_pos, -1), win_pos]).astype(jnp.int32)
    idx = jnp.maximum(positions, 0)
    keep = (positions >= 0)[None, :, None, None]
    k_new = jnp.where(keep, jnp.take(k, idx, axis=1), 0).astype(self.k.dtype)
    v_new = jnp.where(keep, jnp.take(v, idx, axis=1), 0).astype(self.v.dtype)
    return dataclasses.replace(self, k=k_new, v=v_new, positions=positions)

  def visible(self, query_position, mask: masks_lib.Mask):
    """``[S]`` bool: the occupied slots whose key the query at ``query_position`` may see.

    Masks are predicates of absolute positions; in self attention the default offset is 0, so
    evaluating them at (query position, slot position) reproduces exactly the mask applied to
    the whole sequence.
    """
    ctx = masks_lib.MaskContext(1, 1)
    seen = mask.evaluate(jnp.asarray(query_position, jnp.int32), self.positions, None, ctx, jnp)
    return (self.positions >= 0) & (self.positions <= query_position) & seen

  def constrained(self) -> "KVCache":
    """The cache with keys/values split by batch and KV heads under active sharding rules."""
    spec = ("batch", None, "act_kv_heads", None)
    return dataclasses.replace(self, k=sharding.constrain(self.k, spec), v=sharding.constrain(self.v, spec))

  def in_cache_positions(self, query_position):
    """StreamingLLM's positions: each slot's rank among the cached positions, ``[S]``.

    Sinks keep positions ``0 .. n-1``; the window's keys get ``n, n+1, ...`` in order of their
    original positions, the newest (the query itself) being ``min(query_position, n + w - 1)``.
    """
    n, w = self.num_sinks, self.window
    first = jnp.maximum(n, query_position - w + 1)
    return jnp.where(self.positions < n, self.positions, n + self.positions - first)


_register(KVCache, ["k", "v", "positions"], ["num_sinks", "window"])


@dataclasses.dataclass(frozen=True)
class CrossKVCache:
  """Encoder memory keys ``[B, M, Hkv, D]`` and values for cross attention."""

  k: jax.Array
  v: jax.Array


_register(CrossKVCache, ["k", "v"], [])


@dataclasses.dataclass(frozen=True)
class RecurrentCache:
  """The recurrent state of a mixer (any pytree), e.g. linear attention's ``S`` (and ``z``)."""

  state: Any


_register(RecurrentCache, ["state"], [])


@dataclasses.dataclass(frozen=True)
class ConvCache:
  """The last ``width - 1`` inputs ``[B, width - 1, C]`` of a causal convolution."""

  window: jax.Array


_register(ConvCache, ["window"], [])


def cache_bytes(cache) -> int:
  """Total bytes of a cache pytree (its arrays' sizes, for memory accounting and tests)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
