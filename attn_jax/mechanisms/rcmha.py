"""RCMHA, relative convolutional multi-head attention (Sugiharto et al., "RCMHA: Relative
Convolutional Multi-Head Attention for Natural Language Modelling", 2023).

RCMHA changes two parts of multi-head attention (Sec. 3): the query, key and value
projections pass through a depth-wise convolution along the sequence, and the attention score
gets Transformer-XL's relative-position terms (Dai et al. 2019, Sec. 3.3):

    a_ij = (q_i + u_h) . k_j + (q_i + w_h) . (W_R R(p_i - j))

with ``R`` the sinusoid of the relative distance, ``W_R`` a learned per-head projection and
``u_h``, ``w_h`` learned global biases. The paper does not specify the convolution beyond
"depth-wise"; we use a causal one per channel (width 3 in the layer, as in Primer's
multi-dconv-head attention, which the paper compares against).

The fast form needs no ``[Tq, Tk]`` relative tensor: ``sin`` and ``cos`` of ``(p - j) w`` split
into products of functions of ``p`` and of ``j``, so the positional term is a dot product of a
query-side feature ``[2F]`` and a key-side feature ``[cos(j w), sin(j w)]``. Appending them to
``q`` and ``k`` turns RCMHA into plain attention on ``D + 2F`` channels, which every backend of
:func:`attn_jax.attention` runs with its masks, in ``O(T)`` memory.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from attn_jax import masks as masks_lib
from attn_jax.mechanisms import dense
from attn_jax.mechanisms import linear as linear_mech
from attn_jax.softmax import api as softmax_api


def relative_frequencies(num_features: int) -> np.ndarray:
  """Transformer-XL's sinusoid frequencies ``w_f = 10000^(-2f / d_R)``, ``f < F = d_R / 2``."""
  if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
    raise ValueError(f"num_features must be a positive int (F = d_R / 2), got {num_features!r}")
  return (1.0 / (10000.0 ** (np.arange(num_features) * 2.0 / (2 * num_features)))).astype(np.float32)


def _check(q, k, v, rel_proj, u, w):
  dense.check_qkv(q, k, v, "relative_attention")
  hq, d = q.shape[2], q.shape[3]
  if rel_proj.ndim != 3 or rel_proj.shape[0] != hq or rel_proj.shape[2] != d or rel_proj.shape[1] % 2:
    raise ValueError(f"rel_proj must have shape [q_heads, 2F, head_dim] = [{hq}, 2F, {d}], got {tuple(rel_proj.shape)}")
  for name, x in (("u", u), ("w", w)):
    if tuple(x.shape) != (hq, d):
      raise ValueError(f"{name} must have shape [q_heads, head_dim] = {(hq, d)}, got {tuple(x.shape)}")


def _sizes(q, k, rel_proj, scale):
  f = rel_proj.shape[1] // 2
  scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
  return q.shape[0], q.shape[1], k.shape[1], k.shape[2], f, jnp.asarray(relative_frequencies(f)), scale


def _query_positions(tq, tk, query_offset):
  if query_offset is not None and (isinstance(query_offset, bool) or not isinstance(query_offset, int)):
    raise ValueError(f"query_offset must be a Python int or None, got {query_offset!r}")
  # By default queries sit at key position i + (kv_len - q_len), as in causal masks and decoding.
  return jnp.arange(tq) + (tk - tq if query_offset is None else query_offset)


