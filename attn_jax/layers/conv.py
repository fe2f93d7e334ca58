"""Gated causal short convolution (the convolution layers of Based / H3), the ``"short_conv"`` mixer.

``y = out(conv(in(x)) * gate(x))`` with a depthwise causal convolution of width ``K`` over time:
``conv(u)_t = sum_i w_i u_{t-K+1+i}``. Its decoding cache is the last ``K - 1`` inputs of the
convolution, a fixed-size pytree, so memory is constant over a generation.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attn_jax import sharding
from attn_jax.layers import cache as cache_lib
from attn_jax.layers import config as config_lib
from attn_jax.layers import nn


class ShortConv(nnx.Module):
  """Gated causal depthwise convolution of width ``config.conv_size``."""

  def __init__(self, config: config_lib.AttentionConfig, dim: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.width = config.conv_size
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.in_proj = nn.Dense(dim, dim, in_axes=("embed",), out_axes=("mlp",), **kw)
    self.gate_proj = nn.Dense(dim, dim, in_axes=("embed",), out_axes=("mlp",), **kw)
    self.out_proj = nn.Dense(dim, dim, in_axes=("mlp",), out_axes=("embed",), **kw)
    self.kernel = nn.param(rngs, nn.fan_in_init(self.width), (self.width, dim), ("conv", "mlp"),
                           param_dtype)

  def _conv(self, u, history, segment_ids=None):
    """Causal conv of ``u [B, T, C]`` preceded by ``history [B, K-1, C]``."""
    k = self.width
    t = u.shape[1]
    full = jnp.concatenate([history.astype(u.dtype), u], axis=1)  # [B, K-1+T, C]
    w = self.kernel[...].astype(self.dtype)
    out = jnp.zeros_like(u)
    for i in range(k):
      shift = k - 1 - i  # tap i reads u_{t - shift}
      term = full[:, i:i + t] * w[i]
      if segment_ids is not None and shift:
        # Inputs of another document (packed sequences) do not leak through the kernel.
        prev = jnp.pad(segment_ids, ((0, 0), (shift, 0)), constant_values=-1)[:, :t]
        term = jnp.where((prev == segment_ids)[..., None], term, 0)
      out = out + term
    return out

  def _mix(self, x, history, segment_ids=None):
    u = self.in_proj(x)
    y = self._conv(u, history, segment_ids) * self.gate_proj(x)
    y = sharding.constrain(y, ("batch", "seq", "act_mlp"))
    return self.out_proj(y), u

  def __call__(self, x, *, segment_ids=None, **unused):
    """``x [B, T, C]`` -> ``[B, T, C]``; ``segment_ids [B, T]`` keeps documents apart."""
    history = jnp.zeros((x.shape[0], self.width - 1, self.kernel[...].shape[1]), x.dtype)
    return self._mix(x, history, segment_ids)[0]

  def init_cache(self, batch: int, max_len: int, dtype) -> cache_lib.ConvCache:
    del max_len
    return cache_lib.ConvCache(jnp.zeros((batch, self.width - 1, self.kernel[...].shape[1]), dtype))

  def _advance(self, cache, u):
    history = jnp.concatenate([cache.window.astype(u.dtype), u], axis=1)
    return cache_lib.ConvCache(history[:, history.shape[1] - (self.width - 1):].astype(cache.window.dtype))

  def prefill(self, x, cache: cache_lib.ConvCache, **unused):
    y, u = self._mix(x, cache.window)
    return y, self._advance(cache, u)

  def decode(self, x, cache: cache_lib.ConvCache, **unused):
    y, u = self._mix(x, cache.window)
    return y, self._advance(cache, u)
