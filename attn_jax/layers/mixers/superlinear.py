"""Superlinear multi-step attention, the ``"superlinear"`` mixer: span search over aligned spans,
exact attention inside the ``top_k`` kept spans and the query's own span, combined by a softmax
over the search scores (:func:`attn_jax.mechanisms.superlinear_attention`; the choices the
paper's abstract leaves open are listed there).

No decoding: not built here (a decoder would need the span search over a growing cache; the
training form is causal, so it is possible, but the layer's reference point, the paper's
decoding procedure, was not available to us).
"""

from __future__ import annotations

import dataclasses

from attn_jax import mechanisms
from attn_jax.layers import registry
from attn_jax.layers.mixers import common


@dataclasses.dataclass(frozen=True, kw_only=True)
class SuperlinearConfig(registry.MixerConfig):
  """Superlinear attention (causal; shared fields: :class:`~attn_jax.layers.MixerConfig`).

  Attributes:
    span_size: tokens per span (``~ sqrt(T)`` for the ``O(T^1.5)`` regime); capped at the sequence.
    top_k: spans kept per query and head (capped at the number of complete spans).
  """

  span_size: int = 64
  top_k: int = 4

  def validate(self):
    super().validate()
    self.check_causal_only()
    self.check_positive("span_size", allow_none=False)
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      raise self.error(f"top_k must be an int >= 0, got {self.top_k!r}")


class SuperlinearAttention(common.SparseAttention):
  """Projections, RoPE and :func:`attn_jax.mechanisms.superlinear_attention` (mixer protocol)."""

  NO_DECODE = "the span search over a growing cache is not built"

  def attend(self, q, k, v, **unused):
    c = self.config
    span = min(c.span_size, q.shape[1])
    return mechanisms.superlinear_attention(q, k, v, span_size=span, top_k=min(c.top_k, q.shape[1] // span))


registry.register(registry.MixerEntry(
    name="superlinear",
    config=SuperlinearConfig,
    layer=SuperlinearAttention,
    family=None,
    cache=None,
    uses_rope=True,
    description="superlinear multi-step attention: span search over aligned spans, exact attention in the "
                "top_k spans + own span, gated by the search scores; no decoding (not built)",
    paper="Huang 2026, Superlinear multi-step attention (arXiv:2601.18401)",
    quality=(registry.QualityPreset(
        "superlinear", lambda t: dict(span_size=max(2, round(t.seq_len ** 0.5)), top_k=4),
        description="spans of sqrt(seq_len), top 4"),),
    efficiency=(registry.EfficiencyPreset(
        "superlinear64x4", (("span_size", 64), ("top_k", 4)), patterns=("causal_self",), default=False,
        quality="superlinear"),),
))
