"""Titans' neural memory (Behrouz et al., "Titans: Learning to Memorize at Test Time", 2024) with
the Miras options (Behrouz et al., "It's All Connected: A Journey Through Test-Time
Memorization, Attentional Bias, Retention, and Online Optimization", 2025).

The memory is a small MLP ``M`` per head whose weights are trained *while the sequence is read*:
token ``t`` takes a gradient step on an associative loss ``l(M; k_t, v_t)`` (Titans Sec. 3.1):

    S_t = eta_t S_{t-1} - theta_t grad l(M_{t-1}; k_t, v_t)      (momentum: past surprise)
    M_t = (1 - alpha_t) M_{t-1} + S_t                             (weight decay: forgetting)
    y_t = M_t(q_t)                                                (retrieval, no update)

with data-dependent step ``theta_t >= 0``, momentum ``eta_t`` and forgetting ``alpha_t`` in
``[0, 1]``. Miras names the pieces: the loss is the *attentional bias* (``l2`` in Titans;
``lp`` in Moneta, Huber in Yaad), the forgetting term is the *retention* (``l2`` weight decay in
Titans; an ``lq`` normalisation in Moneta, a KL / softmax constraint in Memora). All retentions
here share one linear accumulator ``A_t = (1 - alpha_t) A_{t-1} + S_t`` and differ in the map to
the weights, ``W_t = R(A_t)``: ``R = id`` (``l2``), ``R(A) = A / ||A||_q^(q-2)`` per weight
matrix (``lq``, Moneta), ``R(A) = softmax(A)`` over each output unit's inputs (``kl``, Memora:
its update ``softmax(a log W - eta grad)`` is this map up to per-row constants, which the
softmax ignores). ``q = 2`` of ``lq`` is ``l2``.

Chunked training (Titans Sec. 3.2): gradients inside a chunk of ``C`` tokens are taken at the
chunk's starting weights, so they are independent and computed in parallel; the momentum and
decay recurrences are linear, so every token's weights are a combination
``A_i = B_i A_0 + g_i S_0 - sum_{j <= i} C_ij u_j`` with lower-triangular coefficients built from
cumulative products (kept in log space). Two fast forms use this:

* ``"dual"`` (``l2`` retention only): each per-token gradient of a linear layer is an outer
  product ``x_j delta_j^T``, so the retrieval ``h W_i`` is ``B_i h A_0 + g_i h S_0 -
  ((h X^T) * C) Delta``: attention-like masked matmuls, never a per-token weight copy
  (the "dual form" of test-time training layers). Memory ``O(C^2 + params)`` per chunk.
* ``"materialized"`` (any retention): the per-token weights of a chunk are formed explicitly,
  ``O(C * params)`` memory, then mapped through ``R`` and applied.

The reference (``"reference"``) walks the tokens one at a time with ``jax.grad`` of the loss on
the actual weights. Chunk size 1 is Titans' exact sequential rule. Everything is differentiable
end to end (the initial weights are the outer model's parameters), with the chunk scan
storing one weight state per chunk for the backward pass.

The variants that compose the memory with attention (MAC, MAG, MAL) are in
:mod:`attn_jax.mechanisms.titans_blocks`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from attn_jax.mechanisms import dense

_OBJECTIVES = ("l2", "lp", "huber")
_RETENTIONS = ("l2", "lq", "kl")
_ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}
# Factors are floored before their log so that an exact 0 (full forgetting, no momentum) gives a
# finite log (differences of cumulative sums stay finite, gradients stay defined) and a product
# of 1e-30, which is 0 for every purpose here.
_TINY = 1e-30
_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class MemorySpec:
  """Static choices of a neural memory (hashable; validated on construction).

  Attributes:
    chunk_size: tokens whose gradients are taken at the same weights (Titans Sec. 3.2).
    objective: the attentional bias: ``"l2"`` (``||M(k) - v||^2``, Titans), ``"lp"``
      (``||M(k) - v||_p^p``, Moneta) or ``"huber"`` (elementwise Huber with threshold
      ``huber_delta``, Yaad; a data-dependent threshold can be passed per token instead).
    p: exponent of ``"lp"`` (``>= 1``; Moneta uses 3).
    huber_delta: threshold of ``"huber"``.
    retention: ``"l2"`` (Titans), ``"lq"`` (Moneta) or ``"kl"`` (Memora); see the module doc.
    q: exponent of ``"lq"`` (``>= 2``; Moneta uses 4).
    activation: between memory layers (``"silu"``, ``"gelu"``, ``"relu"``).
  """

  chunk_size: int = 16
  objective: str = "l2"
  p: float = 3.0
  huber_delta: float = 1.0
  retention: str = "l2"
  q: float = 4.0
  activation: str = "silu"

  def __post_init__(self):
    c = self.chunk_size
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
      raise ValueError(f"chunk_size must be a positive int, got {c!r}")
    if self.objective not in _OBJECTIVES:
      raise ValueError(f"objective must be one of {_OBJECTIVES}, got {self.objective!r}")
    if self.retention not in _RETENTIONS:
      raise ValueError(f"retention must be one of {_RETENTIONS}, got {self.retention!r}")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)}, got {self.activation!r}")
    if not self.p >= 1:
      raise ValueError(f"p must be >= 1, got {self.p}")
    if not self.q >= 2:
      raise ValueError(f"q must be >= 2, got {self.q}")
    if not self.huber_delta > 0:
      raise ValueError(f"huber_delta must be > 0, got {self.huber_delta}")


class MemoryState(NamedTuple):
  """Per-sequence memory state (all float32 but ``position``).

  Attributes:
    weights: the accumulator ``A`` per layer, ``[B, H, d_in, d_out]`` (the weights are ``R(A)``).
    momentum: the surprise ``S`` per layer, same shapes.
    chunk_weights: ``A`` at the start of the current chunk, where gradients are taken.
    position: int32 ``[]``, tokens already read in the current chunk (for
      :func:`neural_memory_step`).
  """

  weights: tuple
  momentum: tuple
  chunk_weights: tuple
  position: jax.Array


def init_memory(key, num_heads: int, key_dim: int, value_dim: int, hidden=(), scale: float = 1.0):
  """Initial memory weights: an MLP ``key_dim -> *hidden -> value_dim`` per head, no biases.

  Returns:
    A tuple of ``[num_heads, d_in, d_out]`` float32 arrays (LeCun-normal times ``scale``): the
    outer model's parameters, the memory's state before the first token.
  """
  dims = (key_dim,) + tuple(hidden) + (value_dim,)
  for name, x in (("num_heads", num_heads), ("key_dim", key_dim), ("value_dim", value_dim)) + tuple(
      (f"hidden[{i}]", h) for i, h in enumerate(hidden)):
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
      raise ValueError(f"{name} must be a positive int, got {x!r}")
  keys = jax.random.split(key, len(dims) - 1)
  return tuple(scale * jax.random.normal(kk, (num_heads, a, b), jnp.float32) / math.sqrt(a)
               for kk, a, b in zip(keys, dims[:-1], dims[1:]))


def init_state(params, batch: int) -> MemoryState:
  """The state before the first token: ``A = params`` for every sequence, ``S = 0``."""
  weights = tuple(jnp.broadcast_to(w.astype(jnp.float32)[None], (batch,) + w.shape) for w in params)
  return MemoryState(weights, tuple(jnp.zeros_like(w) for w in weights), weights, jnp.zeros((), jnp.int32))


def _retain(a, spec: MemorySpec):
  """``W = R(A)`` for one weight matrix ``[..., d_in, d_out]``."""
  if spec.retention == "l2":
    return a
  if spec.retention == "lq":
    norm = jnp.sum(jnp.abs(a) ** spec.q, axis=(-2, -1), keepdims=True) ** (1.0 / spec.q)
    return a / (norm + _NORM_EPS) ** (spec.q - 2.0)
  return jax.nn.softmax(a, axis=-2)


def _mlp(weights, x, spec: MemorySpec):
  act = _ACTIVATIONS[spec.activation]
  for i, w in enumerate(weights):
    x = jnp.matmul(x, w, precision=dense.HIGHEST)
    if i < len(weights) - 1:
      x = act(x)
  return x


def _loss(y, v, delta, spec: MemorySpec):
  r = y - v
  if spec.objective == "l2":
    return jnp.sum(r * r)
  if spec.objective == "lp":
    return jnp.sum(jnp.abs(r) ** spec.p)
  a = jnp.abs(r)
  return jnp.sum(jnp.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta)))


def _loss_grad(r, delta, spec: MemorySpec):
  """``d loss / d M(k)`` as a function of the residual ``r = M(k) - v``."""
  if spec.objective == "l2":
    return 2.0 * r
  if spec.objective == "lp":
    return spec.p * jnp.abs(r) ** (spec.p - 1.0) * jnp.sign(r)
  return jnp.clip(r, -delta, delta)


def _token_grads(weights, keys, values, deltas, spec: MemorySpec):
  """Per-token layer inputs ``X_l [C, d_in]`` and output gradients ``delta_l [C, d_out]`` of the
  loss at ``weights``: the factors of each token's gradient ``u_l = x_l^T delta_l``."""
  act = _ACTIVATIONS[spec.activation]
  inputs, pre = [], []
  h = keys
  for i, w in enumerate(weights):
    inputs.append(h)
    z = jnp.matmul(h, w, precision=dense.HIGHEST)
    pre.append(z)
    h = act(z) if i < len(weights) - 1 else z
  g = _loss_grad(h - values, deltas[:, None], spec)
  grads = [None] * len(weights)
  for i in range(len(weights) - 1, -1, -1):
    grads[i] = g
    if i:
      back = jnp.matmul(g, weights[i].T, precision=dense.HIGHEST)
      g = jax.vjp(act, pre[i - 1])[1](back)[0]
  return inputs, grads


