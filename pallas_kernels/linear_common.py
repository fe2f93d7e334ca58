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

Per-channel decays (GLA gates): ``b``, ``qf`` and ``kf`` are ``[C, K]`` (one value per key
channel) and the carry is a ``[K, 1]`` column, which scales the rows of ``S``; the inter-chunk
terms above keep their form with element-wise factors. The intra-chunk scores
``A_ij = sum_f q_if k_jf exp(b_if - b_jf)`` no longer factor into ``(q k^T) * D``, and
``q exp(b)``, ``k exp(-b)`` overflow once a chunk decays by more than ~88 in log space. As in
flash-linear-attention's GLA, the chunk is split into sub-chunks of ``c`` tokens and processed
as blocks of ``c`` rows against the whole chunk (:func:`channel_block`):

* rows = queries of sub-chunk ``I`` (forward, dQ): the keys of earlier sub-chunks are reached
  through the reference ``p = b`` at the first row of ``I``, ``A = (q exp(b_I - p)) (k exp(p -
  b))^T`` (both factors <= 1; the keys' factor is masked to ``j < start(I)`` before ``exp``);
* rows = keys of sub-chunk ``J`` (dK, dV, with ``A^T``): the queries of later sub-chunks through
  the reference ``p = b`` at the last row of ``J``, ``A^T = (k exp(p - b_J)) (q exp(b - p))^T``;
* the ``c x c`` diagonal block element-wise, one column per step of a loop over the ``c``
  tokens of the block, with the exponent masked before ``exp``.

With ``G = (dO v^T)`` masked (or ``(v dO^T)`` for key rows), the same factors give
``dq = G_off (k exp(p - b)) * exp(b_I - p) + diag`` and ``dk`` symmetrically, so the backward
pass needs no other scheme::

    dq  = [sum_j G_ij k_j exp(b_i - b_j)] + (dO S^T) * qf
    dk  = [sum_i G_ij q_i exp(b_i - b_j)] + (v dS^T) * kf
    dv  = A^T dO + (k * kf) dS
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


# Per-channel decays (GLA gates): row blocks of the intra-chunk scores by sub-chunks. Index
# vectors ([n, 1] or [1, n] int32) are broadcast to the full shape before a comparison, so that
# no boolean vector is ever broadcast (Mosaic lowers integer broadcasts more readily).


def _full(idx, shape):
  return jnp.broadcast_to(idx, shape)


def masked_exp(keep, x):
  """``exp(x)`` where ``keep``, else 0; ``x`` is masked before ``exp`` (it may be large there)."""
  return jnp.where(keep, jnp.exp(jnp.where(keep, x, 0.0)), 0.0)


def pick_row(x, j, rows):
  """Row ``j`` of ``x [c, X]`` as ``[1, X]``, by a masked sum over rows (``rows``: ``[c, 1]``
  row index); works for a static or traced ``j`` on both Mosaic and Triton."""
  return jnp.sum(jnp.where(_full(rows, x.shape) == j, x, 0.0), axis=0, keepdims=True)


def pick_col(x, j, cols):
  """Column ``j`` of ``x [c, X]`` as ``[c, 1]`` (``cols``: ``[1, X]`` column index)."""
  return jnp.sum(jnp.where(_full(cols, x.shape) == j, x, 0.0), axis=1, keepdims=True)


def block_mask(start, rows, cols, queries, r_blk=None, r_row=None):
  """``[c, C]`` mask of a row block at chunk offset ``start``: causal and same run.

  ``rows`` ``[c, 1]`` and ``cols`` ``[1, C]`` are index vectors; ``queries`` says whether the
  rows are queries (keys ``j <= i`` allowed) or keys (queries ``i >= j`` allowed). ``r_blk``
  ``[c, 1]`` and ``r_row`` ``[1, C]`` are the run indices of the block's rows and of the chunk.
  """
  shape = (rows.shape[0], cols.shape[1])
  rows, cols = _full(rows + start, shape), _full(cols, shape)
  mask = (rows >= cols) if queries else (cols >= rows)
  if r_blk is not None:
    mask = mask & (_full(r_blk, shape) == _full(r_row, shape))
  return mask


def channel_block(x, y, b_blk, y_all, b_all, *, start, queries, mask, rows, rows_all, cols, dtype,
                  grad=None, scores=True):
  """Intra-chunk scores and gradient of one block of ``c`` rows, per-channel decay.

  Args:
    x: ``[c, K]`` the block's own rows (queries of sub-chunk ``I`` when ``queries``, else keys of
      sub-chunk ``J``); y: ``[c, K]`` the other side's rows in the same sub-chunk (keys of ``I``,
      queries of ``J``); b_blk: ``[c, K]`` float32 cumulative log decay of those rows.
    y_all: ``[C, K]`` the other side over the whole chunk; b_all: ``[C, K]`` float32.
    start: static offset of the block in the chunk; mask: ``[c, C]`` (see :func:`block_mask`).
    rows, rows_all, cols: int32 index vectors ``[c, 1]``, ``[C, 1]``, ``[1, C]``.
    dtype: matmul operand dtype.
    grad: ``[c, C]`` float32 masked score gradient of the block (``G = dO v^T`` for query rows,
      ``v dO^T`` for key rows), or None.
    scores: whether to return the block's scores.

  Returns:
    ``(scores [c, C] float32 masked or None, d [c, K] float32 or None)`` where ``scores`` are
    ``A[I, :]`` (query rows) or ``A[:, J]^T`` (key rows), and ``d = sum_m G_m y_m exp(+-(b - b_m))``
    is the intra-chunk part of ``dq`` (query rows) or ``dk`` (key rows).
  """
  c, chunk = y.shape[0], y_all.shape[0]
  x = None if x is None else x.astype(jnp.float32)  # Not needed for the gradient alone.
  y = y.astype(jnp.float32)
  out_s = out_d = None
  # Off-diagonal sub-chunks through the reference row p, both factors <= 1.
  if queries:
    has_off = start > 0
    if has_off:
      p = pick_row(b_blk, 0, rows)
      x_fac = jnp.exp(b_blk - p)
      y_dec = y_all.astype(jnp.float32) * masked_exp(_full(rows_all, b_all.shape) < start, p - b_all)
  else:
    has_off = start + c < chunk
    if has_off:
      p = pick_row(b_blk, c - 1, rows)
      x_fac = jnp.exp(p - b_blk)
      y_dec = y_all.astype(jnp.float32) * masked_exp(_full(rows_all, b_all.shape) >= start + c, b_all - p)
  if has_off:
    if scores:
      out_s = dot(x * x_fac, y_dec, NT, dtype)
    if grad is not None:
      out_d = dot(grad, y_dec, NN, dtype) * x_fac
  if out_s is None and scores:
    out_s = jnp.zeros((c, chunk), jnp.float32)
  if out_d is None and grad is not None:
    out_d = jnp.zeros(y.shape, jnp.float32)

  # The diagonal sub-chunk, one column (a token m of the block) per step.
  def body(m, carry):
    acc_s, acc_d = carry
    y_m, b_m = pick_row(y, m, rows), pick_row(b_blk, m, rows)
    if queries:
      e = masked_exp(_full(rows, b_blk.shape) >= m, b_blk - b_m)  # exp(b_i - b_m), i >= m
    else:
      e = masked_exp(_full(rows, b_blk.shape) <= m, b_m - b_blk)  # exp(b_m - b_j), j <= m
    ye = y_m * e
    if acc_s is not None:
      col = jnp.sum(x * ye, axis=1, keepdims=True)
      acc_s = acc_s + jnp.where(_full(cols, acc_s.shape) == start + m, col, 0.0)
    if acc_d is not None:
      acc_d = acc_d + pick_col(grad, start + m, cols) * ye
    return acc_s, acc_d

  out_s, out_d = lax.fori_loop(0, c, body, (out_s, out_d))
  if out_s is not None:
    out_s = jnp.where(mask, out_s, 0.0)
  return out_s, out_d
