"""Dynamic Hierarchical Sparse Attention, the ``"dhsa"`` mixer: chunk representatives (length-
normalised means), chunk-chunk similarity upsampled to token pairs, each query keeps the
``budget`` causal keys of highest score (:func:`attn_jax.mechanisms.dhsa_attention`).

Our choice, weaker than the paper: the chunks are fixed, ``chunk_size`` tokens each (the paper
predicts variable boundaries with a learned boundary predictor, Sec. 3.2, which is not built;
:func:`attn_jax.mechanisms.dhsa_attention` itself takes any nondecreasing chunk ids).

No decoding: a query's chunk representative averages every query of its chunk, including later
ones, so a decoded token cannot reproduce the training forward; not built.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from attn_jax import mechanisms
from attn_jax.layers import registry
from attn_jax.layers.mixers import common


@dataclasses.dataclass(frozen=True, kw_only=True)
class DHSAConfig(registry.MixerConfig):
  """DHSA (causal; shared fields: :class:`~attn_jax.layers.MixerConfig`).

  Attributes:
    chunk_size: tokens per chunk (fixed chunks; see the module docstring).
    budget: keys kept per query; capped at the sequence length.
    block_q, block_kv: tiles of the block-skipping computation (not semantic).
  """

  chunk_size: int = 32
  budget: int = 256
  block_q: int = 32
  block_kv: int = 64

  def validate(self):
    super().validate()
    self.check_causal_only()
    self.check_positive("chunk_size", "budget", "block_q", "block_kv", allow_none=False)


class DHSAAttention(common.SparseAttention):
  """Projections, RoPE and DHSA over fixed chunks (mixer protocol)."""

  NO_DECODE = "a chunk's representative averages all its queries, later ones included"

  def chunks(self, batch: int, seq_len: int):
    """``(chunk_ids [B, T], num_chunks)`` of the fixed chunks."""
    c = self.config
    ids = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32) // c.chunk_size, (batch, seq_len))
    return ids, -(-seq_len // c.chunk_size)

  def attend(self, q, k, v, **unused):
    c = self.config
    ids, n = self.chunks(q.shape[0], q.shape[1])
    return mechanisms.dhsa_attention(q, k, v, ids, num_chunks=n, budget=min(c.budget, q.shape[1]),
                                     block_q=c.block_q, block_kv=c.block_kv)


registry.register(registry.MixerEntry(
    name="dhsa",
    config=DHSAConfig,
    layer=DHSAAttention,
    family=None,
    cache=None,
    uses_rope=True,
    description="DHSA: chunk-level similarity (length-normalised chunk means) upsampled to tokens, top-budget "
                "causal keys per query; fixed chunks (no boundary predictor); no decoding",
    paper="Xiong et al. 2025, Long-context modeling with dynamic hierarchical sparse attention for "
          "on-device LLMs (arXiv:2510.24606)",
    quality=(registry.QualityPreset(
        "dhsa", lambda t: dict(chunk_size=max(2, t.seq_len // 16), budget=max(4, t.seq_len // 4),
                               block_q=max(2, t.seq_len // 16), block_kv=max(2, t.seq_len // 16)),
        description="chunks of seq_len / 16, budget seq_len / 4"),),
    efficiency=(registry.EfficiencyPreset(
        "dhsa32x256", (("chunk_size", 32), ("budget", 256)), patterns=("causal_self",), default=False,
        quality="dhsa"),),
))
