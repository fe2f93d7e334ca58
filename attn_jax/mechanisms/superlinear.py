"""Superlinear multi-step attention (Huang, "Superlinear Multi-Step Attention", arXiv 2601.18401, 2026).

Attention as a search (paper's N = 2 baseline): the context is cut into spans of ``s`` tokens
(``s ~ sqrt(T)``: a power law of the length), each span is represented at its anchor, a *span
search* step scores the ``O(T / s)`` candidate spans of every query and keeps the ``top_k`` best,
*span attention* runs exact softmax attention inside each kept span, and the outputs combine
through a softmax gate over the kept spans' search scores. With the local window (the query's own
span) this costs ``O(T (T / s + top_k s))``, i.e. ``O(T^1.5)`` for ``s = sqrt(T)`` and any
earlier token can be reached through content-dependent routing.

We had the paper's abstract and model card, not its full text, so these choices are ours and
uncertain: spans are aligned blocks of ``span_size``; a span's search score is
``scale * q_i . r_span`` with ``r_span`` the key at the span's anchor (its last token), or the
``anchor_keys`` the caller provides (the paper's "accumulation" layers produce per-position
representatives); the local window is the query's own span up to itself, a gated item whose
score uses the query's own key; ties between spans go to the earlier one.
"""

from __future__ import annotations

from attn_jax.mechanisms import dense
from attn_jax.mechanisms import sparse_common


def _check(q, k, v, span_size, top_k, anchor_keys, fn):
  dense.check_qkv(q, k, v, fn)
  b, t, _, d = q.shape
  if k.shape[1] != t:
    raise ValueError(f"{fn}: superlinear attention is causal self-attention: q_len == kv_len, got {t} and {k.shape[1]}")
  span_size = sparse_common.check_int(fn, "span_size", span_size, 1, t, " (tokens per span)")
  spans = t // span_size
  top_k = sparse_common.check_int(fn, "top_k", top_k, 0, spans, f" (spans searched: {spans} complete spans)")
  if anchor_keys is None:
    anchor_keys = k[:, span_size - 1:spans * span_size:span_size]
  elif tuple(anchor_keys.shape) != (b, spans, k.shape[2], d):
    raise ValueError(f"{fn}: anchor_keys must have shape [batch, kv_len // span_size, kv_heads, head_dim] = "
                     f"{(b, spans, k.shape[2], d)}, got {tuple(anchor_keys.shape)}")
  return span_size, top_k, anchor_keys


def superlinear_attention(q, k, v, *, span_size: int, top_k: int, anchor_keys=None, scale=None):
  """Span search over aligned spans, exact attention inside the ``top_k`` kept spans and the own span,
  combined by a softmax over the spans' search scores.

  Args:
    q, k, v: ``[B, T, Hq, D]``, ``[B, T, Hkv, D]``, ``[B, T, Hkv, Dv]`` (causal self-attention).
    span_size: tokens per span (``~ sqrt(T)`` for the ``O(T^1.5)`` regime), in ``[1, T]``;
      ``span_size = T`` leaves only the own span: dense causal attention.
    top_k: spans kept per query and head, in ``[0, T // span_size]``.
    anchor_keys: optional ``[B, T // span_size, Hkv, D]`` span representatives (default: the key
      at each span's last token).
    scale: logit scale (default ``D ** -0.5``).

  Returns:
    ``[B, T, Hq, Dv]`` in the dtype of ``q``. Differentiable in q, k, v (and anchor_keys); the
    span choice is not.
  """
  span_size, top_k, anchor_keys = _check(q, k, v, span_size, top_k, anchor_keys, "superlinear_attention")
  out = sparse_common.gated_block_attention(q, k, v, anchor_keys, block_size=span_size, top_k=top_k,
                                            own_gate="self", scale=scale)
  return out.astype(q.dtype)


def superlinear_attention_reference(q, k, v, *, span_size: int, top_k: int, anchor_keys=None, scale=None):
  """The oracle: the gated mixture of span attentions written out as ``[T, T]`` weights."""
  span_size, top_k, anchor_keys = _check(q, k, v, span_size, top_k, anchor_keys, "superlinear_attention_reference")
  out = sparse_common.gated_block_attention_reference(q, k, v, anchor_keys, block_size=span_size, top_k=top_k,
                                                      own_gate="self", scale=scale)
  return out.astype(q.dtype)
