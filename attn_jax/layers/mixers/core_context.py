"""Core Context Aware attention, the ``"core_context"`` mixer: each group of ``group_size`` tokens
is pooled into a core token (importance-weighted by its last query) and every query attends, in
one softmax, to the cores of the groups outside its local window and to the original tokens of
the window (:func:`attn_jax.mechanisms.core_context_attention`, a static mask with analytic block
bounds over cores + tokens, so ``implementation=`` picks any backend of ``attn_jax.attention``).

The window is capped at the sequence rounded up to whole groups (a window covering the sequence
is dense causal attention); a sequence shorter than one group has no core token and is dense.

No decoding: possible in principle (cores depend on complete groups only), not built here.
"""

from __future__ import annotations

import dataclasses

import attn_jax
from attn_jax import masks as masks_lib
from attn_jax import mechanisms
from attn_jax.layers import registry
from attn_jax.layers.mixers import common


@dataclasses.dataclass(frozen=True, kw_only=True)
class CoreContextConfig(registry.MixerConfig):
  """CCA attention (causal; shared fields: :class:`~attn_jax.layers.MixerConfig`).

  Attributes:
    group_size: tokens pooled into one core token ``g``.
    local_window: tokens of the locality-preserving window, a multiple of ``group_size``.
  """

  group_size: int = 16
  local_window: int = 64

  def validate(self):
    super().validate()
    self.check_causal_only()
    self.check_positive("group_size", "local_window", allow_none=False)
    if self.local_window % self.group_size:
      raise self.error(f"local_window ({self.local_window}) must be a multiple of group_size ({self.group_size})")


class CoreContextAttention(common.SparseAttention):
  """Projections, RoPE and CCA attention (mixer protocol)."""

  NO_DECODE = "a decoder over cores of complete groups plus the window is not built"

  def attend(self, q, k, v, **unused):
    c = self.config
    t = q.shape[1]
    if c.group_size > t:
      return attn_jax.attention(q, k, v, mask=masks_lib.causal(), implementation=c.implementation)
    window = min(c.local_window, -(-t // c.group_size) * c.group_size)
    return mechanisms.core_context_attention(q, k, v, group_size=c.group_size, window=window,
                                             implementation=c.implementation)


registry.register(registry.MixerEntry(
    name="core_context",
    config=CoreContextConfig,
    layer=CoreContextAttention,
    family="softmax",
    cache=None,
    uses_rope=True,
    description="Core Context Aware attention: groups pooled into core tokens + a local window of original "
                "tokens, one softmax, a static block-sparse mask; no decoding (not built)",
    paper="Chen et al. 2025, Core context aware transformers for long context language modeling (ICML 2025)",
    quality=(registry.QualityPreset(
        "core_context", lambda t: dict(group_size=max(2, t.seq_len // 16), local_window=2 * max(2, t.seq_len // 16)),
        description="groups of seq_len / 16, window of two groups"),),
    efficiency=(registry.EfficiencyPreset(
        "core_context16+256 (xla)", (("implementation", "xla"), ("group_size", 16), ("local_window", 256)),
        patterns=("causal_self",), default=False, quality="core_context"),),
))
