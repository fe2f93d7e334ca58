"""Compressed Convolutional Attention (Figliolia et al., "Compressed Convolutional Attention:
Efficient Attention in a Compressed Latent Space", Zyphra 2025) and its grouped form CCGQA.

CCA (Sec. III) down-projects queries, keys and values to a latent of ``E / C`` channels and runs
the whole attention there, so parameters, KV cache and attention FLOPs all shrink by ``C``. To
make up for the smaller space it mixes q and k with two causal convolutions: a depth-wise one
along the sequence, then one along the sequence and the channels of each head; adds back the
mean of the pre-convolution q and k ("q-k mean"); L2-normalises q and k with a learned
temperature; and builds the values from the current and the previous token ("value shift",
half the heads each). CCGQA shares each latent key/value head between a group of query heads.

This module is the function of the latent tensors (after the down-projections, before the
up-projection); the layer owns the projections and the rotary embedding. Choices the paper's
text leaves open, ours: the q-k mean of a GQA group averages the group's query heads with its
key head; the temperature is one learned scalar per query head and is the only logit scale
after normalisation; the second convolution mixes the channels of each head (grouped by head).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn_jax.mechanisms import dense
from attn_jax.softmax import api as softmax_api

_DIMS = ("NWC", "WIO", "NWC")


def value_shift(v_current, v_previous):
  """CCA's value shift: the first half of the heads from token ``t``, the second from ``t - 1``.

  Args:
    v_current: ``[B, T, H, D]`` values projected from each token.
    v_previous: ``[B, T, H, D]`` values from a second projection of each token; head ``h >= H/2``
      of token ``t`` takes ``v_previous`` of token ``t - 1`` (zeros at ``t = 0``).

  Returns:
    ``[B, T, H, D]``.
  """
  if v_current.ndim != 4 or v_current.shape != v_previous.shape:
    raise ValueError(f"value_shift expects two [B, T, H, D] arrays of one shape, got {v_current.shape} "
                     f"and {v_previous.shape}")
  half = v_current.shape[2] // 2
  shifted = jnp.pad(v_previous, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]
  return jnp.concatenate([v_current[:, :, :half], shifted[:, :, half:]], axis=2)


def _check(q, k, v, conv1_q, conv1_k, conv2_q, conv2_k, temperature):
  dense.check_qkv(q, k, v, "compressed_conv_attention")
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"compressed_conv_attention is self attention: q and k lengths differ ({q.shape[1]}, {k.shape[1]})")
  for name, x, heads in (("conv1_q", conv1_q, q.shape[2]), ("conv1_k", conv1_k, k.shape[2])):
    if x.ndim != 2 or x.shape[1] != heads * q.shape[3]:
      raise ValueError(f"{name} must have shape [width, heads * head_dim] = [W, {heads * q.shape[3]}], "
                       f"got {tuple(x.shape)}")
  for name, x, heads in (("conv2_q", conv2_q, q.shape[2]), ("conv2_k", conv2_k, k.shape[2])):
    if x.ndim != 4 or x.shape[1:] != (heads, q.shape[3], q.shape[3]):
      raise ValueError(f"{name} must have shape [width, heads, head_dim, head_dim] = [W, {heads}, {q.shape[3]}, "
                       f"{q.shape[3]}], got {tuple(x.shape)}")
  if tuple(jnp.shape(temperature)) != (q.shape[2],):
    raise ValueError(f"temperature must have shape [q_heads] = ({q.shape[2]},), got {jnp.shape(temperature)}")


def _conv_fast(x, conv1, conv2):
  """Both causal convolutions with ``lax.conv_general_dilated``; x ``[B, T, H, D]`` float32."""
  b, t, h, d = x.shape
  flat = x.reshape(b, t, h * d)
  w1 = conv1.shape[0]
  y = jax.lax.conv_general_dilated(jnp.pad(flat, ((0, 0), (w1 - 1, 0), (0, 0))),
                                   conv1.astype(jnp.float32)[:, None, :], (1,), "VALID",
                                   dimension_numbers=_DIMS, feature_group_count=h * d,
                                   precision=dense.HIGHEST)
  w2 = conv2.shape[0]
  # Grouped by head: [W, H, Din, Dout] -> [W, Din, H * Dout] with H feature groups.
  k2 = conv2.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(w2, d, h * d)
  z = jax.lax.conv_general_dilated(jnp.pad(y, ((0, 0), (w2 - 1, 0), (0, 0))), k2, (1,), "VALID",
                                   dimension_numbers=_DIMS, feature_group_count=h, precision=dense.HIGHEST)
  return z.reshape(b, t, h, d)


def _conv_reference(x, conv1, conv2):
  """The convolutions as explicit sums over taps: ``y_t = sum_s w[s] x_{t - W + 1 + s}``."""
  _, t, h, d = x.shape

  def taps(seq, n):
    padded = jnp.pad(seq, ((0, 0), (n - 1, 0)) + ((0, 0),) * (seq.ndim - 2))
    return [padded[:, s:s + t] for s in range(n)]

  c1 = conv1.astype(jnp.float32).reshape(conv1.shape[0], h, d)
  y = sum(xs * c1[s] for s, xs in enumerate(taps(x, conv1.shape[0])))
  c2 = conv2.astype(jnp.float32)
  return sum(jnp.einsum("bthi,hio->btho", ys, c2[s], precision=dense.HIGHEST)
             for s, ys in enumerate(taps(y, conv2.shape[0])))


def _latent_qk(q, k, conv1_q, conv1_k, conv2_q, conv2_k, temperature, conv_fn):
  hq, hkv = q.shape[2], k.shape[2]
  g = hq // hkv
  qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
  # q-k mean before the convolutions: per GQA group, the mean of its query heads and its key head.
  mean = 0.5 * (qf.reshape(qf.shape[:2] + (hkv, g, -1)).mean(3) + kf)          # [B, T, Hkv, D]
  qc = conv_fn(qf, conv1_q, conv2_q) + jnp.repeat(mean, g, axis=2)
  kc = conv_fn(kf, conv1_k, conv2_k) + mean

  def unit(x):
    return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6)

  return unit(qc) * jnp.asarray(temperature, jnp.float32)[:, None], unit(kc)


def compressed_conv_attention(q, k, v, conv1_q, conv1_k, conv2_q, conv2_k, temperature, *, mask=None,
                              rope=None, implementation=None, config=None, reference=False):
  """CCA / CCGQA on latent tensors.

  ``q~ = conv2(conv1(q)) + m``, ``k~ = conv2(conv1(k)) + m`` with ``m = (mean_group(q) + k) / 2``,
  then ``logits = tau_h * unit(q~) . unit(k~)`` (after the optional rotary embedding) and
  ``softmax(logits) v``. Both convolutions are causal, so ``mask`` is normally
  ``masks.causal()``.

  Args:
    q: latent queries ``[B, T, Hq, D]``; k: ``[B, T, Hkv, D]`` (CCGQA when ``Hkv < Hq``);
      v: ``[B, T, Hkv, Dv]`` (e.g. from :func:`value_shift`).
    conv1_q, conv1_k: ``[W1, H * D]`` depth-wise sequence filters.
    conv2_q, conv2_k: ``[W2, H, D, D]`` filters over the sequence and the channels of each head.
    temperature: ``[Hq]`` logit scale after normalisation (learned).
    mask: attn_jax mask or None.
    rope: optional ``(q, k) -> (q, k)`` applied to the normalised, scaled latents (rotations keep
      the normalisation).
    implementation, config: backend of :func:`attn_jax.attention`.
    reference: run the oracle: convolutions as explicit sums over taps and materialised
      attention.

  Returns:
    ``[B, T, Hq, Dv]`` in the dtype of ``q``.
  """
  _check(q, k, v, conv1_q, conv1_k, conv2_q, conv2_k, temperature)
  conv_fn = _conv_reference if reference else _conv_fast
  qn, kn = _latent_qk(q, k, conv1_q, conv1_k, conv2_q, conv2_k, temperature, conv_fn)
  if rope is not None:
    qn, kn = rope(qn, kn)
  if reference:
    return dense.attention(qn, kn, v, mask=mask, scale=1.0).astype(q.dtype)
  return softmax_api.attention(qn.astype(q.dtype), kn.astype(q.dtype), v, mask=mask, scale=1.0,
                               implementation=implementation, config=config)
