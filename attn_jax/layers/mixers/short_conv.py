"""Gated causal short convolution (the convolution layers of H3 and Based), the ``"short_conv"`` mixer.

``y = out(conv(in(x)) * gate(x))`` with a depthwise causal convolution of width ``K`` over time
(:func:`attn_jax.mechanisms.short_conv`: ``conv(u)_t = sum_i w_i u_{t-K+1+i}``). Its decoding
cache is the last ``K - 1`` inputs of the convolution, a fixed-size pytree, so memory is
constant over a generation.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from attn_jax import mechanisms
from attn_jax import sharding
from attn_jax.layers import cache as cache_lib
from attn_jax.layers import nn
from attn_jax.layers import registry


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShortConvConfig(registry.MixerConfig):
  """Gated short convolution (causal only; heads, head dim and RoPE are not used).

  Attributes:
    conv_size: kernel width ``K`` (the current token and the ``K - 1`` before it).
  """

  conv_size: int = 4

  def validate(self):
    super().validate()
    self.check_positive("conv_size", allow_none=False)
    if not self.causal:
      raise self.error("is a causal convolution: set causal=True")


def advance(window, u):
  """The last ``K - 1`` inputs after appending ``u [B, T, C]`` to ``window [B, K - 1, C]``."""
  history = jnp.concatenate([window.astype(u.dtype), u], axis=1)
  return history[:, history.shape[1] - window.shape[1]:].astype(window.dtype)


class ShortConv(nnx.Module):
  """Gated causal depthwise convolution of width ``config.conv_size`` (mixer protocol)."""

  def __init__(self, config: ShortConvConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    del layer_index, num_layers
    self.width = config.conv_size
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.in_proj = nn.Dense(dim, dim, in_axes=("embed",), out_axes=("mlp",), **kw)
    self.gate_proj = nn.Dense(dim, dim, in_axes=("embed",), out_axes=("mlp",), **kw)
    self.out_proj = nn.Dense(dim, dim, in_axes=("mlp",), out_axes=("embed",), **kw)
    self.kernel = nn.param(rngs, nn.fan_in_init(self.width), (self.width, dim), ("conv", "mlp"),
                           param_dtype)

  def _mix(self, x, history, segment_ids=None):
    u = self.in_proj(x)
    conv = mechanisms.short_conv(u, self.kernel[...].astype(self.dtype), history=history,
                                 segment_ids=segment_ids)
    y = sharding.constrain(conv * self.gate_proj(x), ("batch", "seq", "act_mlp"))
    return self.out_proj(y), u

  def __call__(self, x, *, segment_ids=None, **unused):
    """``x [B, T, C]`` -> ``[B, T, C]``; ``segment_ids [B, T]`` keeps documents apart."""
    return self._mix(x, None, segment_ids)[0]

  def init_cache(self, batch: int, max_len: int, dtype) -> cache_lib.ConvCache:
    del max_len
    return cache_lib.ConvCache(jnp.zeros((batch, self.width - 1, self.kernel[...].shape[1]), dtype))

  def prefill(self, x, cache: cache_lib.ConvCache, **unused):
    y, u = self._mix(x, cache.window)
    return y, cache_lib.ConvCache(advance(cache.window, u))

  def decode(self, x, cache: cache_lib.ConvCache, **unused):
    y, u = self._mix(x, cache.window)
    return y, cache_lib.ConvCache(advance(cache.window, u))


registry.register(registry.MixerEntry(
    name="short_conv",
    config=ShortConvConfig,
    layer=ShortConv,
    family=None,
    cache=cache_lib.ConvCache,
    description="gated causal depthwise convolution over the last conv_size tokens",
    paper="Fu et al. 2023, Hungry Hungry Hippos (arXiv:2212.14052); Arora et al. 2024, Based",
    quality=(registry.QualityPreset("short_conv", description="gated short convolution of width 4"),),
    efficiency=(registry.EfficiencyPreset("short_conv", patterns=("causal_self",), default=False,
                                          quality="short_conv"),),
))