def _coefficients(lr, momentum, decay, valid):
  """Chunk coefficients of ``A_i = B_i A_0 + g_i S_0 - sum_j C_ij u_j`` and of the chunk's end.

  With ``B_i = prod_{l <= i} (1 - alpha_l)`` and ``E_i = prod_{l <= i} eta_l``:
  ``C_ij = theta_j sum_{j <= l <= i} (B_i / B_l) nu_l (E_l / E_j)``,
  ``g_i = sum_{l <= i} (B_i / B_l) nu_l E_l``; the momentum at the end is
  ``E_c S_0 - sum_j (E_c / E_j) theta_j u_j``. ``nu_l`` is 1 for real tokens and 0 for the padding
  that completes the last chunk (padding must leave the state alone, and ``A += S`` would not).
  Ratios are exponentials of differences of cumulative log sums, masked to ``l <= i`` so every
  factor is in ``[0, 1]``.
  """
  c = lr.shape[0]
  log_b = jnp.cumsum(jnp.log(jnp.maximum(1.0 - decay, _TINY)))
  log_e = jnp.cumsum(jnp.log(jnp.maximum(momentum, _TINY)))
  tril = jnp.tril(jnp.ones((c, c), bool))
  d_b = jnp.where(tril, jnp.exp(jnp.where(tril, log_b[:, None] - log_b[None, :], 0.0)), 0.0)
  d_e = jnp.where(tril, jnp.exp(jnp.where(tril, log_e[:, None] - log_e[None, :], 0.0)), 0.0)
  d_b = d_b * valid[None, :]
  coef = jnp.matmul(d_b, d_e, precision=dense.HIGHEST) * lr[None, :]
  g = jnp.matmul(d_b, jnp.exp(log_e), precision=dense.HIGHEST)
  return jnp.exp(log_b), g, coef, d_e[-1] * lr, jnp.exp(log_e[-1])


