"""Selective Attention, the ``"selective"`` mixer (Zhang et al., NeurIPS 2024, Sec. 3).

Softmax attention whose queries carry a token- and position-dependent inverse temperature
``tau(x_i, i) = tanh(x_i W_t) + 1 + softplus(s_h) log(1 + i)``
(:func:`attn_jax.mechanisms.selective_temperature`) and, with ``value_temperature``, whose values
are scaled by ``nu_j = 2 sigmoid(x_j W_n)`` (1 at initialisation, 0 suppresses a token).
Both temperatures are folded into the inputs (``tau_i q_i``, ``nu_j v_j``;
:func:`attn_jax.mechanisms.selective_attention`), so every backend of ``attn_jax.attention``
runs it and decoding is a plain KV cache whose values are stored already scaled.

Choices (the paper leaves the temperature networks open): ``W_t``, ``W_n`` are zero at
initialisation and ``s_h = -4`` (a position slope of 0.018), so the layer starts as plain
attention; the position of ``tau`` is the RoPE position (1-D positions) or the token index.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import attn_jax
from attn_jax import masks as masks_lib
from attn_jax import mechanisms
from attn_jax.layers import cache as cache_lib
from attn_jax.layers import nn
from attn_jax.layers import registry
from attn_jax.layers import rope as rope_lib
from attn_jax.layers.mixers import common


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelectiveConfig(registry.MixerConfig):
  """Selective attention (GQA allowed; causal or not; RoPE per ``rope``).

  Attributes:
    value_temperature: also learn the value temperature ``nu_j`` (Sec. 3.2).
  """

  value_temperature: bool = True

  def validate(self):
    super().validate()
    if not isinstance(self.value_temperature, bool):
      raise self.error(f"value_temperature must be a bool, got {self.value_temperature!r}")
    if self.rope > 1:
      raise self.error(f"rope must be 0 or 1 (the temperature reads 1-D positions), got {self.rope}")


def _zeros(shape, axes, param_dtype):
  return nnx.Param(jnp.zeros(shape, param_dtype), logical_axes=axes)


class SelectiveAttention(nnx.Module):
  """Softmax attention with query and value temperatures (mixer protocol)."""

  def __init__(self, config: SelectiveConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    del layer_index, num_layers
    self.config = config
    h, hkv = config.num_heads, config.kv_heads
    self.mask = masks_lib.causal() if config.causal else masks_lib.full()
    self.proj = common.Projections(config, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.temp_kernel = _zeros((dim, h), ("embed", "heads"), param_dtype)
    self.position_scale = nnx.Param(jnp.full((h,), -4.0, param_dtype), logical_axes=("heads",))
    self.value_kernel = _zeros((dim, hkv), ("embed", "kv_heads"), param_dtype) if config.value_temperature else None

  def _rope(self, x, positions):
    if self.config.rope == 0:
      return x
    return rope_lib.apply_rope(x, positions, theta=self.config.rope_theta)

  def temperatures(self, x, positions):
    """``tau [B, T, H]`` and ``nu [B, T, Hkv]`` (or None) of tokens ``x`` at ``positions [B, T]``."""
    xf = x.astype(jnp.float32)
    logits = jnp.einsum("btc,ch->bth", xf, self.temp_kernel[...].astype(jnp.float32))
    tau = mechanisms.selective_temperature(logits, positions, jax.nn.softplus(self.position_scale[...]))
    if self.value_kernel is None:
      return tau, None
    return tau, 2.0 * jax.nn.sigmoid(jnp.einsum("btc,ch->bth", xf, self.value_kernel[...].astype(jnp.float32)))

  def _inputs(self, x, positions):
    q, k, v = self.proj.qkv(x)
    tau, nu = self.temperatures(x, positions)
    return self._rope(q, positions), self._rope(k, positions), v, tau, nu

  def _positions(self, x, positions):
    b, t = x.shape[:2]
    if positions is None or positions.ndim != 2:
      return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return jnp.broadcast_to(positions, (b, t))

  def __call__(self, x, *, positions=None, segment_ids=None, **unused):
    """``x [B, T, C]``, ``positions [B, T]`` -> ``[B, T, C]``; ``segment_ids`` keep documents apart."""
    positions = self._positions(x, positions)
    q, k, v, tau, nu = self._inputs(x, positions)
    if segment_ids is None:
      o = mechanisms.selective_attention(q, k, v, tau, value_temperature=nu, mask=self.mask,
                                         implementation=self.config.implementation)
    else:  # the mechanism's fold, with the segment ids its signature does not take
      qt, vt = self._fold(q, v, tau, nu)
      o = attn_jax.attention(qt, k, vt, mask=self.mask, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                             implementation=self.config.implementation)
    return self.proj.o_proj(o)

  def _fold(self, q, v, tau, nu):
    qt = (q.astype(jnp.float32) * tau[..., None]).astype(q.dtype)
    return qt, v if nu is None else (v.astype(jnp.float32) * nu[..., None]).astype(v.dtype)

  def init_cache(self, batch: int, max_len: int, dtype) -> cache_lib.KVCache:
    if not self.config.causal:
      raise ValueError("mixer 'selective': decoding needs causal=True")
    d = self.proj.q_proj.kernel[...].shape[-1]
    return cache_lib.KVCache.create(batch, max_len, self.config.kv_heads, d, d, dtype)

  def prefill(self, x, cache: cache_lib.KVCache, **unused):
    positions = self._positions(x, None)
    q, k, v, tau, nu = self._inputs(x, positions)
    o = mechanisms.selective_attention(q, k, v, tau, value_temperature=nu, mask=self.mask,
                                       implementation=self.config.implementation)
    _, vt = self._fold(q, v, tau, nu)
    return self.proj.o_proj(o), cache.fill(k, vt).constrained()

  def decode(self, x, cache: cache_lib.KVCache, *, position, **unused):
    position = jnp.asarray(position, jnp.int32)
    q, k, v, tau, nu = self._inputs(x, jnp.full((x.shape[0], 1), position, jnp.int32))
    qt, vt = self._fold(q, v, tau, nu)
    cache = cache.append(k, vt, position).constrained()
    o = common.attend_cache(qt, cache.k, cache, position, self.mask, implementation=self.config.implementation)
    return self.proj.o_proj(o), cache


registry.register(registry.MixerEntry(
    name="selective",
    config=SelectiveConfig,
    layer=SelectiveAttention,
    family="softmax",
    cache=cache_lib.KVCache,
    uses_rope=True,
    description="softmax attention with a query- and position-dependent inverse temperature on the logits "
                "and a value temperature (both folded into q and v: any softmax backend, plain KV cache)",
    paper="Zhang et al. 2024, Selective attention: enhancing transformer through principled context control "
          "(NeurIPS 2024)",
    quality=(registry.QualityPreset("selective", description="selective attention with value temperature"),),
    efficiency=(registry.EfficiencyPreset("selective (xla)", (("implementation", "xla"),),
                                          patterns=("noncausal_self", "causal_self"), default=False,
                                          quality="selective"),),
))
