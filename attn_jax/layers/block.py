"""Pre-norm transformer blocks and per-layer schedules of mixers.

A schedule is a typed mixer config (:func:`attn_jax.layers.mixer_config`) or a tuple of them,
cycled over the layers, so a hybrid is one line::

    lin, attn = mixer_config("linear"), mixer_config("softmax")
    schedule = (lin,) * 7 + (attn,)                                  # MiniMax-01: 7 linear : 1 softmax
    schedule = (mixer_config("short_conv"), lin,
                mixer_config("softmax", window=64))                  # conv, linear, sliding window
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from attn_jax.layers import nn
from attn_jax.layers import registry


def expand_schedule(schedule: Sequence[registry.MixerConfig] | registry.MixerConfig,
                    num_layers: int) -> tuple[registry.MixerConfig, ...]:
  """The mixer config of each of ``num_layers`` layers: ``schedule`` repeated cyclically."""
  if isinstance(schedule, registry.MixerConfig):
    schedule = (schedule,)
  schedule = tuple(schedule)
  if not schedule:
    raise ValueError("schedule must name at least one mixer config, got an empty sequence")
  for i, c in enumerate(schedule):
    if not isinstance(c, registry.MixerConfig):
      raise ValueError(f"schedule[{i}] must be a mixer config (attn_jax.layers.mixer_config(name, ...)), "
                       f"got {type(c).__name__}")
  return tuple(schedule[i % len(schedule)] for i in range(num_layers))


class Block(nnx.Module):
  """``x + mixer(norm(x))`` [``+ cross(norm(x), memory)``] ``+ mlp(norm(x))``.

  Args:
    mixer: the self-mixing layer's config (any registered mechanism).
    dim, mlp_dim: widths.
    cross: config of a cross-attention sublayer (encoder-decoder decoders; its mechanism must
      have a cross form, e.g. ``"softmax"``), or None.
    layer_index, num_layers: the block's depth, passed to the mixer.
  """

  def __init__(self, mixer: registry.MixerConfig, dim: int, mlp_dim: int, *, rngs: nnx.Rngs,
               cross: registry.MixerConfig | None = None, memory_dim: int | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    self.mixer_norm = nn.RMSNorm(dim, **kw)
    self.mixer = registry.build(mixer, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                layer_index=layer_index, num_layers=num_layers)
    if cross is not None:
      self.cross_norm = nn.RMSNorm(dim, **kw)
      self.cross = registry.build_cross(cross, dim, rngs=rngs, memory_dim=memory_dim, dtype=dtype,
                                        param_dtype=param_dtype)
    else:
      self.cross_norm = None
      self.cross = None
    self.mlp_norm = nn.RMSNorm(dim, **kw)
    self.mlp = nn.SwiGLU(dim, mlp_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, *, positions, segment_ids=None, grid=None, memory=None, memory_mask=None,
               **inputs):
    """``x [B, T, C]`` -> ``(x [B, T, C], aux_losses)`` (the mixer's auxiliary losses, often ``{}``)."""
    y, aux = registry.split_output(
        self.mixer(self.mixer_norm(x), positions=positions, segment_ids=segment_ids, grid=grid, **inputs))
    x = x + y
    if self.cross is not None:
      x = x + self.cross(self.cross_norm(x), memory, memory_mask=memory_mask)
    return x + self.mlp(self.mlp_norm(x)), aux

  def init_cache(self, batch: int, max_len: int, dtype):
    """The mixer's cache (the cross-attention cache is made by :meth:`init_cross_cache`)."""
    return self.mixer.init_cache(batch, max_len, dtype)

  def init_cross_cache(self, memory):
    return self.cross.init_cache(memory)

  def prefill(self, x, cache, *, memory=None, memory_mask=None, **inputs):
    y, cache = self.mixer.prefill(self.mixer_norm(x), cache, **inputs)
    x = x + y
    if self.cross is not None:
      x = x + self.cross(self.cross_norm(x), memory, memory_mask=memory_mask)
    return x + self.mlp(self.mlp_norm(x)), cache

  def decode(self, x, cache, *, position, cross_cache=None, memory_mask=None, **inputs):
    y, cache = self.mixer.decode(self.mixer_norm(x), cache, position=position, **inputs)
    x = x + y
    if self.cross is not None:
      x = x + self.cross.decode(self.cross_norm(x), cross_cache, position=position,
                                memory_mask=memory_mask)
    return x + self.mlp(self.mlp_norm(x)), cache