def _chunk_dual(carry, xs, spec: MemorySpec):
  a, s = carry
  q, k, v, lr, mom, dec, delta, valid = xs
  inputs, grads = _token_grads(a, k, v, delta, spec)
  b, g, coef, end_mom, e_end = _coefficients(lr, mom, dec, valid)
  act = _ACTIVATIONS[spec.activation]
  h = q
  for i, (a_l, s_l, x_l, d_l) in enumerate(zip(a, s, inputs, grads)):
    scores = jnp.matmul(h, x_l.T, precision=dense.HIGHEST) * coef
    z = (b[:, None] * jnp.matmul(h, a_l, precision=dense.HIGHEST)
         + g[:, None] * jnp.matmul(h, s_l, precision=dense.HIGHEST)
         - jnp.matmul(scores, d_l, precision=dense.HIGHEST))
    h = act(z) if i < len(a) - 1 else z
  new_a = tuple(b[-1] * a_l + g[-1] * s_l - jnp.matmul(x_l.T * coef[-1][None, :], d_l, precision=dense.HIGHEST)
                for a_l, s_l, x_l, d_l in zip(a, s, inputs, grads))
  new_s = tuple(e_end * s_l - jnp.matmul(x_l.T * end_mom[None, :], d_l, precision=dense.HIGHEST)
                for s_l, x_l, d_l in zip(s, inputs, grads))
  return (new_a, new_s), (h, a)


