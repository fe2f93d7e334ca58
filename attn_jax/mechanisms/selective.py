"""Selective Attention (Zhang et al., "Selective Attention: Enhancing Transformer through
Principled Context Control", NeurIPS 2024): a query- and position-dependent temperature on the
logits, and a value temperature.

Selective Self-Attention (SSA, Sec. 3) scales each query by an inverse temperature
``tau(x_i, i)`` that depends on the token and on its position, so that a query can make its
attention map sharper or flatter independently of its direction (semantic similarity), and
counter the flattening of attention as the context grows (attention dilution); an optional
value temperature ``nu_j`` scales each value so that irrelevant tokens can be suppressed.
"""

from __future__ import annotations

import jax.numpy as jnp

from attn_jax.mechanisms import dense
from attn_jax.softmax import api as softmax_api


def selective_temperature(token_logits, positions, position_scale):
  """SSA's inverse temperature ``tau(x_i, i) = tanh(token_logits_i) + 1 + s_h log(1 + i)``.

  The paper (Sec. 3.1, "query selectivity" and "position-aware temperature") combines a
  token-dependent term, a small learned function of the token (here its output
  ``token_logits``, e.g. a projection of the token shared with the query projection, which is
  how SSA keeps under 0.5 % extra parameters), and a position term growing like ``log i``, which
  counters attention dilution. Our choices: the token term is squashed by ``tanh`` and the
  position term is ``1 + s_h log(1 + i)`` with ``s_h >= 0`` (e.g. a softplus), so that
  ``tau > 0`` always and ``tau = 1`` (plain attention) when both terms vanish.

  Args:
    token_logits: ``[B, T, H]``.
    positions: ``[T]`` or ``[B, T]`` non-negative positions (absolute token index).
    position_scale: ``[H]`` non-negative ``s_h``.

  Returns:
    ``[B, T, H]`` float32 inverse temperatures.
  """
  token_logits = jnp.asarray(token_logits, jnp.float32)
  positions = jnp.asarray(positions, jnp.float32)
  position_scale = jnp.asarray(position_scale, jnp.float32)
  if token_logits.ndim != 3:
    raise ValueError(f"token_logits must have shape [batch, seq, heads], got {token_logits.shape}")
  b, t, h = token_logits.shape
  if positions.shape not in ((t,), (b, t)):
    raise ValueError(f"positions must have shape [seq] = ({t},) or [batch, seq] = {(b, t)}, got {positions.shape}")
  if position_scale.shape != (h,):
    raise ValueError(f"position_scale must have shape [heads] = ({h},), got {position_scale.shape}")
  positions = jnp.broadcast_to(positions, (b, t))
  return jnp.tanh(token_logits) + 1.0 + position_scale * jnp.log1p(positions)[..., None]


def _check(q, k, v, query_temperature, value_temperature):
  dense.check_qkv(q, k, v, "selective_attention")
  if query_temperature.shape != q.shape[:3]:
    raise ValueError(f"query_temperature must have shape [batch, q_len, q_heads] = {tuple(q.shape[:3])}, "
                     f"got {tuple(query_temperature.shape)}")
  if value_temperature is not None and value_temperature.shape != v.shape[:3]:
    raise ValueError(f"value_temperature must have shape [batch, kv_len, kv_heads] = {tuple(v.shape[:3])}, "
                     f"got {tuple(value_temperature.shape)}")


def selective_attention(q, k, v, query_temperature, *, value_temperature=None, mask=None, scale=None,
                        implementation=None, config=None):
  """Softmax attention with a per-query inverse temperature and an optional value temperature.

  ``o_i = sum_j softmax_j(tau_i * scale * q_i . k_j) * nu_j v_j``. The temperatures are folded
  into the inputs (``tau_i q_i`` and ``nu_j v_j``), so any backend of
  :func:`attn_jax.attention` runs it at the cost of plain attention, decoding included (``nu_j``
  is stored with the value in the cache).

  Args:
    q, k, v: ``[B, Tq, Hq, D]``, ``[B, Tk, Hkv, D]``, ``[B, Tk, Hkv, Dv]``.
    query_temperature: ``[B, Tq, Hq]`` inverse temperatures ``tau`` (e.g.
      :func:`selective_temperature`). Differentiable.
    value_temperature: ``[B, Tk, Hkv]`` or None. Differentiable.
    mask, scale, implementation, config: as in :func:`attn_jax.attention`.

  Returns:
    ``[B, Tq, Hq, Dv]`` in the dtype of ``q``.
  """
  query_temperature = jnp.asarray(query_temperature)
  _check(q, k, v, query_temperature, value_temperature)
  qt = (q.astype(jnp.float32) * query_temperature.astype(jnp.float32)[..., None]).astype(q.dtype)
  if value_temperature is not None:
    v = (v.astype(jnp.float32) * jnp.asarray(value_temperature, jnp.float32)[..., None]).astype(v.dtype)
  return softmax_api.attention(qt, k, v, mask=mask, scale=scale, implementation=implementation, config=config)


def selective_attention_reference(q, k, v, query_temperature, *, value_temperature=None, mask=None, scale=None):
  """The oracle of :func:`selective_attention`: the temperature multiplies the materialised logits."""
  query_temperature = jnp.asarray(query_temperature)
  _check(q, k, v, query_temperature, value_temperature)
  tau = jnp.asarray(query_temperature, jnp.float32).transpose(0, 2, 1)[..., None]   # [B, Hq, Tq, 1]
  vf = v.astype(jnp.float32)
  if value_temperature is not None:
    vf = vf * jnp.asarray(value_temperature, jnp.float32)[..., None]
  out = dense.attention(q, k, vf, mask=mask, scale=scale, logits_fn=lambda s: s * tau)
  return out.astype(q.dtype)
