"""Recycled Attention (Xu et al., "Recycled Attention: Efficient inference for long-context language
models", 2024): decoding that alternates full attention with attention over a recycled subset.

Every ``stride`` decoding steps (Sec. 3) the new token attends to the whole cache and the ``top_k``
keys it attended to most are remembered; the steps in between attend only to those keys plus the
tokens generated since that full step, so they cost ``O(top_k + stride)`` instead of
``O(context)``. The cache itself is kept whole (nothing is evicted), so the next full step can
pick a different subset.

Our choices: with GQA the recycled keys are chosen per K/V head from the attention probabilities
summed over the group's query heads (the paper uses per-head top-K); the first decoding step is a
full step; ties go to the earlier key. Decoding only: there is no gradient path worth training
through, and the tests check the forward pass.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from attn_jax.mechanisms import dense
from attn_jax.mechanisms import sparse_common

HIGHEST = jax.lax.Precision.HIGHEST


def _check(q, k, v, prompt_len, stride, top_k, fn):
  dense.check_qkv(q, k, v, fn)
  n, total = q.shape[1], k.shape[1]
  prompt_len = sparse_common.check_int(fn, "prompt_len", prompt_len, 0)
  if prompt_len + n != total:
    raise ValueError(f"{fn}: k/v must hold the prompt and every decoded token: kv_len = prompt_len + steps = "
                     f"{prompt_len} + {n}, got {total}")
  stride = sparse_common.check_int(fn, "stride", stride, 1, None, " (steps between full attentions)")
  top_k = sparse_common.check_int(fn, "top_k", top_k, 1, total, " (recycled keys, at most the cache length)")
  return prompt_len, stride, top_k


def _probs(qn, k, pos, scale, g):
  """Attention of the step's queries ``[B, Hq, D]`` over keys ``<= pos``: ``(p [B, Hq, T], logits)``."""
  kh = jnp.repeat(k.astype(jnp.float32), g, axis=2)
  s = jnp.einsum("bhd,bthd->bht", qn.astype(jnp.float32), kh, precision=HIGHEST) * scale
  s = jnp.where(jnp.arange(k.shape[1]) <= pos, s, -jnp.inf)
  return jax.nn.softmax(s, axis=-1), s


def recycled_attention(q, k, v, *, prompt_len: int, stride: int, top_k: int, scale=None):
  """The decoding loop of Recycled Attention over ``N`` steps, as one ``lax.scan``.

  Args:
    q: ``[B, N, Hq, D]`` queries of the decoding steps; step ``n`` sits at position
      ``prompt_len + n``.
    k, v: ``[B, prompt_len + N, Hkv, D]`` / ``[..., Dv]``: the prefilled cache and the keys of the
      decoded tokens (step ``n`` sees positions ``<= prompt_len + n``).
    prompt_len: length of the prefilled context.
    stride: a full step every ``stride`` steps (``stride = 1``: dense decoding).
    top_k: keys recycled per K/V head, in ``[1, prompt_len + N]``; a value covering the whole
      cache makes every step equal to full attention.
    scale: logit scale (default ``D ** -0.5``).

  Returns:
    ``[B, N, Hq, Dv]`` in the dtype of ``q``.
  """
  prompt_len, stride, top_k = _check(q, k, v, prompt_len, stride, top_k, "recycled_attention")
  b, n, hq, d = q.shape
  total, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  window = stride  # tokens since the last full step, the current one included
  vf = v.astype(jnp.float32)

  def full(qn, pos, carry):
    p, _ = _probs(qn, k, pos, scale, g)
    out = jnp.einsum("bht,bthd->bhd", p, jnp.repeat(vf, g, axis=2), precision=HIGHEST)
    group_p = p.reshape(b, hkv, g, total).sum(2)                                          # [B, Hkv, T]
    _, sel = lax.top_k(group_p, top_k)
    return out, (sel.astype(jnp.int32), pos)

  def recycled(qn, pos, carry):
    sel, pos_full = carry
    recent = pos - window + 1 + jnp.arange(window)                                        # [S]
    idx = jnp.concatenate([sel, jnp.broadcast_to(recent, (b, hkv, window))], -1)          # [B, Hkv, K + S]
    live = jnp.concatenate([sel <= pos_full, jnp.broadcast_to((recent > pos_full) & (recent >= 0), (b, hkv, window))], -1)
    safe = jnp.clip(idx, 0, total - 1)
    take = jax.vmap(jax.vmap(lambda x, i: x[i], in_axes=(1, 0)))                          # [T, Hkv, X] per (b, h)
    ks, vs = take(k.astype(jnp.float32), safe), take(vf, safe)                            # [B, Hkv, K + S, X]
    s = jnp.einsum("bhgd,bhkd->bhgk", qn.astype(jnp.float32).reshape(b, hkv, g, d), ks, precision=HIGHEST) * scale
    s = jnp.where(live[:, :, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bhgk,bhkd->bhgd", p, vs, precision=HIGHEST).reshape(b, hq, -1)
    return out, carry

  def step(carry, xs):
    step_n, qn = xs
    pos = prompt_len + step_n
    out, carry = lax.cond(step_n % stride == 0, full, recycled, qn, pos, carry)
    return carry, out

  init = (jnp.zeros((b, hkv, top_k), jnp.int32), jnp.int32(-1))
  _, out = lax.scan(step, init, (jnp.arange(n), q.transpose(1, 0, 2, 3)))
  return out.transpose(1, 0, 2, 3).astype(q.dtype)


def recycled_attention_reference(q, k, v, *, prompt_len: int, stride: int, top_k: int, scale=None):
  """The oracle: step by step in Python, each step's visible keys materialised over the whole cache."""
  prompt_len, stride, top_k = _check(q, k, v, prompt_len, stride, top_k, "recycled_attention_reference")
  b, n, hq, d = q.shape
  total, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  positions = jnp.arange(total)
  outs, chosen, pos_full = [], None, -1
  for step_n in range(n):
    pos = prompt_len + step_n
    p, s = _probs(q[:, step_n], k, pos, scale, g)
    if step_n % stride == 0:
      group_p = p.reshape(b, hkv, g, total).sum(2)
      order = jnp.argsort(-group_p, axis=-1, stable=True)
      chosen = jnp.argsort(order, axis=-1) < top_k                                        # [B, Hkv, T]
      pos_full = pos
      vis = positions <= pos
    else:
      vis = (chosen & (positions <= pos_full)) | ((positions > pos_full) & (positions <= pos))
    vis = jnp.broadcast_to(jnp.repeat(jnp.broadcast_to(vis, (b, hkv, total)), g, axis=1), s.shape)
    p = jax.nn.softmax(jnp.where(vis, s, -jnp.inf), axis=-1)
    outs.append(jnp.einsum("bht,bthd->bhd", p, jnp.repeat(v.astype(jnp.float32), g, axis=2), precision=HIGHEST))
  return jnp.stack(outs, axis=1).astype(q.dtype)
