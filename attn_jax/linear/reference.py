"""The oracle: the linear-attention recurrence token by token, in float32.

``lax.scan`` over time carries the state ``S [B, Hs, K, V]``; gradients come from autodiff. Its
memory is O(T * K * V) under differentiation (one saved state per token), so it serves tests and
short sequences only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attn_jax.linear import common


def linear_attention(q, k, v, log_decay, initial_state, segment_ids, *, spec: common.Spec, config=None):
  """Reference causal linear attention.

  Args:
    q: ``[B, T, Hq, K]``; k: ``[B, T, Hs, K]``; v: ``[B, T, Hs, V]``.
    log_decay: None, ``[B, T, Hs]`` or ``[B, T, Hs, K]`` float32 log of the decay ``a_t``.
    initial_state: ``[B, Hs, K, V]`` float32 or None.
    segment_ids: ``[B, T]`` int32 or None; the state restarts at 0 where the id changes.

  Returns:
    ``(o [B, T, Hq, V] in spec.out_dtype, final_state [B, Hs, K, V] float32)``.
  """
  if config is not None:
    raise ValueError(f"the reference backend takes no config, got {config!r}")
  b, t, hq, kd = q.shape
  hs, g, vd = spec.num_state_heads, spec.group_size, spec.value_dim
  hi = lax.Precision.HIGHEST
  qf = q.astype(jnp.float32).reshape(b, t, hs, g, kd)
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
  if log_decay is None:
    log_decay = jnp.zeros((b, t, hs), jnp.float32)
  decay = jnp.exp(log_decay.astype(jnp.float32))
  if spec.decay == common.CHANNEL:
    decay = decay[..., None]  # [B, T, Hs, K, 1]: decays the rows of S.
  else:
    decay = decay[..., None, None]  # [B, T, Hs, 1, 1]
  if segment_ids is None:
    keep = jnp.ones((b, t), jnp.float32)
  else:
    keep = 1.0 - common.run_starts(segment_ids).astype(jnp.float32)
  s0 = (jnp.zeros((b, hs, kd, vd), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))

  def step(s, xs):
    q_t, k_t, v_t, a_t, keep_t = xs
    s = s * (a_t * keep_t[:, None, None, None]) + jnp.einsum("bhk,bhv->bhkv", k_t, v_t, precision=hi)
    o_t = jnp.einsum("bhgk,bhkv->bhgv", q_t, s, precision=hi)
    return s, o_t

  xs = (qf.swapaxes(0, 1), kf.swapaxes(0, 1), vf.swapaxes(0, 1), decay.swapaxes(0, 1), keep.swapaxes(0, 1))
  s, o = lax.scan(step, s0, xs)
  o = o.swapaxes(0, 1).reshape(b, t, hq, vd).astype(spec.out_dtype)
  return o, s
