"""Local Linear Attention (Zuo et al., "Local Linear Attention: An Optimal Interpolation of Linear
and Softmax Attention For Test-Time Regression", 2025).

In the test-time-regression view, softmax attention is the Nadaraya-Watson (local constant)
estimate of ``v = f(k)`` at the query. LLA (Sec. 3) fits a local *linear* model instead: for
query ``q_i`` with kernel weights ``w_ij = exp(scale * q_i . k_j)`` over its visible keys,

    min_{b, W}  1/2 sum_j w_ij ||v_j - b - W (k_j - q_i)||^2 + lam ||W||_F^2

and outputs the intercept ``b``. Solving with the weighted moments (``Z = sum_j w_ij``,
``p_ij = w_ij / Z`` the softmax probabilities, ``k_bar``, ``v_bar`` their means, ``C_kk``,
``C_kv`` the weighted covariances):

    o_i = v_bar - C_kv^T (C_kk + (2 lam / Z) I)^{-1} (k_bar - q_i).

The first term is softmax attention; the second is a linear correction that vanishes for a
large ridge (softmax attention again), while with uniform weights the fit is a global ridge
regression, the view in which linear attention and its delta-rule relatives are regressors: LLA
interpolates between them. The ridge is the paper's: it acts on the unnormalised weights, so it
is ``2 lam / Z`` relative to the probabilities, with ``Z = exp(lse)``.

Fast form (the paper's FlashLLA computes the same moments block by block): every moment is a
softmax-weighted average, i.e. attention with the values ``[k, v, k k^T, k v^T]``; one call to
:func:`attn_jax.attention` (any backend, any mask, blockwise with ``O(T)`` memory) returns them
with the LSE, and a ``D x D`` solve per query finishes the job. Memory ``O(T (D^2 + D Dv))``, never
``O(T^2)``; cost ``O(T^2 (D^2 + D Dv))``, which is why LLA is for small head dims.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attn_jax.mechanisms import dense
from attn_jax.softmax import api as softmax_api


def _check(q, k, v, ridge):
  dense.check_qkv(q, k, v, "local_linear_attention")
  if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0:
    raise ValueError(f"ridge must be a positive float (the paper's lambda), got {ridge!r}")


def _solve(cov_kk, rhs, rho):
  """``(C + rho I)^{-1} rhs`` for symmetric positive definite ``C + rho I`` (Cholesky)."""
  d = cov_kk.shape[-1]
  a = cov_kk + rho[..., None, None] * jnp.eye(d, dtype=cov_kk.dtype)
  chol = jnp.linalg.cholesky(a)
  return jax.scipy.linalg.cho_solve((chol, True), rhs[..., None])[..., 0]


def local_linear_attention(q, k, v, *, ridge: float = 1.0, mask=None, scale=None, implementation=None,
                           config=None):
  """Local Linear Attention through moments from one softmax-attention call.

  Args:
    q, k, v: ``[B, Tq, Hq, D]``, ``[B, Tk, Hkv, D]``, ``[B, Tk, Hkv, Dv]``.
    ridge: the paper's ``lambda > 0`` (also what keeps the first tokens' fits well posed).
    mask: an attn_jax mask (``masks.causal()`` for language models) or None.
    scale: kernel bandwidth, ``w_ij = exp(scale * q_i . k_j)``; default ``D ** -0.5``.
    implementation, config: backend of :func:`attn_jax.attention` for the moments.

  Returns:
    ``[B, Tq, Hq, Dv]`` in the dtype of ``q``; a row that sees no key is 0. The moments and the
    solve run in float32 whatever the input dtype (the covariance is a difference of moments).
  """
  _check(q, k, v, ridge)
  b, tq, hq, d = q.shape
  tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
  kk = jnp.einsum("bthd,bthe->bthde", kf, kf, precision=dense.HIGHEST).reshape(b, tk, hkv, d * d)
  kv = jnp.einsum("bthd,bthe->bthde", kf, vf, precision=dense.HIGHEST).reshape(b, tk, hkv, d * dv)
  values = jnp.concatenate([kf, vf, kk, kv], axis=-1)
  moments, lse = softmax_api.attention(q.astype(jnp.float32), kf, values, mask=mask, scale=scale,
                                       implementation=implementation, config=config, return_lse=True)
  k_bar, v_bar = moments[..., :d], moments[..., d:d + dv]
  e_kk = moments[..., d + dv:d + dv + d * d].reshape(b, tq, hq, d, d)
  e_kv = moments[..., d + dv + d * d:].reshape(b, tq, hq, d, dv)
  cov_kk = e_kk - k_bar[..., :, None] * k_bar[..., None, :]
  cov_kv = e_kv - k_bar[..., :, None] * v_bar[..., None, :]
  seen = jnp.isfinite(lse)
  rho = jnp.where(seen, 2.0 * ridge * jnp.exp(-jnp.where(seen, lse, 0.0)), 1.0)
  y = _solve(cov_kk, k_bar - q.astype(jnp.float32), rho)
  out = v_bar - jnp.einsum("bqhde,bqhd->bqhe", cov_kv, y, precision=dense.HIGHEST)
  return jnp.where(seen[..., None], out, 0.0).astype(q.dtype)


def local_linear_attention_reference(q, k, v, *, ridge: float = 1.0, mask=None, scale=None):
  """The oracle: per query, the weighted ridge regression solved from its normal equations.

  ``theta = (X^T diag(w) X + diag(0, 2 lam I))^{-1} X^T diag(w) V`` with design rows
  ``x_j = [1, k_j - q_i]``; the output is the intercept ``theta[0]``. Weights are stabilised as
  ``w = exp(l - m)`` with the ridge rescaled by ``exp(-m)``, which leaves the solution unchanged.
  ``O(B H Tq Tk D)`` memory.
  """
  _check(q, k, v, ridge)
  b, tq, hq, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  qf = q.astype(jnp.float32)
  kf = jnp.repeat(k.astype(jnp.float32), hq // hkv, axis=2)
  vf = jnp.repeat(v.astype(jnp.float32), hq // hkv, axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=dense.HIGHEST) * scale
  vis = dense.visibility(mask, tq, tk, hq)[None]
  masked = jnp.where(vis, logits, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(masked, -1, keepdims=True))
  seen = jnp.isfinite(m)
  m = jnp.where(seen, m, 0.0)
  w = jnp.where(vis, jnp.exp(masked - m), 0.0)                                      # [B, H, Tq, Tk]
  x = jnp.concatenate([jnp.ones((b, hq, tq, tk, 1)),
                       kf.transpose(0, 2, 1, 3)[:, :, None] - qf.transpose(0, 2, 1, 3)[:, :, :, None]], -1)
  xw = x * w[..., None]
  gram = jnp.einsum("bhqkd,bhqke->bhqde", xw, x, precision=dense.HIGHEST)
  reg = jnp.concatenate([jnp.zeros(1), jnp.ones(d)]) * 2.0 * ridge
  gram = gram + jnp.exp(-m)[..., None] * jnp.diag(reg)
  gram = jnp.where(seen[..., None], gram, jnp.eye(d + 1))
  rhs = jnp.einsum("bhqkd,bkhe->bhqde", xw, vf, precision=dense.HIGHEST)
  theta = jnp.linalg.solve(gram, rhs)
  out = jnp.where(seen, theta[..., 0, :], 0.0)                                       # [B, H, Tq, Dv]
  return out.transpose(0, 2, 1, 3).astype(q.dtype)
