"""MoH, Mixture-of-Head attention (Jin et al., "MoH: Multi-Head Attention as Mixture-of-Head
Attention", ICML 2025).

Multi-head attention is a sum over heads, ``sum_i H_i W_O^i``; MoH treats the heads as experts
and makes it a weighted sum ``sum_i g_i H_i W_O^i`` with per-token gates: ``h_s`` shared heads are
always on, and a router activates the top-``k`` of the remaining ``h - h_s`` heads per token
(Sec. 3.2). A load-balancing loss keeps the routed heads evenly used.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from attn_jax.mechanisms import dense
from attn_jax.softmax import api as softmax_api


class MoHGates(NamedTuple):
  """Result of :func:`moh_gates`.

  Attributes:
    gates: ``[B, T, H]`` float32 head weights, shared heads first; 0 for routed heads a token
      did not select.
    selected: ``[B, T, H - h_s]`` bool, the routed heads each token selected.
    load_balance_loss: scalar float32 auxiliary loss.
  """

  gates: jax.Array
  selected: jax.Array
  load_balance_loss: jax.Array


def moh_gates(routed_logits, top_k: int, *, shared_logits=None, mix_logits=None, valid=None) -> MoHGates:
  """MoH's two-stage routing (Sec. 3.2, Eq. 5-6).

  ``g_i = a_1 softmax(W_s x)_i`` for the shared heads, ``g_i = a_2 softmax(W_r x)_i`` for a
  routed head among the token's top-``k`` (0 otherwise), ``[a_1, a_2] = softmax(W_h x)``. With
  no shared heads the routed gates are used alone (``a_2 = 1``); with a single shared head its
  softmax is 1. As in the paper the routed softmax runs over all routed heads and is not
  renormalised over the selected ones (the SkyworkAI code renormalises and rescales by head
  counts; a learned output projection absorbs either choice).

  Load balancing (Eq. 6): ``L_b = sum_i f_i P_i`` over the routed heads, ``f_i`` the fraction
  of tokens that selected head ``i`` and ``P_i`` the mean router probability of head ``i``;
  perfectly balanced routing gives ``k / (h - h_s)``. Selection is not differentiable; the loss
  trains the router through ``P_i``.

  Args:
    routed_logits: ``[B, T, Hr]`` router logits ``W_r x``.
    top_k: routed heads per token, ``1 <= top_k <= Hr``.
    shared_logits: ``[B, T, Hs]`` logits ``W_s x`` of the shared heads, or None (no shared heads).
    mix_logits: ``[B, T, 2]`` logits ``W_h x`` weighing shared against routed heads; required
      with shared heads.
    valid: optional ``[B, T]`` bool; padding tokens do not count in the loss.

  Returns:
    :class:`MoHGates`.
  """
  routed_logits = jnp.asarray(routed_logits)
  if routed_logits.ndim != 3:
    raise ValueError(f"routed_logits must have shape [batch, seq, routed_heads], got {routed_logits.shape}")
  b, t, hr = routed_logits.shape
  if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= hr:
    raise ValueError(f"top_k must be an int in [1, {hr}] (the routed heads), got {top_k!r}")
  p_routed = jax.nn.softmax(routed_logits.astype(jnp.float32), axis=-1)
  _, idx = jax.lax.top_k(routed_logits, top_k)
  selected = jax.nn.one_hot(idx, hr, dtype=bool).any(axis=-2)
  routed = jnp.where(selected, p_routed, 0.0)
  if shared_logits is None:
    if mix_logits is not None:
      raise ValueError("mix_logits weighs shared against routed heads; it needs shared_logits")
    gates = routed
  else:
    shared_logits = jnp.asarray(shared_logits)
    if shared_logits.ndim != 3 or shared_logits.shape[:2] != (b, t):
      raise ValueError(f"shared_logits must have shape [batch, seq, shared_heads] = {(b, t)} + (Hs,), "
                       f"got {shared_logits.shape}")
    if mix_logits is None or tuple(jnp.shape(mix_logits)) != (b, t, 2):
      raise ValueError(f"mix_logits must have shape [batch, seq, 2] = {(b, t, 2)} with shared heads, "
                       f"got {None if mix_logits is None else jnp.shape(mix_logits)}")
    alpha = jax.nn.softmax(jnp.asarray(mix_logits, jnp.float32), axis=-1)
    shared = jax.nn.softmax(shared_logits.astype(jnp.float32), axis=-1)
    gates = jnp.concatenate([alpha[..., :1] * shared, alpha[..., 1:] * routed], axis=-1)
  if valid is None:
    weight = jnp.ones((b, t, 1), jnp.float32)
  else:
    valid = jnp.asarray(valid)
    if valid.shape != (b, t):
      raise ValueError(f"valid must have shape [batch, seq] = {(b, t)}, got {valid.shape}")
    weight = valid.astype(jnp.float32)[..., None]
  count = jnp.maximum(weight.sum(), 1.0)
  f = (selected * weight).sum((0, 1)) / count
  p = (p_routed * weight).sum((0, 1)) / count
  return MoHGates(gates, selected, jnp.sum(f * p))


def _check(q, k, v, gates):
  dense.check_qkv(q, k, v, "moh_attention")
  if tuple(jnp.shape(gates)) != tuple(q.shape[:3]):
    raise ValueError(f"gates must have shape [batch, q_len, q_heads] = {tuple(q.shape[:3])}, got {jnp.shape(gates)}")


def moh_attention(q, k, v, gates, *, mask=None, scale=None, implementation=None, config=None):
  """Per-head attention outputs weighted by the MoH gates, ``g_{t,i} H_i(t)``.

  The summation form keeps one output projection: ``reshape(out, [B, T, H * Dv]) @ W_O`` of the
  result is MoH's ``sum_i g_i H_i W_O^i``. Every head is computed by the chosen backend of
  :func:`attn_jax.attention` and weighted afterwards (as in the paper's implementation); a head
  no token selected contributes nothing and receives no gradient through the gate.

  Args:
    q, k, v: ``[B, Tq, Hq, D]``, ``[B, Tk, Hkv, D]``, ``[B, Tk, Hkv, Dv]``.
    gates: ``[B, Tq, Hq]`` (``moh_gates(...).gates``).
    mask, scale, implementation, config: as in :func:`attn_jax.attention`.

  Returns:
    ``[B, Tq, Hq, Dv]`` in the dtype of ``q``.
  """
  _check(q, k, v, gates)
  out = softmax_api.attention(q, k, v, mask=mask, scale=scale, implementation=implementation, config=config)
  return (out.astype(jnp.float32) * jnp.asarray(gates, jnp.float32)[..., None]).astype(q.dtype)


def moh_attention_reference(q, k, v, gates, *, mask=None, scale=None):
  """The oracle of :func:`moh_attention`: the gates weigh each head's materialised output."""
  _check(q, k, v, gates)
  out = dense.attention(q, k, v, mask=mask, scale=scale)
  return jnp.einsum("bthd,bth->bthd", out, jnp.asarray(gates, jnp.float32),
                    precision=dense.HIGHEST).astype(q.dtype)
