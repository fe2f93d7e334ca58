"""Pre-norm transformer blocks and per-layer schedules of mixers.

A schedule is a tuple of :class:`~attn_jax.layers.config.AttentionConfig`, cycled over the
layers, so a hybrid is one line::

    lin, attn = AttentionConfig(mechanism="linear"), AttentionConfig()
    schedule = (lin,) * 7 + (attn,)                                  # MiniMax-01: 7 linear : 1 softmax
    schedule = (AttentionConfig(mechanism="short_conv"), lin,
                AttentionConfig(window=64))                          # Based: conv, linear, sliding window
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from attn_jax.layers import attention
from attn_jax.layers import config as config_lib
from attn_jax.layers import mechanisms
from attn_jax.layers import nn


def expand_schedule(schedule: Sequence[config_lib.AttentionConfig] | config_lib.AttentionConfig,
                    num_layers: int) -> tuple[config_lib.AttentionConfig, ...]:
  """The mixer config of each of ``num_layers`` layers: ``schedule`` repeated cyclically."""
  if isinstance(schedule, config_lib.AttentionConfig):
    schedule = (schedule,)
  schedule = tuple(schedule)
  if not schedule:
    raise ValueError("schedule must name at least one mixer config, got an empty sequence")
  for i, c in enumerate(schedule):
    if not isinstance(c, config_lib.AttentionConfig):
      raise ValueError(f"schedule[{i}] must be an AttentionConfig, got {type(c).__name__}")
  return tuple(schedule[i % len(schedule)] for i in range(num_layers))


class Block(nnx.Module):
  """``x + mixer(norm(x))`` [``+ cross(norm(x), memory)``] ``+ mlp(norm(x))``.

  Args:
    mixer: the self-mixing layer's config (any registered mechanism).
    dim, mlp_dim: widths.
    cross: config of a cross-attention sublayer (encoder-decoder decoders), or None.
  """

  def __init__(self, mixer: config_lib.AttentionConfig, dim: int, mlp_dim: int, *, rngs: nnx.Rngs,
               cross: config_lib.AttentionConfig | None = None, memory_dim: int | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    self.mixer_norm = nn.RMSNorm(dim, **kw)
    self.mixer = mechanisms.build(mixer, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if cross is not None:
      if cross.mechanism != "softmax":
        raise mechanisms.UnsupportedConfigError(
            f"cross attention supports mechanism='softmax', got {cross.mechanism!r}")
      mechanisms.check(cross)
      self.cross_norm = nn.RMSNorm(dim, **kw)
      self.cross = attention.CrossAttention(cross, dim, rngs=rngs, memory_dim=memory_dim,
                                            dtype=dtype, param_dtype=param_dtype)
    else:
      self.cross_norm = None
      self.cross = None
    self.mlp_norm = nn.RMSNorm(dim, **kw)
    self.mlp = nn.SwiGLU(dim, mlp_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, *, positions, segment_ids=None, grid=None, memory=None, memory_mask=None):
    x = x + self.mixer(self.mixer_norm(x), positions=positions, segment_ids=segment_ids, grid=grid)
    if self.cross is not None:
      x = x + self.cross(self.cross_norm(x), memory, memory_mask=memory_mask)
    return x + self.mlp(self.mlp_norm(x))

  def init_cache(self, batch: int, max_len: int, dtype):
    """The mixer's cache (the cross-attention cache is made by :meth:`init_cross_cache`)."""
    return self.mixer.init_cache(batch, max_len, dtype)

  def init_cross_cache(self, memory):
    return self.cross.init_cache(memory)

  def prefill(self, x, cache, *, memory=None, memory_mask=None):
    y, cache = self.mixer.prefill(self.mixer_norm(x), cache)
    x = x + y
    if self.cross is not None:
      x = x + self.cross(self.cross_norm(x), memory, memory_mask=memory_mask)
    return x + self.mlp(self.mlp_norm(x)), cache

  def decode(self, x, cache, *, position, cross_cache=None, memory_mask=None):
    y, cache = self.mixer.decode(self.mixer_norm(x), cache, position=position)
    x = x + y
    if self.cross is not None:
      x = x + self.cross.decode(self.cross_norm(x), cross_cache, position=position,
                                memory_mask=memory_mask)
    return x + self.mlp(self.mlp_norm(x)), cache
