"""Landmark Attention, the ``"landmark"`` mixer: a landmark per block of ``block_size`` tokens
gates its block through the grouped softmax; ``top_k`` retrieves the best blocks per query and
head (:func:`attn_jax.mechanisms.landmark_attention`).

Our choice for the landmark tokens: the paper inserts a learned token after every block and lets
the network compute its hidden state; inside one layer we take the block's mean input plus a
learned landmark embedding, project it with the layer's key projection and rotate it at the
position of the block's last token. ``top_k=None`` is the paper's training form (every earlier
block); set ``top_k`` for retrieval at inference (``config.replace(top_k=...)``).

No decoding: not built (the paper's generation keeps landmarks in the cache and retrieves per
step; with our in-layer landmarks a step would recompute its block's mean, which is possible but
not done here).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import attn_jax
from attn_jax import masks as masks_lib
from attn_jax import mechanisms
from attn_jax.layers import registry
from attn_jax.layers.mixers import common


@dataclasses.dataclass(frozen=True, kw_only=True)
class LandmarkConfig(registry.MixerConfig):
  """Landmark attention (causal; shared fields: :class:`~attn_jax.layers.MixerConfig`).

  Attributes:
    block_size: tokens per block ``l`` (one landmark per complete block).
    top_k: None (every earlier block: training) or blocks retrieved per query and head.
  """

  block_size: int = 64
  top_k: int | None = None

  def validate(self):
    super().validate()
    self.check_causal_only()
    self.check_positive("block_size", allow_none=False)
    if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0):
      raise self.error(f"top_k must be None or an int >= 0, got {self.top_k!r}")


class LandmarkAttention(common.SparseAttention):
  """Projections, RoPE, landmark keys and the grouped softmax (mixer protocol)."""

  NO_DECODE = "generation with landmark retrieval over a cache is not built"

  def __init__(self, config: LandmarkConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    super().__init__(config, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype, layer_index=layer_index,
                     num_layers=num_layers)
    self.landmark = nnx.Param(0.02 * jax.random.normal(rngs.params(), (dim,), param_dtype), logical_axes=("embed",))

  def landmark_keys(self, x, positions):
    """``[B, T // l, Hkv, D]``: keys of the landmarks of the complete blocks."""
    b, t, dim = x.shape
    l = self.config.block_size
    nb = t // l
    mean = x[:, :nb * l].reshape(b, nb, l, dim).mean(2) + self.landmark[...].astype(x.dtype)
    pos = jnp.broadcast_to(positions, (b, t))[:, l - 1:nb * l:l]
    return common.rope_1d(self.config, common.heads(self.proj.k_proj, mean, common.KV_SPEC), pos)

  def attend(self, q, k, v, *, x, positions, **unused):
    c = self.config
    nb = q.shape[1] // c.block_size
    if nb == 0:  # no complete block: the grouped softmax is over the own (partial) block alone
      return attn_jax.attention(q, k, v, mask=masks_lib.causal())
    top_k = None if c.top_k is None else min(c.top_k, nb)
    return mechanisms.landmark_attention(q, k, v, self.landmark_keys(x, positions), block_size=c.block_size,
                                         top_k=top_k)


registry.register(registry.MixerEntry(
    name="landmark",
    config=LandmarkConfig,
    layer=LandmarkAttention,
    family=None,
    cache=None,
    uses_rope=True,
    description="Landmark Attention: a landmark per block gates it in a grouped softmax; top_k block "
                "retrieval per query and head at inference; no decoding (not built)",
    paper="Mohtashami & Jaggi 2023, Landmark attention: random-access infinite context length for "
          "transformers (arXiv:2305.16300)",
    quality=(registry.QualityPreset(
        "landmark", lambda t: dict(block_size=max(2, t.seq_len // 16)),
        description="blocks of seq_len / 16, trained over every block"),),
    efficiency=(registry.EfficiencyPreset(
        "landmark64 top4", (("block_size", 64), ("top_k", 4)), patterns=("causal_self",), default=False,
        quality="landmark"),),
))
