"""RetNet's multi-scale retention, the ``"retnet"`` mixer.

``y = Wo (swish(x Wg) * GroupNorm_heads(Retention(x Wq, x Wk, x Wv)))`` with per-head decays
``gamma_h = 1 - 2^(-5-h)`` (:func:`attn_jax.mechanisms.retention`). RetNet's xPos rotation of q
and k is not applied. Decoding keeps the ``[B, H, D, Dv]`` retention state.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn_jax import mechanisms
from attn_jax.layers import cache as cache_lib
from attn_jax.layers import nn
from attn_jax.layers import registry
from attn_jax.layers.mixers import common
from attn_jax.layers.mixers import linear


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetNetConfig(registry.MixerConfig):
  """Multi-scale retention (causal; no GQA; ``rope`` is not used).

  Attributes:
    value_dim: per-head value width (RetNet uses twice the key width); None: ``head_dim``.
    chunk_size: chunk size of the chunkwise form (None: the backend's default).
  """

  value_dim: int | None = None
  chunk_size: int | None = None

  def validate(self):
    super().validate()
    self.check_causal_only()
    self.check_no_grouped_heads()
    self.check_positive("value_dim", "chunk_size")


def head_group_norm(x, scale, bias, eps=1e-6):
  """RetNet's group norm: one group per head, per token (``x [..., H, D]``, affine ``[H, D]``)."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = ((xf - mean) ** 2).mean(-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


class MultiScaleRetention(nnx.Module):
  """Multi-scale retention with group norm and swish gate (mixer protocol)."""

  def __init__(self, config: RetNetConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    del layer_index, num_layers
    self.config = config
    h, d = config.num_heads, config.head_dim_for(dim)
    dv = config.value_dim or d
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gammas = tuple(float(g) for g in mechanisms.retnet_decays(h))
    self.proj = common.Projections(config, dim, v_dim=dv, **kw)
    self.gate = nn.Dense(dim, (h, dv), in_axes=("embed",), out_axes=("heads", "head_dim"), **kw)
    self.norm_scale = nnx.Param(jnp.ones((h, dv), param_dtype), logical_axes=("heads", "head_dim"))
    self.norm_bias = nnx.Param(jnp.zeros((h, dv), param_dtype), logical_axes=("heads", "head_dim"))

  def _finish(self, o, x):
    o = head_group_norm(o, self.norm_scale[...], self.norm_bias[...])
    return self.proj.o_proj(jax.nn.swish(common.heads(self.gate, x)) * o)

  def _retain(self, q, k, v, **kw):
    c = self.config
    return mechanisms.retention(q, k, v, np.asarray(self.gammas, np.float32), chunk_size=c.chunk_size,
                                implementation=c.implementation, **kw)

  def __call__(self, x, *, segment_ids=None, **unused):
    """``x [B, T, C]`` -> ``[B, T, C]``; ``segment_ids`` restart the state per document."""
    q, k, v = self.proj.qkv(x)
    return self._finish(self._retain(q, k, v, segment_ids=segment_ids), x)

  def init_cache(self, batch: int, max_len: int, dtype) -> cache_lib.RecurrentCache:
    del max_len
    c = self.config
    d, dv = self.proj.q_proj.kernel[...].shape[-1], self.proj.v_proj.kernel[...].shape[-1]
    return cache_lib.RecurrentCache(jnp.zeros((batch, c.num_heads, d, dv), jnp.float32))

  def prefill(self, x, cache: cache_lib.RecurrentCache, **unused):
    q, k, v = self.proj.qkv(x)
    o, state = self._retain(q, k, v, initial_state=cache.state, return_final_state=True)
    return self._finish(o, x), cache_lib.RecurrentCache(state)

  def decode(self, x, cache: cache_lib.RecurrentCache, **unused):
    q, k, v = self.proj.qkv(x)
    log_decay = jnp.log(jnp.asarray(self.gammas, jnp.float32))
    state, o = linear.step_fn("retnet")(cache.state, q[:, 0], k[:, 0], v[:, 0], log_decay,
                                        scale=1.0 / math.sqrt(q.shape[-1]))
    return self._finish(o[:, None], x), cache_lib.RecurrentCache(state)


registry.register(registry.MixerEntry(
    name="retnet",
    config=RetNetConfig,
    layer=MultiScaleRetention,
    family="linear",
    cache=cache_lib.RecurrentCache,
    requires=(linear.PRIMITIVE,),
    description="multi-scale retention: per-head decays 1 - 2^(-5-h), group norm, swish gate (no xPos)",
    paper="Sun et al. 2023, Retentive network: a successor to Transformer (arXiv:2307.08621)",
    quality=(registry.QualityPreset("retnet", description="multi-scale retention"),),
    efficiency=(registry.EfficiencyPreset("retnet (xla)", (("implementation", "xla"),), patterns=("causal_self",),
                                          default=False, quality="retnet"),),
))