def relative_attention(q, k, v, rel_proj, u, w, *, mask=None, scale=None, query_offset=None,
                       implementation=None, config=None):
  """Transformer-XL relative attention ``(q_i + u) . k_j + (q_i + w) . (W_R R(p_i - j))``, scaled.

  ``R(d) = [sin(d w_f), cos(d w_f)]_f`` (Transformer-XL's order), ``W_R = rel_proj[h]``.

  Args:
    q, k, v: ``[B, Tq, Hq, D]``, ``[B, Tk, Hkv, D]``, ``[B, Tk, Hkv, Dv]``.
    rel_proj: ``[Hq, 2F, D]`` per-head projection of the sinusoid.
    u, w: ``[Hq, D]`` content and position biases.
    mask: an attn_jax mask (e.g. ``masks.causal()``) or None.
    scale: default ``D ** -0.5``, applied to the whole score.
    query_offset: position ``p_i = i + query_offset`` of query ``i`` relative to key 0; default
      ``kv_len - q_len`` (the bottom-right alignment of causal masks and decoding).
    implementation, config: as in :func:`attn_jax.attention`.

  Returns:
    ``[B, Tq, Hq, Dv]`` in the dtype of ``q``.
  """
  _check(q, k, v, rel_proj, u, w)
  b, tq, tk, hkv, f, freq, scale = _sizes(q, k, rel_proj, scale)
  qf = q.astype(jnp.float32)
  # [B, Tq, Hq, 2F]: (q + w) W_R^T, split into the coefficients of sin and cos of (p - j) w.
  coef = jnp.einsum("bqhd,hfd->bqhf", qf + w.astype(jnp.float32), rel_proj.astype(jnp.float32),
                    precision=dense.HIGHEST)
  alpha, beta = coef[..., :f], coef[..., f:]
  pq = _query_positions(tq, tk, query_offset).astype(jnp.float32)[:, None] * freq   # [Tq, F]
  sin_q, cos_q = jnp.sin(pq)[None, :, None], jnp.cos(pq)[None, :, None]
  # sin((p-j)w) = sin(pw)cos(jw) - cos(pw)sin(jw); cos((p-j)w) = cos(pw)cos(jw) + sin(pw)sin(jw).
  q_pos = jnp.concatenate([alpha * sin_q + beta * cos_q, beta * sin_q - alpha * cos_q], axis=-1)
  pk = jnp.arange(tk, dtype=jnp.float32)[:, None] * freq
  k_pos = jnp.broadcast_to(jnp.concatenate([jnp.cos(pk), jnp.sin(pk)], -1)[None, :, None], (b, tk, hkv, 2 * f))
  qa = jnp.concatenate([qf + u.astype(jnp.float32), q_pos], axis=-1).astype(q.dtype)
  ka = jnp.concatenate([k.astype(jnp.float32), k_pos], axis=-1).astype(k.dtype)
  return softmax_api.attention(qa, ka, v, mask=mask, scale=scale, implementation=implementation, config=config)


def relative_attention_reference(q, k, v, rel_proj, u, w, *, mask=None, scale=None, query_offset=None):
  """The oracle of :func:`relative_attention`: the relative embedding of every ``(i, j)`` pair is
  materialised, ``[Tq, Tk, 2F]``, as in Transformer-XL before its shift trick."""
  _check(q, k, v, rel_proj, u, w)
  _, tq, tk, _, _, freq, scale = _sizes(q, k, rel_proj, scale)
  rel = _query_positions(tq, tk, query_offset)[:, None] - jnp.arange(tk)[None, :]       # [Tq, Tk]
  ang = rel.astype(jnp.float32)[..., None] * freq
  r = jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], -1)                                       # [Tq, Tk, 2F]
  r_h = jnp.einsum("qkf,hfd->hqkd", r, rel_proj.astype(jnp.float32), precision=dense.HIGHEST)
  qf = q.astype(jnp.float32)
  pos = jnp.einsum("bqhd,hqkd->bhqk", qf + w.astype(jnp.float32), r_h, precision=dense.HIGHEST)
  content_q = qf + u.astype(jnp.float32)
  out = dense.attention(content_q, k, v, mask=mask, scale=1.0,
                        logits_fn=lambda s: (s + pos) * scale)
  return out.astype(q.dtype)


def rcmha_attention(q, k, v, conv_q, conv_k, conv_v, rel_proj, u, w, *, mask=None, scale=None, implementation=None,
          config=None, reference=False):
  """RCMHA: causal depth-wise convolutions of the projected q, k, v, then relative attention.

  Args:
    q, k, v: projected ``[B, T, Hq, D]``, ``[B, T, Hkv, D]``, ``[B, T, Hkv, Dv]`` (self attention).
    conv_q, conv_k, conv_v: ``[W, H * D]`` depth-wise causal filters over the flattened heads
      (see :func:`attn_jax.mechanisms.short_conv`).
    rel_proj, u, w, mask, scale, implementation, config: as in :func:`relative_attention`.
    reference: use :func:`relative_attention_reference` (the oracle).

  Returns:
    ``[B, T, Hq, Dv]``.
  """
  dense.check_qkv(q, k, v, "rcmha_attention")
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"rcmha is self attention: q and k lengths must match, got {q.shape[1]} and {k.shape[1]}")
  if mask is None:
    mask = masks_lib.causal()

  def conv(x, kernel, name):
    flat = x.reshape(x.shape[:2] + (-1,))
    if kernel.ndim != 2 or kernel.shape[1] != flat.shape[2]:
      raise ValueError(f"{name} must have shape [width, heads * dim] = [W, {flat.shape[2]}], got {tuple(kernel.shape)}")
    return linear_mech.short_conv(flat, kernel).reshape(x.shape)

  q, k, v = conv(q, conv_q, "conv_q"), conv(k, conv_k, "conv_k"), conv(v, conv_v, "conv_v")
  if reference:
    return relative_attention_reference(q, k, v, rel_proj, u, w, mask=mask, scale=scale)
  return relative_attention(q, k, v, rel_proj, u, w, mask=mask, scale=scale, implementation=implementation,
                            config=config)
