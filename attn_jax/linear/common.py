"""Pieces shared by every linear-attention backend: the static call description and index helpers.

Backends see the recurrence after the API has applied the feature map, the scale and (for
``normalize=True``) appended a column of ones to the values, so that the normaliser
``z_t = a_t z_{t-1} + phi(k_t)`` is simply the last value column of the state. What reaches a
backend is therefore always::

    S_t = a_t * S_{t-1} + k_t v_t^T       (S_t = k_t v_t^T at a segment start)
    o_t = q_t^T S_t

with ``q [B, T, Hq, K]``, ``k [B, T, Hs, K]``, ``v [B, T, Hs, V]``, ``Hq = G * Hs`` (query head
``h`` reads the state of head ``h // G``), and the log decay ``log a_t`` either
absent, one scalar per (batch, step, head) ``[B, T, Hs]``, or one value per key channel
``[B, T, Hs, K]`` (GLA gates, which decay the rows of ``S``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from attn_jax import dispatch

# Decay kinds after argument checking. A fixed per-head decay reaches the backends as "scalar"
# (broadcast over batch and time), so that its gradient comes out of the same code.
NONE, SCALAR, CHANNEL = "none", "scalar", "channel"


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static (hashable) description of one causal linear-attention call, after argument checking.

  Attributes:
    seq_len: number of tokens ``T``.
    num_q_heads, num_state_heads: ``Hq`` and ``Hs`` (``Hq`` a multiple of ``Hs``).
    key_dim, value_dim: ``K`` (feature dimension after the feature map) and ``V`` (value
      dimension, plus one when the API normalises).
    decay: ``NONE``, ``SCALAR`` or ``CHANNEL``.
    has_initial_state, has_segments: whether those optional inputs are given.
    out_dtype: dtype of the returned output (float32 when the API still has to divide by the
      normaliser, else the input dtype).
    chunk_size: requested chunk length, or None for the backend's default.
  """

  seq_len: int
  num_q_heads: int
  num_state_heads: int
  key_dim: int
  value_dim: int
  decay: str
  has_initial_state: bool
  has_segments: bool
  out_dtype: jnp.dtype
  chunk_size: int | None = None

  @property
  def group_size(self) -> int:
    return self.num_q_heads // self.num_state_heads


def run_starts(segment_ids):
  """``[B, T]`` ids -> ``[B, T]`` bool, True where the recurrence restarts from a zero state.

  A run starts wherever the id differs from the previous token's, so an id that is reused later
  (``0 0 1 1 0``) starts a new document, as it does for a sequential reader. Token 0 never starts
  a run: it continues the initial state.
  """
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros((segment_ids.shape[0], 1), bool), change], axis=1)


def reset_index(segment_ids):
  """``[B, T]`` ids -> ``[B, T]`` int32 number of run starts up to and including each token.

  Two tokens belong to the same run of the recurrence iff their counts are equal.
  """
  return jnp.cumsum(run_starts(segment_ids).astype(jnp.int32), axis=1)


round_up = dispatch.round_up


def pad_axis(x, axis: int, size: int, mode: str = "zeros"):
  """Pads ``axis`` of ``x`` at the end to ``size`` with zeros or (``mode="edge"``) its last value."""
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  if mode == "edge":
    return jnp.pad(x, widths, mode="edge")
  return jnp.pad(x, widths)


def segment_reverse_cumsum(x, resets, axis: int):
  """Sum of ``x`` from each position to the end of its run along ``axis`` (runs end before resets).

  Args:
    x: float array.
    resets: bool array broadcastable to ``x``, True where a new run starts.
  """
  def combine(a, b):
    # Elements are (value, starts_run); scanning right-to-left, a run start stops the sum from
    # flowing further left.
    va, sa = a
    vb, sb = b
    return jnp.where(sb, vb, va + vb), sa | sb

  resets = jnp.broadcast_to(resets, x.shape)
  # Reverse-time scan: the element to the right (later in time) is combined first, and a run
  # start blocks everything to its right from reaching positions before it.
  xs = (jnp.flip(x, axis), jnp.flip(_shift_left(resets, axis), axis))
  out, _ = lax.associative_scan(combine, xs, axis=axis)
  return jnp.flip(out, axis)


def _shift_left(resets, axis: int):
  """``out[t] = resets[t + 1]`` (False at the end): True where the run ends after position t."""
  n = resets.shape[axis]
  nxt = lax.slice_in_dim(resets, 1, n, axis=axis)
  end = jnp.zeros_like(lax.slice_in_dim(resets, 0, 1, axis=axis))
  return jnp.concatenate([nxt, end], axis=axis)
