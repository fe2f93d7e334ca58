"""Chunked linear attention in pure JAX: quadratic inside a chunk, a scan over chunk states.

The sequence is cut into chunks of ``C`` tokens. With ``b_i`` the cumulative log decay inside a
chunk (``b_i = sum_{s <= i} log a_s``, counted from the chunk start), the output of token ``i``
is

    o_i = sum_{j <= i in chunk} (q_i . k_j) exp(b_i - b_j) v_j  +  (q_i * exp(b_i))^T S_in

and the state after the chunk is ``S_out = exp(b_last) * S_in + sum_j (k_j * exp(b_last - b_j)) v_j^T``.
Every exponent is a difference ``b_i - b_j`` with ``i >= j`` (or ``b_i`` itself), hence <= 0: no
factor can overflow, whatever the decay, because the decays stay in log space and only
chunk-local cumulative sums are formed. The intra-chunk part of all chunks runs in parallel; the
inter-chunk part is one ``lax.scan`` over the ``T / C`` chunk states, kept in float32.

Per-channel decays (GLA gates) cannot be folded into a ``C x C`` decay matrix. Their scores
``sum_d q_id k_jd exp(b_id - b_jd)`` are formed on sub-chunks of ``c`` tokens: between
sub-chunks through a reference point at the start of the later sub-chunk (both factors <= 1),
inside a sub-chunk element-wise.

Segment ids restart the recurrence: tokens only interact inside the same run (see
:func:`attn_jax.linear.common.reset_index`), the state enters a chunk only for the tokens of the
run that was open before the chunk, and leaves it only from the tokens of the run that is open at
its end.

Gradients come from JAX autodiff. Every saved intermediate is O(T) (chunk-local scores are
recomputed in the backward pass through ``jax.checkpoint``; the scan saves one state per chunk),
so forward + backward memory grows linearly with the sequence (tested in
``tests/linear/test_memory.py``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from attn_jax import dispatch
from attn_jax.linear import common

DEFAULT_CHUNK = 64
DEFAULT_SUB_CHUNK = 16
# Tokens per lax.map step of the per-channel intra-chunk scores (see _intra).
_CHANNEL_GROUP_TOKENS = 1024
_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class XlaConfig:
  """Tunables of the linear-attention xla backend.

  Attributes:
    chunk_size: tokens per chunk (``None``: 64, or the sequence rounded up to 8 when shorter).
      Memory grows with ``T * C``; the state scan has ``T / C`` steps. A ``chunk_size=`` given
      to :func:`attn_jax.linear_attention` takes precedence.
    sub_chunk: sub-chunk length for per-channel decays; the largest divisor of the chunk size
      not above it is used.
  """

  chunk_size: int | None = None
  sub_chunk: int = DEFAULT_SUB_CHUNK

  backend: ClassVar[str] = "xla"

  def __post_init__(self):
    for name in ("chunk_size", "sub_chunk"):
      value = getattr(self, name)
      if value is None and name == "chunk_size":
        continue
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"XlaConfig.{name} must be a positive int{' or None' if name == 'chunk_size' else ''}, got {value!r}")


def chunk_length(spec: common.Spec, configured: int | None) -> int:
  requested = spec.chunk_size or configured
  if requested is not None:
    return requested
  return min(DEFAULT_CHUNK, common.round_up(spec.seq_len, 8))


def _sub_chunk(chunk: int, requested: int) -> int:
  return max(d for d in range(1, min(chunk, requested) + 1) if chunk % d == 0)


def linear_attention(q, k, v, log_decay, initial_state, segment_ids, *, spec: common.Spec, config=None):
  """xla backend: same contract as :func:`attn_jax.linear.reference.linear_attention`."""
  config = config or XlaConfig()
  if not isinstance(config, XlaConfig):
    raise ValueError(f"config must be a LinearXlaConfig for implementation='xla', got {type(config).__name__}")
  chunk = chunk_length(spec, config.chunk_size)
  dispatch.note("chunk", chunk)
  return chunked(q, k, v, log_decay, initial_state, segment_ids, spec=spec, chunk=chunk,
                 sub_chunk=_sub_chunk(chunk, config.sub_chunk))


@dataclasses.dataclass(frozen=True)
class ChunkFactors:
  """Decay and segment factors of every chunk, float32, in the ``[B, Hs, N, C(, K)]`` layout.

  Attributes:
    local: cumulative log decay from the chunk start ``b_i`` (None without decay).
    q_factor: ``exp(b_i)`` times "token i belongs to the run open before the chunk".
    k_factor: ``exp(b_last - b_i)`` times "token i belongs to the run open at the chunk end".
    carry: ``exp(b_last)`` times "no run starts inside the chunk": how ``S_in`` enters ``S_out``.
    intra_mask: ``[B or 1, 1, N, C, C]`` bool, causal and same run.
  """

  local: jax.Array | None
  q_factor: jax.Array
  k_factor: jax.Array
  carry: jax.Array
  intra_mask: jax.Array


def chunk_factors(log_decay, segment_ids, *, spec: common.Spec, batch: int, chunk: int) -> ChunkFactors:
  """Computes :class:`ChunkFactors` from the padded-on-the-fly log decay and segment ids."""
  t, hs = spec.seq_len, spec.num_state_heads
  tp = common.round_up(t, chunk)
  n = tp // chunk
  causal = jnp.tril(jnp.ones((chunk, chunk), bool))
  if segment_ids is None:
    ones = jnp.ones((1, 1, n, chunk), jnp.float32)
    q_keep = k_keep = ones
    carry_keep = jnp.ones((1, 1, n), jnp.float32)
    intra_mask = causal[None, None, None]
  else:
    # Padded tokens extend the last run, so they never restart the state.
    r = common.pad_axis(common.reset_index(segment_ids), 1, tp, mode="edge").reshape(batch, n, chunk)
    r_last = r[:, :, -1]
    r_prev = jnp.concatenate([jnp.zeros_like(r_last[:, :1]), r_last[:, :-1]], axis=1)
    q_keep = (r == r_prev[:, :, None]).astype(jnp.float32)[:, None]
    k_keep = (r == r_last[:, :, None]).astype(jnp.float32)[:, None]
    carry_keep = (r_last == r_prev).astype(jnp.float32)[:, None]
    intra_mask = (causal & (r[:, :, :, None] == r[:, :, None, :]))[:, None]

  if spec.decay == common.NONE:
    return ChunkFactors(None, q_keep, k_keep, carry_keep, intra_mask)

  g = common.pad_axis(log_decay.astype(jnp.float32), 1, tp)
  if spec.decay == common.SCALAR:
    g = g.reshape(batch, n, chunk, hs).transpose(0, 3, 1, 2)  # [B, Hs, N, C]
    local = jnp.cumsum(g, axis=3)
    last = local[..., -1:]
    return ChunkFactors(local, jnp.exp(local) * q_keep, jnp.exp(last - local) * k_keep,
                        jnp.exp(last[..., 0]) * carry_keep, intra_mask)
  g = g.reshape(batch, n, chunk, hs, spec.key_dim).transpose(0, 3, 1, 2, 4)  # [B, Hs, N, C, K]
  local = jnp.cumsum(g, axis=3)
  last = local[..., -1:, :]
  return ChunkFactors(local, jnp.exp(local) * q_keep[..., None], jnp.exp(last - local) * k_keep[..., None],
                      jnp.exp(last[..., 0, :]) * carry_keep[..., None], intra_mask)


def chunked(q, k, v, log_decay, initial_state, segment_ids, *, spec: common.Spec, chunk: int,
            sub_chunk: int = DEFAULT_SUB_CHUNK):
  """The chunked algorithm; returns ``(o [B, T, Hq, V] in spec.out_dtype, final state float32)``."""
  b, t, hq, kd = q.shape
  hs, g, vd = spec.num_state_heads, spec.group_size, spec.value_dim
  tp = common.round_up(t, chunk)
  n = tp // chunk
  # Internal layouts: queries [B, Hs, N, G, C, K], keys and values [B, Hs, N, C, X]. The leading
  # axes are the batch axes of every contraction (XLA:CPU has no bf16 x bf16 -> f32 dot for
  # batch axes that are not leading).
  qi = common.pad_axis(q, 1, tp).reshape(b, n, chunk, hs, g, kd).transpose(0, 3, 1, 4, 2, 5)
  ki = common.pad_axis(k, 1, tp).reshape(b, n, chunk, hs, kd).transpose(0, 3, 1, 2, 4)
  vi = common.pad_axis(v, 1, tp).reshape(b, n, chunk, hs, vd).transpose(0, 3, 1, 2, 4)
  f = chunk_factors(log_decay, segment_ids, spec=spec, batch=b, chunk=chunk)

  o_intra = _intra(qi, ki, vi, f.local, f.intra_mask, spec.decay, sub_chunk)

  channel = spec.decay == common.CHANNEL
  k_factor = f.k_factor if channel else f.k_factor[..., None]
  k_dec = ki.astype(jnp.float32) * k_factor
  delta = jnp.einsum("bhnck,bhncv->bhnkv", k_dec, vi.astype(jnp.float32), precision=_HI)
  carry = jnp.broadcast_to(f.carry[..., None] if channel else f.carry[..., None, None],
                           (b, hs, n) + ((kd, 1) if channel else (1, 1)))
  s0 = (jnp.zeros((b, hs, kd, vd), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))

  def step(s, xs):
    carry_n, delta_n = xs
    return carry_n * s + delta_n, s

  final, s_in = lax.scan(step, s0, (jnp.moveaxis(carry, 2, 0), jnp.moveaxis(delta, 2, 0)))
  s_in = jnp.moveaxis(s_in, 0, 2)  # [B, Hs, N, K, V]: the state before each chunk.

  q_factor = f.q_factor if channel else f.q_factor[..., None]
  q_dec = qi.astype(jnp.float32) * q_factor[:, :, :, None]
  o_inter = jnp.einsum("bhngck,bhnkv->bhngcv", q_dec, s_in, precision=_HI)
  o = o_intra + o_inter
  o = o.transpose(0, 2, 4, 1, 3, 5).reshape(b, tp, hq, vd)[:, :t]
  return o.astype(spec.out_dtype), final


def _intra_scores(qi, ki, local, mask, decay, sub_chunk):
  """Chunk-local scores ``[B, Hs, N, G, C, C]`` float32 (decayed, masked)."""
  scores = jnp.einsum("bhngik,bhnjk->bhngij", qi, ki, preferred_element_type=jnp.float32)
  mask = mask[:, :, :, None]
  if decay == common.NONE:
    return jnp.where(mask, scores, 0.0)
  if decay == common.SCALAR:
    # Double where: the masked differences (i < j) are positive and may overflow exp, and a zero
    # cotangent times an infinite derivative would be NaN.
    diff = jnp.where(mask, local[..., None, :, None] - local[..., None, None, :], 0.0)
    return scores * jnp.where(mask, jnp.exp(diff), 0.0)
  return jnp.where(mask, _channel_scores(qi, ki, local, sub_chunk), 0.0)


def _channel_scores(qi, ki, local, c):
  """``sum_d q_id k_jd exp(b_id - b_jd)`` for ``j <= i`` of each chunk, by sub-chunks of ``c``.

  Batch and heads are merged into one axis: XLA:CPU's YNNPACK fusions (jax 0.10) crash on
  arrays of more than 8 dimensions, which the gradients of a 9-axis form would create.
  """
  b, hs, n, g, chunk, kd = qi.shape
  ns = chunk // c
  qs = qi.astype(jnp.float32).swapaxes(2, 3).reshape(b * hs, g, n, ns, c, kd)
  ks = ki.astype(jnp.float32).reshape(b * hs, n, ns, c, kd)
  bs = local.reshape(b * hs, n, ns, c, kd)
  # Between sub-chunks I > J: the reference p_I is the cumulative decay at the first token of
  # sub-chunk I. Then b_i - p_I <= 0 for i in I and p_I - b_j <= 0 for j in an earlier J.
  p = bs[..., 0, :]  # [BH, N, ns, K]
  q_off = qs * jnp.exp(bs - p[..., None, :])[:, None]
  later = jnp.arange(ns)[:, None] > jnp.arange(ns)[None, :]  # [I, J]
  diff = jnp.where(later[:, :, None, None], p[..., :, None, None, :] - bs[..., None, :, :, :], 0.0)
  k_off = ks[..., None, :, :, :] * jnp.where(later[:, :, None, None], jnp.exp(diff), 0.0)
  off = jnp.einsum("xgnIik,xnIJjk->xgnIiJj", q_off, k_off)
  # Inside a sub-chunk: the [c, c, K] decay tensor, with the same double where as above (the
  # masked differences, i < j, are positive).
  tri = jnp.tril(jnp.ones((c, c), bool))[:, :, None]
  d = jnp.where(tri, bs[..., :, None, :] - bs[..., None, :, :], 0.0)
  k_diag = jnp.where(tri, jnp.exp(d), 0.0) * ks[..., None, :, :]  # [BH, N, ns, c, c, K]
  diag = jnp.einsum("xgnIik,xnIijk->xgnIij", qs, k_diag)
  eye = jnp.eye(ns, dtype=jnp.float32)
  scores = off + jnp.einsum("xgnIij,IJ->xgnIiJj", diag, eye)
  return scores.reshape(b, hs, g, n, chunk, chunk).swapaxes(2, 3)


def _intra(qi, ki, vi, local, mask, decay, sub_chunk):
  """Intra-chunk outputs ``[B, Hs, N, G, C, V]`` float32; the scores are recomputed in the backward
  pass (``jax.checkpoint``) instead of being saved.

  Per-channel decays need temporaries a few times the size of the keys per chunk (and their
  gradients more), so their chunks go through ``lax.map`` in groups of about
  ``_CHANNEL_GROUP_TOKENS`` tokens: the peak memory then stays bounded by the group, not by T.
  """

  def fn(qi, ki, vi, local, mask):
    scores = _intra_scores(qi, ki, local, mask, decay, sub_chunk)
    return jnp.einsum("bhngij,bhnjv->bhngiv", scores.astype(vi.dtype), vi,
                      preferred_element_type=jnp.float32)

  fn = jax.checkpoint(fn)
  n, chunk = ki.shape[2], ki.shape[3]
  if decay != common.CHANNEL or n * chunk <= _CHANNEL_GROUP_TOKENS:
    return fn(qi, ki, vi, local, mask)
  per_group = max(d for d in range(1, max(1, _CHANNEL_GROUP_TOKENS // chunk) + 1) if n % d == 0)
  mask = jnp.broadcast_to(mask, mask.shape[:2] + (n,) + mask.shape[3:])

  def split(x):  # [B, Hs, N, ...] -> [N / per_group, B, Hs, per_group, ...]
    x = x.reshape(x.shape[:2] + (n // per_group, per_group) + x.shape[3:])
    return jnp.moveaxis(x, 2, 0)

  out = lax.map(lambda xs: fn(*xs), tuple(split(x) for x in (qi, ki, vi, local, mask)))
  out = jnp.moveaxis(out, 0, 2)
  return out.reshape(out.shape[:2] + (n,) + out.shape[4:])
