"""Causal linear attention with the sequence sharded over a mesh axis: state passing.

The recurrence ``S_t = a_t S_{t-1} + k_t v_t^T`` over a shard of ``L`` tokens is an affine map
of the state that enters it: ``S_out = A S_in + S_local`` with ``A = prod_t a_t`` (zero when a
document starts inside the shard) and ``S_local`` the shard's state from a zero start. So:

1. each device runs the chosen backend on its shard from a zero state (outputs and
   ``S_local``), in float32;
2. the affine maps ``(A, S_local)`` are composed across devices by a Hillis-Steele prefix scan:
   ``log2(n)`` rounds of ``ppermute`` of one state each, then one shift gives every device the
   state ``S_in`` that enters its shard (device 0: the initial state);
3. each token that still belongs to the document open at the shard start adds what ``S_in``
   contributes to it: ``o_t += (q_t * exp(b_t))^T S_in``, with ``b_t`` the cumulative log decay
   from the shard start (``<= 0``, so nothing overflows).

Every decay kind works the same way: none (``A = 1``), one scalar per step and head (``A`` is
``[B, Hs]``), or one per key channel (``A`` is ``[B, Hs, K]``, decaying the rows of ``S``). The
communication is ``2 log2(n) + 1`` state-sized messages per direction, independent of ``T``.
Gradients come from autodiff: the backend's own VJP for the local part, and the transposes of
the ``ppermute``s (``ppermute`` in the other direction) for the scan.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from attn_jax import dispatch
from attn_jax.context_parallel import config as config_lib
from attn_jax.linear import common

FAMILY = "linear"


def _prefix_states(a, s, axis_name: str, n: int):
  """Inclusive prefix of the affine maps ``X -> a X + s`` over the devices of ``axis_name``.

  ``a`` broadcasts against ``s``. After the round of distance ``d``, device ``i`` holds the
  composition of the maps of devices ``max(0, i - 2d + 1) .. i`` (later maps applied last).
  """
  i = lax.axis_index(axis_name)
  d = 1
  while d < n:
    perm = [(j, j + d) for j in range(n - d)]
    a_prev = lax.ppermute(a, axis_name, perm)
    s_prev = lax.ppermute(s, axis_name, perm)
    later = i >= d
    s = jnp.where(later, a * s_prev + s, s)
    a = jnp.where(later, a * a_prev, a)
    d *= 2
  return a, s


def _run_starts(segment_ids, axis_name: str, n: int):
  """``[B, L]`` bool: where a document starts, in global terms (the first token of a shard
  starts one when its id differs from the last id of the previous shard)."""
  i = lax.axis_index(axis_name)
  prev_last = config_lib.ring_shift(segment_ids[:, -1:], axis_name, n)
  first = (segment_ids[:, :1] != prev_last) & (i > 0)
  inner = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([first, inner], axis=1)


def linear_attention(q, k, v, log_decay, initial_state, segment_ids, *, spec: common.Spec,
                     cp: config_lib.ContextParallel, implementation=None, config=None):
  """Context-parallel causal linear attention; the backend contract of
  :func:`attn_jax.linear.reference.linear_attention` (after the API's feature map and GQA
  expansion): ``q [B, T, Hq, K]``, ``k [B, T, Hs, K]``, ``v [B, T, Hs, V]``, ``log_decay``
  None / ``[B, T, Hs]`` / ``[B, T, Hs, K]``, ``initial_state [B, Hs, K, V]`` or None,
  ``segment_ids [B, T]`` or None. Returns ``(o [B, T, Hq, V] in spec.out_dtype, final state)``.
  """
  if getattr(config, "sharding", None) is not None:
    raise ValueError("config.sharding must be None with context_parallel: batch and head sharding come "
                     "from ContextParallel.batch_axes / head_axes")
  n = cp.size
  config_lib.check_length(cp, "seq_len", spec.seq_len, 1, spec.chunk_size, "chunk_size")
  config_lib.check_divides(cp, "batch", q.shape[0], cp.batch_axes, cp.batch_shards)
  config_lib.check_divides(cp, "state heads", spec.num_state_heads, cp.head_axes, cp.head_shards)
  heads = cp.head_shards
  local_spec = dataclasses.replace(spec, seq_len=spec.seq_len // n, num_q_heads=spec.num_q_heads // heads,
                                   num_state_heads=spec.num_state_heads // heads, has_initial_state=False,
                                   out_dtype=jnp.dtype(jnp.float32))
  channel = spec.decay == common.CHANNEL

  def body(q, k, v, log_decay, initial_state, segment_ids):
    o, s_local = dispatch.dispatch(FAMILY, implementation, q, k, v, log_decay, None, segment_ids,
                                   spec=local_spec, config=config)
    b, length = q.shape[:2]
    local_heads = k.shape[2]
    if segment_ids is None:
      open_run = jnp.ones((b, length), bool)
    else:
      open_run = jnp.cumsum(_run_starts(segment_ids, cp.axis_name, n).astype(jnp.int32), axis=1) == 0
    keep = open_run[:, -1].astype(jnp.float32)  # no document starts in the shard
    if log_decay is None:
      cum = None
      a = jnp.broadcast_to(keep[:, None], (b, local_heads))
    else:
      cum = jnp.cumsum(log_decay.astype(jnp.float32), axis=1)  # [B, L, Hs(, K)]
      a = jnp.exp(cum[:, -1]) * (keep[:, None, None] if channel else keep[:, None])
    a = a[..., None] if channel else a[..., None, None]  # broadcasts against [B, Hs, K, V]

    a_inc, s_inc = _prefix_states(a, s_local, cp.axis_name, n)
    first = lax.axis_index(cp.axis_name) == 0
    a_ex = jnp.where(first, 1.0, config_lib.ring_shift(a_inc, cp.axis_name, n))
    s_ex = jnp.where(first, 0.0, config_lib.ring_shift(s_inc, cp.axis_name, n))
    s_in = s_ex if initial_state is None else a_ex * initial_state.astype(jnp.float32) + s_ex

    factor = open_run.astype(jnp.float32)[:, :, None]  # [B, L, 1]
    if cum is not None:
      factor = factor[..., None] * jnp.exp(cum) if channel else factor * jnp.exp(cum)
    qf = q.astype(jnp.float32).reshape(b, length, local_heads, q.shape[2] // local_heads, q.shape[3])
    qf = qf * (factor[:, :, :, None, :] if channel else factor[..., None, None])
    o_in = jnp.einsum("blsgk,bskv->blsgv", qf, s_in, precision=lax.Precision.HIGHEST)
    o = o.astype(jnp.float32) + o_in.reshape(o.shape)
    s_out = a * s_in + s_local
    return o.astype(spec.out_dtype), s_out[None]

  x = cp.spec("batch", "seq", "heads", None)
  decay_spec = cp.spec("batch", "seq", "heads", None) if channel else cp.spec("batch", "seq", "heads")
  state = cp.spec("batch", "heads", None, None)
  seg = cp.spec("batch", "seq")
  stacked = cp.spec("seq", "batch", "heads", None, None)
  o, final = cp.shard_map(body, (x, x, x, decay_spec, state, seg), (x, stacked),
                          (q, k, v, log_decay, initial_state, segment_ids))
  # Every device returned the state after its shard; the last one is the sequence's.
  return o, final[-1]

