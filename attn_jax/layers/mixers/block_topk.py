"""Block top-k selection attention (MoBA; NSA's selection branch), the ``"block_topk"`` mixer.

Keys are mean-pooled per block; each query block keeps its own block and the ``top_k`` key blocks
whose pooled keys score highest against its pooled queries (one choice per K/V head), and runs
exact softmax attention over them through a traced BlockMask
(:func:`attn_jax.topk_block_attention`; ``implementation=`` picks its backend).

No decoding: the selection of a query block pools the block's queries, which a decoded token
does not have until its block is complete, so a token-by-token decoder would not compute the
training forward (MoBA decodes with a per-token gate; that form is not built here).
"""

from __future__ import annotations

import dataclasses

import attn_jax
from attn_jax.layers import registry
from attn_jax.layers.mixers import common


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockTopKConfig(registry.MixerConfig):
  """Block top-k (shared fields: :class:`~attn_jax.layers.MixerConfig`).

  Attributes:
    block_size: tokens per query and key block (the kernels' tiles; a power of two >= 16 for the
      Pallas GPU kernel).
    top_k: key blocks kept per query block on top of its own (capped at the number of blocks).
  """

  block_size: int = 64
  top_k: int = 8

  def validate(self):
    super().validate()
    self.check_positive("block_size", allow_none=False)
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      raise self.error(f"top_k must be an int >= 0, got {self.top_k!r}")


class BlockTopKAttention(common.SparseAttention):
  """Projections, RoPE and :func:`attn_jax.topk_block_attention` (mixer protocol)."""

  NO_DECODE = ("its block selection pools a whole query block, which a decoded token does not have "
               "(MoBA's per-token decoding gate is not built)")

  def attend(self, q, k, v, **unused):
    c = self.config
    top_k = min(c.top_k, -(-k.shape[1] // c.block_size))  # more blocks than exist: all of them
    return attn_jax.topk_block_attention(q, k, v, block_size=c.block_size, top_k=top_k, causal=c.causal,
                                         implementation=c.implementation)


registry.register(registry.MixerEntry(
    name="block_topk",
    config=BlockTopKConfig,
    layer=BlockTopKAttention,
    family="softmax",
    cache=None,
    requires=("topk_block_attention",),
    uses_rope=True,
    description="block top-k selection (MoBA / NSA): own block + the top_k key blocks by pooled score, "
                "exact attention over them on a traced BlockMask; no decoding (selection pools query blocks)",
    paper="Lu et al. 2025, MoBA: Mixture of Block Attention for long-context LLMs (arXiv:2502.13189)",
    quality=(registry.QualityPreset(
        "block_topk", lambda t: dict(block_size=max(4, t.seq_len // 16), top_k=3),
        description="blocks of seq_len / 16, own block + top 3"),),
    efficiency=(registry.EfficiencyPreset(
        "block_topk64x8 (xla)", (("implementation", "xla"), ("block_size", 64), ("top_k", 8)),
        patterns=("causal_self",), default=False, quality="block_topk"),),
))
