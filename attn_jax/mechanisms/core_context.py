"""Core Context Aware Attention (CCA-Attention; Chen et al., "Core Context Aware Transformers for
Long Context Language Modeling", ICML 2025).

Globality-aware pooling (Sec. 3.2): the tokens are split into groups of ``g``; each group is
compressed into one *core token* whose key and value are the importance-weighted sums of the
group's keys and values, the importance being the softmax over the group of the group's last
query against its keys (``softmax_t(q_last . k_t / sqrt(d))``, as in the released code).
Locality-preserving module (Sec. 3.3): each query also sees the original tokens of a local
window. Both enter one softmax (Sec. 3.4): query ``i`` attends to the core tokens of groups
that ended at least ``window`` positions before it, and to the original tokens from the start of
the first group not yet covered by a visible core up to itself. With ``window`` a multiple of
``g`` the two sets partition the causal prefix exactly: every earlier token is seen either
through its core or itself, never both.

Our choices: for GQA, the importance of a K/V head's group uses the mean of its query heads'
scores; an incomplete last group has no core token (its tokens are always inside the window).

Implementation: the cores are prepended to the keys and values, and the pattern is a static mask
(:class:`CoreContextMask`) over the concatenated key axis with analytic block bounds and an
in-kernel predicate, so every backend of :func:`attn_jax.attention` runs it block-sparsely:
``O(T (T / g + window))`` work and the backends' memory.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax import masks as masks_lib
from attn_jax.mechanisms import dense
from attn_jax.mechanisms import sparse_common
from attn_jax.softmax import api as softmax_api


@dataclasses.dataclass(frozen=True)
class CoreContextMask(masks_lib.Mask):
  """Visibility over ``[num_cores core tokens | T original tokens]`` for causal self-attention.

  Query ``i`` sees core ``c`` iff ``(c + 1) * group + window - 1 <= i``, and original token ``j``
  iff ``floor((i + 1) / group) * group - window <= j <= i``.
  """

  group: int
  window: int
  num_cores: int

  def evaluate(self, q_idx, kv_idx, head, ctx, xp):
    g, w, n = self.group, self.window, self.num_cores
    # (i + 1) // g with i >= 0; the core test is written without division.
    start = masks_lib.div_nonneg(q_idx + 1, g, xp) * g - w
    j = kv_idx - n
    core = (kv_idx < n) & ((kv_idx + 1) * g + (w - 1) <= q_idx)
    token = (kv_idx >= n) & (j >= start) & (j <= q_idx)
    return core | token

  def block_bounds(self, q_lo, q_hi, k_lo, k_hi, ctx):
    g, w, n = self.group, self.window, self.num_cores
    # Core part of the rectangle: keys [k_lo, min(k_hi, n - 1)]; visibility is monotone in both.
    c_hi = np.minimum(k_hi, n - 1)
    has_core = k_lo < n
    core_may = has_core & ((k_lo + 1) * g + (w - 1) <= q_hi)
    core_must = ((c_hi + 1) * g + (w - 1) <= q_lo)
    # Token part: keys [max(k_lo, n), k_hi] - n; the window start grows with the query.
    t_lo, t_hi = np.maximum(k_lo, n) - n, k_hi - n
    has_tok = k_hi >= n
    start = lambda i: np.floor_divide(i + 1, g) * g - w  # noqa: E731
    tok_may = has_tok & (t_hi >= start(q_lo)) & (t_lo <= q_hi)
    tok_must = (t_lo >= start(q_hi)) & (t_hi <= q_lo)
    may = core_may | tok_may
    must = (~has_core | core_must) & (~has_tok | tok_must)
    return may, must

  def validate(self, ctx):
    if ctx.kv_len != ctx.q_len + self.num_cores:
      raise ValueError(f"CoreContextMask expects kv_len = q_len + num_cores = {ctx.q_len + self.num_cores}, "
                       f"got kv_len={ctx.kv_len}")

  def __repr__(self):
    return f"core_context(group={self.group}, window={self.window}, cores={self.num_cores})"


def _check(q, k, v, group_size, window, fn):
  dense.check_qkv(q, k, v, fn)
  t = q.shape[1]
  if k.shape[1] != t:
    raise ValueError(f"{fn}: causal self-attention needs q_len == kv_len, got {t} and {k.shape[1]}")
  group_size = sparse_common.check_int(fn, "group_size", group_size, 1, t, " (tokens per core, at most the length)")
  top = -(-t // group_size) * group_size
  window = sparse_common.check_int(fn, "window", window, group_size, top,
                                   f" (local tokens; {top} covers the sequence)")
  if window % group_size:
    raise ValueError(f"{fn}: window must be a multiple of group_size={group_size} so that cores and the local "
                     f"window partition the context, got {window}")
  return group_size, window


def core_tokens(q, k, v, *, group_size: int, scale=None):
  """Core keys and values ``[B, T // g, Hkv, D]`` / ``[B, T // g, Hkv, Dv]`` (float32).

  ``core_c = sum_t softmax_t(scale * mean_G(q_last) . k_t) x_t`` over group ``c``; differentiable.
  """
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  n = t // group_size
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  hi = jax.lax.Precision.HIGHEST
  kg = k[:, :n * group_size].astype(jnp.float32).reshape(b, n, group_size, hkv, d)
  vg = v[:, :n * group_size].astype(jnp.float32).reshape(b, n, group_size, hkv, v.shape[3])
  q_last = q[:, group_size - 1:n * group_size:group_size].astype(jnp.float32)           # [B, n, Hq, D]
  q_last = q_last.reshape(b, n, hkv, hq // hkv, d)
  s = jnp.einsum("bnhgd,bnthd->bnhgt", q_last, kg, precision=hi).mean(3) * scale          # [B, n, Hkv, g]
  w = jax.nn.softmax(s, axis=-1)
  return (jnp.einsum("bnht,bnthd->bnhd", w, kg, precision=hi), jnp.einsum("bnht,bnthd->bnhd", w, vg, precision=hi))


def core_context_attention(q, k, v, *, group_size: int, window: int, scale=None, implementation=None, config=None):
  """CCA-Attention: core tokens of earlier groups plus a local window, in one softmax.

  Args:
    q, k, v: ``[B, T, Hq, D]``, ``[B, T, Hkv, D]``, ``[B, T, Hkv, Dv]`` (causal self-attention).
    group_size: tokens pooled into one core token (``g``), in ``[1, T]``.
    window: local window in tokens, a multiple of ``g`` in ``[g, ceil(T / g) * g]``; the largest
      value keeps every token local: dense causal attention.
    scale, implementation, config: as in :func:`attn_jax.attention`.

  Returns:
    ``[B, T, Hq, Dv]`` in the dtype of ``q``.
  """
  group_size, window = _check(q, k, v, group_size, window, "core_context_attention")
  kc, vc = core_tokens(q, k, v, group_size=group_size, scale=scale)
  keys = jnp.concatenate([kc.astype(k.dtype), k], axis=1)
  values = jnp.concatenate([vc.astype(v.dtype), v], axis=1)
  mask = CoreContextMask(group_size, window, kc.shape[1])
  return softmax_api.attention(q, keys, values, mask=mask, scale=scale, implementation=implementation, config=config)


def core_context_attention_reference(q, k, v, *, group_size: int, window: int, scale=None):
  """The oracle: the core/window pattern written out densely, one softmax in float32."""
  group_size, window = _check(q, k, v, group_size, window, "core_context_attention_reference")
  t = q.shape[1]
  kc, vc = core_tokens(q, k, v, group_size=group_size, scale=scale)
  n = kc.shape[1]
  i = np.arange(t)[:, None]
  core_end = (np.arange(n)[None, :] + 1) * group_size - 1      # last token of each core's group
  core_vis = core_end <= i - window                              # the group ended >= window tokens ago
  first_local = (i + 1) // group_size * group_size - window      # first token not covered by a visible core
  j = np.arange(t)[None, :]
  tok_vis = (j >= first_local) & (j <= i)
  vis = jnp.asarray(np.concatenate([core_vis, tok_vis], axis=1))
  keys = jnp.concatenate([kc, k.astype(jnp.float32)], axis=1)
  values = jnp.concatenate([vc, v.astype(jnp.float32)], axis=1)
  out = dense.attention(q, keys, values, scale=scale, logits_fn=lambda s: jnp.where(vis, s, -jnp.inf))
  return out.astype(q.dtype)
