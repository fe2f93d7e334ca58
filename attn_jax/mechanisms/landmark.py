"""Landmark Attention (Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length
for Transformers", NeurIPS 2023).

The sequence is cut into blocks of ``l`` tokens and a landmark token follows every block
(Sec. 3.1). The grouped softmax (Sec. 3.2) lets the landmark's score gate its block: query ``i``
runs one softmax over the tokens of its own block (up to itself) and the landmarks ``L_b`` of the
earlier blocks; a token ``j`` of an earlier block ``b`` then receives the landmark's probability
times its softmax within block ``b``:

``p_ij = softmax(s_i,own tokens ; s_i,L_b)[L_b] * softmax_{j' in b}(s_ij')_j``.

At inference (Sec. 3.3) each query retrieves only the ``top_k`` blocks with the highest landmark
scores (per head) and runs the same grouped softmax over them and its own block. Trained with
every earlier block (``top_k=None``), which costs ``O(T^2)`` as dense attention does; retrieval
costs ``O(T (T / l + top_k l))``.

Our choices: the function takes the landmark tokens' keys (``landmark_k``, one per complete
block, computed by the model from its landmark embedding); the landmarks' own outputs (which the
paper's language model discards) are not produced; retrieval is per query row and query head, as
in the paper, with ties going to the earlier block.
"""

from __future__ import annotations

from attn_jax.mechanisms import dense
from attn_jax.mechanisms import sparse_common


def _check(q, k, v, landmark_k, block_size, top_k, fn):
  dense.check_qkv(q, k, v, fn)
  b, t, _, d = q.shape
  if k.shape[1] != t:
    raise ValueError(f"{fn}: landmark attention is causal self-attention: q_len == kv_len, got {t} and {k.shape[1]}")
  block_size = sparse_common.check_int(fn, "block_size", block_size, 1, t, " (tokens per landmark block)")
  want = (b, t // block_size, k.shape[2], d)
  if tuple(landmark_k.shape) != want:
    raise ValueError(f"{fn}: landmark_k must have shape [batch, kv_len // block_size, kv_heads, head_dim] = {want}, "
                     f"got {tuple(landmark_k.shape)}")
  if top_k is not None:
    top_k = sparse_common.check_int(fn, "top_k", top_k, 0, t // block_size, " (retrieved blocks, at most the "
                                    "number of complete blocks)")
  return block_size, top_k


def landmark_attention(q, k, v, landmark_k, *, block_size: int, top_k: int | None = None, scale=None):
  """Landmark attention: the grouped softmax, over every earlier block or the ``top_k`` retrieved ones.

  Args:
    q, k, v: ``[B, T, Hq, D]``, ``[B, T, Hkv, D]``, ``[B, T, Hkv, Dv]`` (the regular tokens).
    landmark_k: ``[B, T // block_size, Hkv, D]`` keys of the landmark tokens of the complete blocks.
    block_size: ``l``, tokens per block.
    top_k: None (training: every earlier block) or the number of blocks retrieved per query and
      head at inference, in ``[0, T // block_size]``; ``top_k >= `` the number of earlier blocks
      equals ``top_k=None`` exactly.
    scale: logit scale (default ``D ** -0.5``), shared by token and landmark scores.

  Returns:
    ``[B, T, Hq, Dv]`` in the dtype of ``q``. Differentiable in q, k, v and landmark_k.
  """
  block_size, top_k = _check(q, k, v, landmark_k, block_size, top_k, "landmark_attention")
  out = sparse_common.gated_block_attention(q, k, v, landmark_k, block_size=block_size, top_k=top_k,
                                            own_gate="lse", scale=scale)
  return out.astype(q.dtype)


def landmark_attention_reference(q, k, v, landmark_k, *, block_size: int, top_k: int | None = None, scale=None):
  """The oracle: the grouped softmax written out as ``[T, T]`` weights."""
  block_size, top_k = _check(q, k, v, landmark_k, block_size, top_k, "landmark_attention_reference")
  out = sparse_common.gated_block_attention_reference(q, k, v, landmark_k, block_size=block_size, top_k=top_k,
                                                      own_gate="lse", scale=scale)
  return out.astype(q.dtype)
