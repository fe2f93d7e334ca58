"""``AttentionConfig``: one token-mixing layer, described as data.

The ``mechanism`` field names an entry of :mod:`attn_jax.layers.mechanisms`; the other fields are
read by the mechanisms they concern (the docstring says which). A config is a frozen, hashable
dataclass, so it can live in an ``ml_collections`` config, be compared, and serve as a static
attribute of an ``nnx`` module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from attn_jax import masks as masks_lib

ROPE_MODES = ("absolute", "cache")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Configuration of a token mixer (attention or another sequence mixer).

  Shared by every mechanism:
    mechanism: registry name: ``"softmax"``, ``"neighborhood"``, ``"linear"``, ``"short_conv"``
      (see ``attn_jax.layers.mechanisms.names()``).
    num_heads: query heads.
    num_kv_heads: key/value heads (GQA / MQA); None means ``num_heads``.
    head_dim: per-head width; None means ``dim // num_heads``.
    causal: causal self-attention (decoders) or not (encoders, ViT). For cross attention: the
      causal cross pattern (decoder position ``i`` sees memory positions ``j <= i``).
    rope: number of RoPE axes: 0 (none), 1 (sequence), 2 or 3 (per-axis RoPE on token grids).
      Read by softmax and neighborhood attention; the linear family and convolutions ignore it.
    rope_theta: RoPE base wavelength.
    implementation: backend of the primitive (``None``: the platform's default).

  Softmax (``"softmax"``):
    window: sliding window: a causal query sees itself and the ``window - 1`` keys before it; a
      non-causal query sees ``window // 2`` keys on each side.
    num_sink_tokens: the first ``n`` keys stay visible to every query (StreamingLLM), still
      subject to causality.
    chunk_size: chunked causal attention (Llama 4): keys of the query's own chunk only.
    mask: an explicit :mod:`attn_jax.masks` mask (block-sparse layout, prefix-LM, your own
      predicate). It replaces ``causal`` / ``window`` / ``chunk_size`` / ``num_sink_tokens``.
    learned_sinks: one learned logit per head in the softmax denominator (gpt-oss).
    logits_soft_cap: Gemma-2 soft-capping of the logits.
    shard_map: wrap the attention call in ``shard_map`` over batch and heads (needed by
      kernels XLA cannot partition). None: exactly when ``implementation`` names a Pallas kernel.
    rolling_cache: decode with a cache of ``num_sink_tokens + window`` slots (StreamingLLM).
      None: whenever the mask is a causal window (with or without sinks).
    rope_in_cache: RoPE positions with a rolling cache: ``"absolute"`` (keys rotated once, at
      their original position, when inserted; exact equivalent of the window + sink mask on the
      whole sequence) or ``"cache"`` (keys stored unrotated and rotated at their position
      *inside* the cache at every step, as StreamingLLM does, which keeps positions below
      ``num_sink_tokens + window`` however long the generation).

  Neighborhood (``"neighborhood"``, ``attn_jax.neighborhood_attention`` on the token grid):
    kernel_size, stride, dilation: per axis (an int applies to every axis).

  Linear family (``"linear"``, ``attn_jax.linear_attention``):
    feature_map: passed to the primitive: ``"identity"``, ``"elu_plus_one"``, ``"relu"``,
      ``"taylor"`` (Based) or a function (see :func:`attn_jax.linear_attention`).
    decay: ``"none"``, ``"fixed"`` (per-head ALiBi-like slopes: Lightning / RetNet) or ``"data"``
      (a per-step, per-head log decay from the input: simple GLA / Mamba-2).
    normalize: divide by ``phi(q) . z`` (normalised linear attention).
    output_norm: RMS-normalise each head's output (Lightning / RetNet's group norm).
    linear_chunk_size: chunk size of the chunked form (None: the primitive's default).

  Short convolution (``"short_conv"``, Based / H3's causal depthwise convolution):
    conv_size: kernel width.
  """

  mechanism: str = "softmax"
  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int | None = None
  causal: bool = True
  rope: int = 1
  rope_theta: float = 10000.0
  implementation: str | None = None

  window: int | None = None
  num_sink_tokens: int = 0
  chunk_size: int | None = None
  mask: Any = None
  learned_sinks: bool = False
  logits_soft_cap: float | None = None
  shard_map: bool | None = None
  rolling_cache: bool | None = None
  rope_in_cache: str = "absolute"

  kernel_size: Any = 7
  stride: Any = 1
  dilation: Any = 1

  feature_map: str = "elu_plus_one"
  decay: str = "none"
  normalize: bool = True
  output_norm: bool = True
  linear_chunk_size: int | None = None

  conv_size: int = 4

  def replace(self, **changes) -> "AttentionConfig":
    return dataclasses.replace(self, **changes)

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  def head_dim_for(self, dim: int) -> int:
    return dim // self.num_heads if self.head_dim is None else self.head_dim

  def build_mask(self) -> masks_lib.Mask:
    """The softmax mask this config describes (self attention)."""
    if self.mask is not None:
      return self.mask
    parts = []
    if self.window is not None:
      if self.causal:
        parts.append(masks_lib.sliding_window(self.window - 1))
      else:
        parts.append(masks_lib.sliding_window(self.window // 2, self.window // 2))
    if self.chunk_size is not None:
      parts.append(masks_lib.chunked_causal(self.chunk_size))
    if not parts:
      parts.append(masks_lib.causal() if self.causal else masks_lib.full())
    mask = parts[0]
    for p in parts[1:]:
      mask = mask & p
    if self.num_sink_tokens:
      # Non-causal (encoder) sinks are global tokens: visible to every query.
      mask = mask | masks_lib.sink_tokens(self.num_sink_tokens, causal=self.causal)
      if self.causal:
        # A sink must not expose a future token to the first num_sink_tokens queries.
        mask = mask & masks_lib.causal()
    return mask

  @property
  def uses_rolling_cache(self) -> bool:
    eligible = (self.mask is None and self.causal and self.window is not None
                and self.chunk_size is None)
    return eligible if self.rolling_cache is None else self.rolling_cache