def _chunk_materialized(carry, xs, spec: MemorySpec):
  a, s = carry
  q, k, v, lr, mom, dec, delta, valid = xs
  w0 = tuple(_retain(a_l, spec) for a_l in a)
  inputs, grads = _token_grads(w0, k, v, delta, spec)
  b, g, coef, end_mom, e_end = _coefficients(lr, mom, dec, valid)
  per_token = []
  for a_l, s_l, x_l, d_l in zip(a, s, inputs, grads):
    u = x_l[:, :, None] * d_l[:, None, :]                                            # [C, din, dout]
    per_token.append(b[:, None, None] * a_l + g[:, None, None] * s_l
                     - jnp.einsum("ij,jab->iab", coef, u, precision=dense.HIGHEST))
  w = tuple(_retain(a_i, spec) for a_i in per_token)
  y = jax.vmap(lambda ws, qi: _mlp(ws, qi, spec))(w, q)
  new_a = tuple(a_i[-1] for a_i in per_token)
  new_s = tuple(e_end * s_l - jnp.einsum("j,ja,jb->ab", end_mom, x_l, d_l, precision=dense.HIGHEST)
                for s_l, x_l, d_l in zip(s, inputs, grads))
  return (new_a, new_s), (y, a)


def _chunk_reference(carry, xs, spec: MemorySpec):
  a, s = carry
  w0 = tuple(_retain(a_l, spec) for a_l in a)

  def token(state, x):
    a, s = state
    q, k, v, lr, mom, dec, delta, valid = x
    u = jax.grad(lambda w: _loss(_mlp(w, k, spec), v, delta, spec))(w0)
    s = tuple(mom * s_l - lr * u_l for s_l, u_l in zip(s, u))
    a = tuple((1.0 - dec) * a_l + valid * s_l for a_l, s_l in zip(a, s))
    return (a, s), _mlp(tuple(_retain(a_l, spec) for a_l in a), q, spec)

  (a_new, s_new), y = lax.scan(token, (a, s), xs)
  return (a_new, s_new), (y, a)


_CHUNK_FNS = {"dual": _chunk_dual, "materialized": _chunk_materialized, "reference": _chunk_reference}


def _check_inputs(q, k, v, lr, momentum, decay, delta):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "ndim") or x.ndim != 4:
      raise ValueError(f"neural_memory: {name} must have shape [batch, seq, heads, dim], got {jnp.shape(x)}")
  if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"neural_memory: q and k must share shape [B, T, H, Dk] and v be [B, T, H, Dv], got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  for name, x in (("lr", lr), ("momentum", momentum), ("decay", decay), ("huber_delta", delta)):
    if x is not None and tuple(jnp.shape(x)) != tuple(q.shape[:3]):
      raise ValueError(f"neural_memory: {name} must have shape [batch, seq, heads] = {tuple(q.shape[:3])}, "
                       f"got {jnp.shape(x)}")


