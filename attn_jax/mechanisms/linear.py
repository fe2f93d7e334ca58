"""Named linear-attention mechanisms of the literature, built on :func:`attn_jax.linear_attention`.

Pure functions of arrays in the ``[batch, seq, heads, dim]`` layout (no parameters, no flax):
the flax.nnx layers in :mod:`attn_jax.layers.linear` add projections, norms and gates.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attn_jax import masks
from attn_jax.linear import api as linear_api
from attn_jax.linear import feature_maps
from attn_jax.softmax import api as softmax_api


def _shape(x):
  return tuple(x.shape)


def _check_qkv(q, k, v, name="q"):
  for n, x in ((name, q), ("k", k), ("v", v)):
    if not hasattr(x, "ndim") or x.ndim != 4:
      raise ValueError(f"{n} must have shape [batch, seq, heads, dim], got "
                       f"{_shape(x) if hasattr(x, 'shape') else type(x).__name__}")


def lightning_slopes(num_heads: int, layer_index: int = 0, num_layers: int = 1) -> np.ndarray:
  """Per-head decay rates of Lightning Attention (TransNormerLLM): ALiBi's geometric slopes.

  For ``n`` a power of two the slopes are ``r, r^2, ..., r^n`` with ``r = 2^(-8/n)``; otherwise
  those of the next lower power of two followed by every other slope of the next higher one (as
  in ALiBi). TransNormerLLM scales them per layer by ``1 - l / (L - 1) + 1e-5`` so that deeper
  layers forget more slowly. The decay of head ``h`` is ``exp(-slope_h)``.

  Returns:
    ``[num_heads]`` float32 slopes (> 0).
  """
  if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
    raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
  if not (0 <= layer_index < max(num_layers, 1)):
    raise ValueError(f"layer_index must be in [0, num_layers) = [0, {num_layers}), got {layer_index}")

  def power_of_two(n):
    r = 2.0 ** (-8.0 / n)
    return [r ** (i + 1) for i in range(n)]

  low = 1 << (num_heads.bit_length() - 1)
  slopes = power_of_two(low)
  if low != num_heads:
    slopes += power_of_two(2 * low)[0::2][:num_heads - low]
  scale = 1.0 - layer_index / (num_layers - 1) + 1e-5 if num_layers > 1 else 1.0
  return np.asarray(slopes, np.float32) * scale


def lightning_attention(q, k, v, slopes, *, version: int = 2, feature_map=None, initial_state=None,
                        return_final_state=False, segment_ids=None, chunk_size=None, implementation=None):
  """Lightning Attention 1 / 2: causal linear attention with a fixed decay ``exp(-slope_h)`` per head.

  ``o_t = sum_{j <= t} exp(-slope_h (t - j)) (phi(q_t) . phi(k_j)) v_j`` with no normaliser
  (TransNormerLLM normalises the output instead; see the layer). Version 2 is the chunked
  intra/inter-chunk algorithm (Lightning Attention-2). Version 1 computes the same function as
  one masked, decayed quadratic block (``(Q K^T * M) V``; Lightning Attention-1's IO-aware
  left product), i.e. the chunked backends with a single chunk of the whole sequence, whose
  cost and memory grow quadratically.

  Args:
    q, k, v: ``[B, T, Hq, D]``, ``[B, T, Hkv, D]``, ``[B, T, Hkv, Dv]``.
    slopes: ``[Hq]`` or ``[Hkv]`` positive decay rates, e.g. :func:`lightning_slopes`.
    version: 1 or 2.
    feature_map, initial_state, return_final_state, segment_ids, chunk_size, implementation:
      as in :func:`attn_jax.linear_attention`.
  """
  if version not in (1, 2):
    raise ValueError(f"version must be 1 or 2, got {version!r}")
  _check_qkv(q, k, v)
  slopes = jnp.asarray(slopes, jnp.float32)
  if slopes.ndim != 1:
    raise ValueError(f"slopes must have shape [heads], got {_shape(slopes)}")
  if version == 1:
    if chunk_size is not None:
      raise ValueError("chunk_size applies to version 2 only (version 1 is one quadratic block)")
    # One chunk covering the sequence; a power of two >= 16 suits every backend's chunk rules.
    chunk_size = 1 << max(4, (q.shape[1] - 1).bit_length())
  return linear_api.linear_attention(
      q, k, v, log_decay=-slopes, feature_map=feature_map, initial_state=initial_state,
      return_final_state=return_final_state, segment_ids=segment_ids, chunk_size=chunk_size,
      implementation=implementation)


def based_linear_attention(q, k, v, *, initial_state=None, return_final_state=False, segment_ids=None,
                           chunk_size=None, implementation=None):
  """Based's linear attention: the second-order Taylor feature map, normalised.

  ``o_t = sum_j (1 + s + s^2/2) v_j / sum_j (1 + s + s^2/2)`` with ``s = q_t . k_j / sqrt(d)``
  over ``j <= t``: softmax attention with ``exp`` replaced by its Taylor expansion. Based uses a
  small feature dim (``d = 16``, 273 features). The state is ``[B, H, 273, Dv + 1]``.
  """
  _check_qkv(q, k, v)
  return linear_api.linear_attention(
      q, k, v, feature_map=feature_maps.taylor, normalize=True, initial_state=initial_state,
      return_final_state=return_final_state, segment_ids=segment_ids, chunk_size=chunk_size,
      implementation=implementation)


def sliding_window_attention(q, k, v, window: int, *, implementation=None):
  """Causal softmax attention over the last ``window`` tokens (Based's local attention)."""
  return softmax_api.attention(q, k, v, mask=masks.sliding_window(window - 1), implementation=implementation)


def short_conv(x, kernel, *, bias=None, history=None, segment_ids=None):
  """Causal depthwise 1-D convolution along the sequence: ``y_t = sum_i kernel[i] * x_{t - W + 1 + i}``.

  Args:
    x: ``[B, T, C]``.
    kernel: ``[W, C]`` (one filter of width ``W`` per channel; the last tap multiplies ``x_t``).
    bias: ``[C]`` or None.
    history: ``[B, W - 1, C]``, the inputs before ``x_0`` (decoding), or None for zeros.
    segment_ids: ``[B, T]`` document ids of packed sequences: a tap never reads an input of
      another document (``history`` belongs to the first one).
  """
  if x.ndim != 3 or kernel.ndim != 2 or kernel.shape[1] != x.shape[2]:
    raise ValueError(f"short_conv expects x [B, T, C] and kernel [W, C], got {_shape(x)} and {_shape(kernel)}")
  w, t = kernel.shape[0], x.shape[1]
  if history is None:
    xp = jnp.pad(x, ((0, 0), (w - 1, 0), (0, 0)))
  else:
    if _shape(history) != (x.shape[0], w - 1, x.shape[2]):
      raise ValueError(f"history must have shape [B, W - 1, C] = {(x.shape[0], w - 1, x.shape[2])}, "
                       f"got {_shape(history)}")
    xp = jnp.concatenate([history.astype(x.dtype), x], axis=1)
  y = jnp.zeros_like(x)
  for i in range(w):
    shift = w - 1 - i  # tap i reads x_{t - shift}
    term = xp[:, i:i + t] * kernel[i].astype(x.dtype)
    if segment_ids is not None and shift:
      # The history belongs to the first document (edge padding); zero padding is masked off
      # anyway, so either way a tap reads only its own document.
      prev = jnp.pad(segment_ids, ((0, 0), (shift, 0)), mode="edge")[:, :t]
      term = jnp.where((prev == segment_ids)[..., None], term, 0)
    y = y + term
  return y if bias is None else y + bias.astype(x.dtype)


def jrt_prefix_state(k_prefix, v_prefix, *, feature_map=None, normalize=True):
  """JRT's non-causal read of the prompt: ``sum_j phi(ke_j) [ve_j, 1]^T`` over the prefix.

  Args:
    k_prefix: ``[B, M, Hkv, D]``; v_prefix: ``[B, M, Hkv, Dv]``: the prompt through JRT's
      separate key/value projections.

  Returns:
    ``[B, Hkv, F, Dv (+1)]`` float32, the initial state of the causal read.
  """
  if k_prefix.ndim != 4 or v_prefix.ndim != 4 or k_prefix.shape[:3] != v_prefix.shape[:3]:
    raise ValueError(f"k_prefix and v_prefix must have shapes [B, M, H, D] and [B, M, H, Dv], got "
                     f"{_shape(k_prefix)} and {_shape(v_prefix)}")
  fk = feature_maps.resolve(feature_map)(k_prefix).astype(jnp.float32)
  v = v_prefix.astype(jnp.float32)
  if normalize:
    v = jnp.concatenate([v, jnp.ones(v.shape[:3] + (1,), jnp.float32)], axis=-1)
  return jnp.einsum("bmhf,bmhv->bhfv", fk, v, precision=lax.Precision.HIGHEST)


def jrt_prefix_linear_attention(q, k, v, k_prefix, v_prefix, *, feature_map=None, normalize=True,
                                return_final_state=False, chunk_size=None, implementation=None):
  """JRT-Prefix linear attention ("Just read twice"): the prompt is read twice.

  The first ``M`` tokens are read non-causally through separate key/value projections
  (``k_prefix``, ``v_prefix``); their sums (numerator and normaliser) initialise the state of
  the causal linear attention over the whole sequence:

      o_i = phi(q_i)^T (sum_{j < M} phi(ke_j) ve_j^T + sum_{j <= i} phi(k_j) v_j^T) / (same with 1s)

  Args:
    q, k, v: ``[B, T, Hq, D]``, ``[B, T, Hkv, D]``, ``[B, T, Hkv, Dv]``.
    k_prefix, v_prefix: ``[B, M, Hkv, D]``, ``[B, M, Hkv, Dv]`` with ``M <= T``.
  """
  _check_qkv(q, k, v)
  if k_prefix.shape[1] > q.shape[1]:
    raise ValueError(f"the prefix ({k_prefix.shape[1]} tokens) must not be longer than the sequence ({q.shape[1]})")
  state = jrt_prefix_state(k_prefix, v_prefix, feature_map=feature_map, normalize=normalize)
  return linear_api.linear_attention(
      q, k, v, feature_map=feature_map, normalize=normalize, initial_state=state,
      return_final_state=return_final_state, chunk_size=chunk_size, implementation=implementation)


def retnet_decays(num_heads: int) -> np.ndarray:
  """RetNet's per-head decays ``gamma_h = 1 - 2^(-5 - h)``, ``[num_heads]`` float32."""
  return (1.0 - 2.0 ** (-5.0 - np.arange(num_heads, dtype=np.float64))).astype(np.float32)


def retention(q, k, v, gammas=None, *, initial_state=None, return_final_state=False, segment_ids=None,
              chunk_size=None, implementation=None):
  """RetNet's retention: ``o_t = sum_{j <= t} gamma_h^(t - j) (q_t . k_j / sqrt(d)) v_j``.

  The keys are scaled by ``d^-1/2`` as in RetNet; the layer applies the group norm and the swish
  gate. (RetNet's parallel form also rescales the decay matrix and the scores for numerical
  stability; the group norm that follows makes those rescalings nearly invisible and the chunked
  form keeps every factor <= 1, so they are omitted.)

  Args:
    gammas: ``[H]`` decays in (0, 1); default :func:`retnet_decays`.
  """
  _check_qkv(q, k, v)
  if gammas is None:
    gammas = retnet_decays(k.shape[2])
  gammas = jnp.asarray(gammas, jnp.float32)
  return linear_api.linear_attention(
      q, k, v, log_decay=jnp.log(gammas), scale=1.0 / math.sqrt(q.shape[-1]), initial_state=initial_state,
      return_final_state=return_final_state, segment_ids=segment_ids, chunk_size=chunk_size,
      implementation=implementation)


def lightnet_attention(q, k, v, *, causal=True, chunk_size=None, implementation=None,
                       return_final_state=False):
  """LightNet's additive linear recurrence ("You Only Scan Once").

  Each key channel is normalised by a softmax over the tokens read so far:
  ``S_t = sum_{j <= t} exp(k_j - Z_t) v_j^T`` with ``Z_t = logcumsumexp(k)_t`` per channel, and
  ``o_t = q_t^T S_t``. Causally this is a linear recurrence with per-channel decay
  ``a_t = exp(Z_{t-1} - Z_t)`` and keys ``exp(k_t - Z_t)`` (both <= 1, computed in log space),
  so it runs on the chunked primitive. Non-causally ``Z`` is one global log-sum-exp and the
  state one global sum, so a multi-dimensional input (an image) needs a single pass over its
  flattened tokens, not one scan per axis.

  Args:
    q, k, v: ``[B, *spatial, H, D]`` (``[B, T, H, D]`` when causal), ``v [..., H, Dv]``; q and
      k have the same heads.
    return_final_state: (causal only) also return ``(S [B, H, D, Dv] float32, Z [B, H, D]
      float32)``, the state after the last token, for :func:`lightnet_step`.
  """
  if not isinstance(causal, bool):
    raise ValueError(f"causal must be a bool, got {causal!r}")
  if q.ndim < 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
    raise ValueError(f"lightnet_attention expects q, k [B, *spatial, H, D] of equal shape and v "
                     f"[B, *spatial, H, Dv], got {_shape(q)}, {_shape(k)}, {_shape(v)}")
  if causal and q.ndim != 4:
    raise ValueError(f"causal lightnet_attention needs [B, T, H, D] inputs, got {_shape(q)}")
  if return_final_state and not causal:
    raise ValueError("return_final_state needs causal=True (the non-causal form has no recurrence)")
  spatial = q.shape[1:-2]
  flat = lambda x: x.reshape((x.shape[0], -1) + x.shape[-2:])
  q, k, v = flat(q), flat(k), flat(v)
  kf = k.astype(jnp.float32)
  if causal:
    z = lax.cumlogsumexp(kf, axis=1)
    keys = jnp.exp(kf - z)
    prev = jnp.concatenate([z[:, :1], z[:, :-1]], axis=1)
    # <= 0 in exact arithmetic; the minimum removes rounding noise of the scan (a positive log
    # decay is an error for linear_attention). The first token's value is irrelevant.
    log_decay = linear_api.clamp_log_decay(prev - z)
    o = linear_api.linear_attention(q, keys.astype(q.dtype), v, log_decay=log_decay, chunk_size=chunk_size,
                                    implementation=implementation, return_final_state=return_final_state)
    if return_final_state:
      o, state = o
      return o, (state, z[:, -1])
  else:
    z = jax.nn.logsumexp(kf, axis=1, keepdims=True)
    keys = jnp.exp(kf - z)
    o = linear_api.linear_attention(q, keys.astype(q.dtype), v, causal=False, implementation=implementation)
  return o.reshape((o.shape[0],) + spatial + o.shape[-2:])


def lightnet_step(state, q_t, k_t, v_t):
  """One causal LightNet decoding step: ``((S, Z), q_t [B, H, D], k_t, v_t [B, H, Dv]) -> ((S, Z), o_t)``.

  ``Z`` is the running per-channel log-sum-exp of the keys (``-inf`` before the first token);
  ``S <- exp(Z_old - Z) S + exp(k_t - Z) v_t^T`` and ``o_t = q_t^T S``, the recurrence that
  :func:`lightnet_attention` runs in chunked form.
  """
  s, z = state
  kf = k_t.astype(jnp.float32)
  z_new = jnp.logaddexp(z, kf)
  keys = jnp.exp(kf - z_new).astype(q_t.dtype)
  # Z_old = -inf before the first token gives a decay of exp(-inf) = 0 on the empty state.
  s, o = linear_api.linear_attention_step(s, q_t, keys, v_t, z - z_new)
  return (s, z_new), o


def lightnet_init_state(batch: int, num_heads: int, key_dim: int, value_dim: int):
  """Empty LightNet decoding state ``(S [B, H, D, Dv] = 0, Z [B, H, D] = -inf)``."""
  return (jnp.zeros((batch, num_heads, key_dim, value_dim), jnp.float32),
          jnp.full((batch, num_heads, key_dim), -jnp.inf, jnp.float32))


def _aaren_combine(a, b):
  """Associative combine of ``(m, u, w)``: running max, ``sum exp(s - m)``, ``sum exp(s - m) v``."""
  ma, ua, wa = a
  mb, ub, wb = b
  m = jnp.maximum(ma, mb)
  ea, eb = jnp.exp(ma - m), jnp.exp(mb - m)
  return m, ua * ea + ub * eb, wa * ea[..., None] + wb * eb[..., None]


def aaren(query, k, v, *, scale=None, return_final_state=False):
  """Aaren ("Attention as an RNN"): exact causal softmax attention of one learned query per head.

  ``o_t = sum_{j <= t} softmax_j(s_j) v_j`` with ``s_j = scale * query_h . k_j``, computed as an
  associative scan (``lax.associative_scan``) of ``(m, u, w)``: the running max, the sum of
  ``exp(s - m)`` and the sum of ``exp(s - m) v``, in float32. Decoding needs only ``(m, u, w)``
  per head: :func:`aaren_step` is O(1) per token.

  Args:
    query: ``[H, D]`` learned queries; k: ``[B, T, H, D]``; v: ``[B, T, H, Dv]``.
    scale: logit scale (default ``D^-1/2``).
    return_final_state: also return the state ``(m, u, w)`` after the last token, for
      :func:`aaren_step`.

  Returns:
    ``[B, T, H, Dv]`` in the dtype of ``v`` (and the state).
  """
  if query.ndim != 2 or k.ndim != 4 or v.ndim != 4 or k.shape[2:] != query.shape or v.shape[:3] != k.shape[:3]:
    raise ValueError(f"aaren expects query [H, D], k [B, T, H, D], v [B, T, H, Dv], got {_shape(query)}, "
                     f"{_shape(k)}, {_shape(v)}")
  scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
  s = jnp.einsum("bthd,hd->bth", k.astype(jnp.float32), query.astype(jnp.float32),
                 precision=lax.Precision.HIGHEST) * scale
  m, u, w = lax.associative_scan(_aaren_combine, (s, jnp.ones_like(s), v.astype(jnp.float32)), axis=1)
  o = (w / u[..., None]).astype(v.dtype)
  return (o, (m[:, -1], u[:, -1], w[:, -1])) if return_final_state else o


def aaren_init_state(batch: int, num_heads: int, value_dim: int):
  """Empty Aaren decoding state ``(m [B, H], u [B, H], w [B, H, Dv])``: no token read yet."""
  return (jnp.full((batch, num_heads), -jnp.inf, jnp.float32), jnp.zeros((batch, num_heads), jnp.float32),
          jnp.zeros((batch, num_heads, value_dim), jnp.float32))


def aaren_step(state, query, k_t, v_t, *, scale=None):
  """One Aaren decoding step: ``(state, k_t [B, H, D], v_t [B, H, Dv]) -> (state, o_t [B, H, Dv])``."""
  scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
  s = jnp.einsum("bhd,hd->bh", k_t.astype(jnp.float32), query.astype(jnp.float32),
                 precision=lax.Precision.HIGHEST) * scale
  m0, u0, w0 = state
  m = jnp.maximum(m0, s)
  # exp(-inf - m) = 0 for the empty state; m is finite after the first token.
  e0, e1 = jnp.exp(m0 - m), jnp.exp(s - m)
  u = u0 * e0 + e1
  w = w0 * e0[..., None] + v_t.astype(jnp.float32) * e1[..., None]
  return (m, u, w), (w / u[..., None]).astype(v_t.dtype)
