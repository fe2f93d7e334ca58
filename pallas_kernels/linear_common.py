"""Per-chunk math of the chunked linear-attention kernels, shared by the TPU and GPU kernels.

One chunk holds ``C`` tokens. The caller gives every per-token vector in two orientations when
needed: ``*_col`` of shape ``[C, 1]`` (one value per row) and ``*_row`` of shape ``[1, C]``. The
factors (computed outside the kernels, in float32) are:

* ``b``: cumulative log decay from the chunk start (``b_i - b_j <= 0`` for ``i >= j``);
* ``qf = exp(b_i) * [token i continues the run open before the chunk]``;
* ``kf = exp(b_last - b_i) * [token i belongs to the run open at the chunk end]``;
* ``r``: run index (segment resets); tokens interact inside a chunk only with equal ``r``.

The carry of the state across the chunk, ``exp(b_last) * [no reset inside the chunk]``, equals
``qf`` of the last token. Matmul operands are in the input dtype, accumulations in float32, and
the state stays float32 between chunks (cast to the input dtype only as a matmul operand, as
flash-linear-attention does).

Forward (Lightning Attention-2's split)::

    intra:  o  = ((q k^T) * D) v               D_ij = exp(b_i - b_j) [i >= j, r_i = r_j]
    inter:  o += (q * qf) S
    state:  S  = carry * S + (k * kf)^T v

Backward, with ``dS`` the gradient of the state after the chunk (swept from the last chunk)::

    dq  = ((dO v^T) * D) k + (dO S^T) * qf
    dk  = ((dO v^T) * D)^T q + (v dS^T) * kf
    dv  = ((q k^T) * D)^T dO + (k * kf) dS
    dS <- carry * dS + (q * qf)^T dO
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def dot(a, b, dims, dtype=None):
  """Matmul with float32 accumulation; operands cast to ``dtype`` when given."""
  if dtype is not None:
    a, b = a.astype(dtype), b.astype(dtype)
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def decay_matrix(causal, b_col=None, b_row=None, r_col=None, r_row=None):
  """``D [C, C]`` float32: causal, same run, ``exp(b_i - b_j)``.

  The exponent is masked before ``exp`` (double where), since for ``i < j`` it is positive and
  may overflow.
  """
  mask = causal
  if r_col is not None:
    mask = mask & (r_col == r_row)
  if b_col is None:
    return mask.astype(jnp.float32)
  diff = jnp.where(mask, b_col - b_row, 0.0)
  return jnp.where(mask, jnp.exp(diff), 0.0)


def carry_of(qf_col, row_index):
  """``[1, 1]`` carry of the state across the chunk: ``qf`` of its last token.

  ``row_index`` is the ``[C, 1]`` int32 row index; a masked sum extracts the last row (a
  reduction, which both Mosaic and Triton lower, unlike a dynamic element read).
  """
  last = row_index == row_index.shape[0] - 1
  return jnp.sum(jnp.where(last, qf_col, 0.0), axis=0, keepdims=True)


def scale_rows(x, f_col):
  """``x * f`` row-wise in float32 (``f_col`` None means 1)."""
  x = x.astype(jnp.float32)
  return x if f_col is None else x * f_col


def forward_chunk(q, k, v, d, qf_col, kf_col, carry, state):
  """One chunk of the forward pass; returns ``(o [C, V] float32, new state [K, V] float32)``."""
  dt = q.dtype
  scores = dot(q, k, NT) * d
  o = dot(scores, v, NN, dt)
  o = o + dot(scale_rows(q, qf_col), state, NN, dt)
  new_state = dot(scale_rows(k, kf_col), v, TN, dt)
  state = state if carry is None else carry * state
  return o, state + new_state


def dq_chunk(do, k, v, d, qf_col, state):
  """``dq [C, K]`` float32 of one chunk, given the state before it."""
  dt = k.dtype
  ds = dot(do, v, NT, dt) * d
  dq = dot(ds, k, NN, dt)
  return dq + scale_rows(dot(do, state, NT, dt), qf_col)


def dkv_chunk(q, k, v, do, d, kf_col, dstate):
  """``(dk [C, K], dv [C, V])`` float32 of one chunk, given the state gradient after it."""
  dt = q.dtype
  scores = dot(q, k, NT) * d
  dv = dot(scores, do, TN, dt) + dot(scale_rows(k, kf_col), dstate, NN, dt)
  ds = dot(do, v, NT, dt) * d
  dk = dot(ds, q, TN, dt) + scale_rows(dot(v, dstate, NT, dt), kf_col)
  return dk, dv


def dstate_chunk(q, do, qf_col, carry, dstate):
  """Gradient of the state before the chunk from the one after it."""
  dstate = dstate if carry is None else carry * dstate
  return dstate + dot(scale_rows(q, qf_col), do, TN, q.dtype)