def _check_state(state, q, v, name):
  b, _, h, dk = q.shape
  if not isinstance(state, MemoryState):
    raise ValueError(f"{name} must be a MemoryState, got {type(state).__name__}")
  first, last = state.weights[0].shape, state.weights[-1].shape
  if first[:3] != (b, h, dk) or last[:2] != (b, h) or last[3] != v.shape[3]:
    raise ValueError(f"{name}: memory weights {[w.shape for w in state.weights]} do not map "
                     f"[B={b}, H={h}] keys of dim {dk} to values of dim {v.shape[3]}")


def neural_memory(q, k, v, lr, momentum, decay, params=None, *, spec: MemorySpec = MemorySpec(),
                  huber_delta=None, initial_state=None, return_state=False, implementation=None):
  """Reads a sequence into the Titans / Miras neural memory and retrieves ``y_t = M_t(q_t)``.

  Args:
    q, k: ``[B, T, H, Dk]`` retrieval queries and keys (Titans L2-normalises both; the caller
      does); v: ``[B, T, H, Dv]`` values to associate.
    lr, momentum, decay: ``[B, T, H]`` data-dependent ``theta_t >= 0``, ``eta_t`` and
      ``alpha_t`` in ``[0, 1]`` (differentiable).
    params: initial weights (:func:`init_memory`), shared by the batch; or ``initial_state``.
    spec: :class:`MemorySpec`.
    huber_delta: optional ``[B, T, H]`` per-token Huber thresholds (Yaad's data-dependent
      threshold) overriding ``spec.huber_delta``.
    initial_state: a :class:`MemoryState` to continue from. Chunks are counted from the first
      token of this call; :func:`neural_memory_step` continues a partial chunk.
    return_state: also return the final :class:`MemoryState`.
    implementation: ``"reference"`` (token by token, ``jax.grad``), ``"dual"`` (``l2``
      retention only), ``"materialized"``, or None (``"dual"`` when the retention allows it).

  Returns:
    ``y [B, T, H, Dv]`` in the dtype of ``q`` (computed in float32); with ``return_state`` also
    the state.
  """
  if not isinstance(spec, MemorySpec):
    raise ValueError(f"spec must be a MemorySpec, got {type(spec).__name__}")
  _check_inputs(q, k, v, lr, momentum, decay, huber_delta)
  if implementation is None:
    implementation = "dual" if spec.retention == "l2" else "materialized"
  if implementation not in _CHUNK_FNS:
    raise ValueError(f"implementation must be one of {tuple(_CHUNK_FNS)} or None, got {implementation!r}")
  if implementation == "dual" and spec.retention != "l2":
    raise ValueError(f"implementation='dual' needs retention='l2' (a linear weight map), got {spec.retention!r}")
  b, t, h, _ = q.shape
  if initial_state is None:
    if params is None:
      raise ValueError("neural_memory needs params (initial weights) or initial_state")
    initial_state = init_state(params, b)
  _check_state(initial_state, q, v, "initial_state")
  c = spec.chunk_size
  n = -(-t // c)
  pad = n * c - t

  def prep(x, fill=0.0):
    x = jnp.asarray(x, jnp.float32)
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
    # [B, T, H, ...] -> [B, H, n, C, ...]
    x = jnp.moveaxis(x, 2, 1)
    return x.reshape(x.shape[:2] + (n, c) + x.shape[3:])

  delta = jnp.full((b, t, h), spec.huber_delta, jnp.float32) if huber_delta is None else huber_delta
  # Padding tokens neither step (theta = 0) nor forget (alpha = 0), keep the momentum (eta = 1) and
  # do not add it to the weights (valid = 0).
  xs = (prep(q), prep(k), prep(v), prep(lr), prep(momentum, 1.0), prep(decay), prep(delta, 1.0),
        prep(jnp.ones((b, t, h), jnp.float32)))
  chunk = _CHUNK_FNS[implementation]

  def one_sequence(a, s, xs):
    (a, s), (y, starts) = lax.scan(lambda carry, x: chunk(carry, x, spec), (a, s), xs)
    return y.reshape((n * c,) + y.shape[2:]), a, s, tuple(st[-1] for st in starts)

  run = jax.vmap(jax.vmap(one_sequence))
  y, a, s, last_start = run(initial_state.weights, initial_state.momentum, xs)
  y = jnp.moveaxis(y[:, :, :t], 1, 2).astype(q.dtype)
  if not return_state:
    return y
  position = jnp.asarray(t % c, jnp.int32)
  # Mid-chunk, gradients continue at the last chunk's start; at a boundary the next step re-reads A.
  chunk_weights = a if t % c == 0 else last_start
  return y, MemoryState(a, s, chunk_weights, position)


def neural_memory_step(state: MemoryState, q, k, v, lr, momentum, decay, *, spec: MemorySpec = MemorySpec(),
                       huber_delta=None):
  """One decoding step of :func:`neural_memory`, continuing the chunk structure of the prefill.

  Args:
    state: :class:`MemoryState` (from ``neural_memory(..., return_state=True)`` or
      :func:`init_state`).
    q, k: ``[B, H, Dk]``; v: ``[B, H, Dv]``; lr, momentum, decay (and huber_delta): ``[B, H]``.

  Returns:
    ``(state, y [B, H, Dv])``; a prefill followed by steps equals one call on the whole sequence.
  """
  if not isinstance(spec, MemorySpec):
    raise ValueError(f"spec must be a MemorySpec, got {type(spec).__name__}")
  expand = lambda x: None if x is None else jnp.asarray(x)[:, None]  # noqa: E731
  _check_inputs(expand(q), expand(k), expand(v), expand(lr), expand(momentum), expand(decay), expand(huber_delta))
  _check_state(state, expand(q), expand(v), "state")
  delta = jnp.full(lr.shape, spec.huber_delta, jnp.float32) if huber_delta is None else huber_delta
  at_start = state.position == 0
  start = tuple(jnp.where(at_start, a, a0) for a, a0 in zip(state.weights, state.chunk_weights))

  def one(a, s, a0, q, k, v, lr, mom, dec, delta):
    w0 = tuple(_retain(x, spec) for x in a0)
    u = jax.grad(lambda w: _loss(_mlp(w, k, spec), v, delta, spec))(w0)
    s = tuple(mom * s_l - lr * u_l for s_l, u_l in zip(s, u))
    a = tuple((1.0 - dec) * a_l + s_l for a_l, s_l in zip(a, s))
    return a, s, _mlp(tuple(_retain(x, spec) for x in a), q, spec)

  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  a, s, y = jax.vmap(jax.vmap(one))(state.weights, state.momentum, start, f32(q), f32(k), f32(v), f32(lr),
                                    f32(momentum), f32(decay), f32(delta))
  position = (state.position + 1) % spec.chunk_size
  return MemoryState(a, s, start, position), y.astype(q.dtype)


def memory_readout(state: MemoryState, q, *, spec: MemorySpec = MemorySpec()):
  """``M*(q)``: retrieval from the memory's current weights without updating them.

  Args:
    state: :class:`MemoryState` with weights ``[B, H, ...]``.
    q: ``[B, T, H, Dk]``.

  Returns:
    ``[B, T, H, Dv]`` in the dtype of ``q``.
  """
  if q.ndim != 4 or q.shape[0] != state.weights[0].shape[0] or q.shape[2:] != state.weights[0].shape[1:3]:
    raise ValueError(f"memory_readout: q must be [B, T, H, Dk] matching the memory "
                     f"{state.weights[0].shape[:3]}, got {q.shape}")
  w = tuple(_retain(a, spec) for a in state.weights)
  y = jax.vmap(jax.vmap(lambda ws, x: _mlp(ws, x, spec), in_axes=(0, 1), out_axes=1))(w, q.astype(jnp.float32))
  return y.astype(q.dtype)
