"""Neighborhood attention, the ``"neighborhood"`` mixer, on ``attn_jax.neighborhood_attention``.

Tokens arrive flattened, ``[B, T, C]`` with ``T = prod(grid)`` in row-major order (a ViT's
patches, or a sequence when ``grid`` is None), and are viewed as the grid ``[B, *grid, H, D]``
for the primitive, whose semantics (window shifted inward at borders, stride, dilation,
causal per axis) are NATTEN's. Per-axis RoPE is applied to the flattened queries and keys.

Decoding: a causal 1D neighborhood with stride 1 is a dilated causal sliding window (query ``p``
sees the ``kernel_size`` keys ``p, p - d, ..., p - (kernel_size - 1) d``, fewer at the start), so
it decodes with a rolling :class:`~attn_jax.layers.cache.KVCache` of ``(kernel_size - 1) d + 1``
slots; the prompt is prefilled by ``attn_jax.attention`` under that mask (which also serves
prompts shorter than the ``kernel_size * dilation`` the primitive needs). Grids and non-causal
neighborhoods have no decoding form.

For a standalone layer that takes the grid directly (with sinks and context tokens) see
:class:`attn_jax.layers.NeighborhoodAttention`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
from flax import nnx

import attn_jax
from attn_jax import masks as masks_lib
from attn_jax.layers import cache as cache_lib
from attn_jax.layers import registry
from attn_jax.layers import rope as rope_lib
from attn_jax.layers.mixers import common

PRIMITIVE = "neighborhood_attention"


@dataclasses.dataclass(frozen=True, kw_only=True)
class NeighborhoodConfig(registry.MixerConfig):
  """Neighborhood attention (no GQA: ``num_kv_heads`` must equal ``num_heads``).

  Attributes:
    kernel_size, stride, dilation: per grid axis; an int applies to every axis.
  """

  kernel_size: Any = 7
  stride: Any = 1
  dilation: Any = 1

  def validate(self):
    super().validate()
    for name in ("kernel_size", "stride", "dilation"):
      value = getattr(self, name)
      if isinstance(value, list):
        value = tuple(value)
        object.__setattr__(self, name, value)  # a hashable config: tuples, not lists
      values = value if isinstance(value, tuple) else (value,)
      if not values or not all(registry._positive_int(v) for v in values):
        raise self.error(f"{name} must be a positive int or a tuple of them, got {value!r}")
    self.check_no_grouped_heads()

  @property
  def decodes(self) -> bool:
    """Causal, stride 1 and one axis (an int or a 1-tuple per field): a dilated causal window."""
    one_axis = all(not isinstance(v, tuple) or len(v) == 1 for v in (self.kernel_size, self.stride, self.dilation))
    return self.causal and one_axis and _first(self.stride) == 1 and self.rope <= 1


def _first(v):
  """The value of a 1D per-axis field (an int or a 1-tuple)."""
  return v[0] if isinstance(v, tuple) else v


class NeighborhoodMixer(nnx.Module):
  """Neighborhood attention over a 1D/2D/3D token grid (mixer protocol)."""

  def __init__(self, config: NeighborhoodConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    del layer_index, num_layers
    self.config = config
    self.proj = common.Projections(config, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if config.decodes:
      k, d = _first(config.kernel_size), _first(config.dilation)
      self.span = (k - 1) * d + 1
      # Same residue class modulo the dilation, within the last (k - 1) d + 1 positions.
      window = masks_lib.sliding_window(self.span - 1) & masks_lib.causal()
      self.decode_mask = window if d == 1 else window & masks_lib.from_fn(
          lambda q, kv: (q - kv) % d == 0, name=f"dilation_{d}")
    else:
      self.span = None
      self.decode_mask = None

  def _qkv(self, x, positions):
    c = self.config
    q, k, v = self.proj.qkv(x)
    if c.rope:
      q = rope_lib.apply_rope(q, positions, theta=c.rope_theta)
      k = rope_lib.apply_rope(k, positions, theta=c.rope_theta)
    return q, k, v

  def __call__(self, x, *, positions, grid=None, segment_ids=None, **unused):
    """``x [B, T, C]`` on ``grid`` (a shape with ``prod(grid) == T``; default ``(T,)``)."""
    c = self.config
    common.no_segments("neighborhood", segment_ids)
    b, t = x.shape[:2]
    grid = (t,) if grid is None else tuple(grid)
    if math.prod(grid) != t:
      raise ValueError(f"grid {grid} does not hold the {t} tokens of x")
    q, k, v = self._qkv(x, positions)
    shape = (b,) + grid + q.shape[2:]
    fn = getattr(attn_jax, PRIMITIVE)
    out = fn(q.reshape(shape), k.reshape(shape), v.reshape(shape), c.kernel_size, c.stride,
             c.dilation, c.causal, implementation=c.implementation)
    return self.proj.o_proj(out.reshape(q.shape))

  def init_cache(self, batch: int, max_len: int, dtype) -> cache_lib.KVCache:
    del max_len
    if not self.config.decodes:
      raise ValueError(
          "mixer 'neighborhood' decodes a causal 1D neighborhood with stride 1 and rope <= 1 only (a "
          f"dilated causal window); got causal={self.config.causal}, kernel_size={self.config.kernel_size}, "
          f"stride={self.config.stride}, rope={self.config.rope}")
    c = self.config
    d = self.proj.q_proj.kernel[...].shape[-1]
    return cache_lib.KVCache.create(batch, 0, c.kv_heads, d, d, dtype, window=self.span)

  def prefill(self, x, cache: cache_lib.KVCache, **unused):
    b, t = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q, k, v = self._qkv(x, positions)
    out = attn_jax.attention(q, k, v, mask=self.decode_mask, implementation=self.config.implementation)
    return self.proj.o_proj(out), cache.fill(k, v).constrained()

  def decode(self, x, cache: cache_lib.KVCache, *, position, **unused):
    b = x.shape[0]
    position = jnp.asarray(position, jnp.int32)
    q, k, v = self._qkv(x, jnp.full((b, 1), position, jnp.int32))
    cache = cache.append(k, v, position).constrained()
    out = common.attend_cache(q, cache.k, cache, position, self.decode_mask,
                              implementation=self.config.implementation)
    return self.proj.o_proj(out), cache


registry.register(registry.MixerEntry(
    name="neighborhood",
    config=NeighborhoodConfig,
    layer=NeighborhoodMixer,
    family="softmax",  # neighborhood attention runs on the softmax backends (block-sparse engine)
    cache=cache_lib.KVCache,
    requires=(PRIMITIVE,),
    uses_rope=True,
    description="neighborhood attention on 1D/2D/3D token grids (kernel, stride, dilation, causal per "
                "axis); decodes as a dilated causal window in 1D",
    paper="Hassani et al. 2023, Neighborhood attention transformer (arXiv:2204.07143)",
    quality=(registry.QualityPreset("neighborhood", lambda t: dict(kernel_size=max(2, t.seq_len // 4)),
                                    description="causal 1D neighborhood of seq_len / 4 tokens"),),
    efficiency=(registry.EfficiencyPreset("neighborhood k=64 (default backend)", (("kernel_size", 64),),
                                          default=False, quality="neighborhood"),),
))
