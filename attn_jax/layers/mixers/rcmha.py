"""RCMHA, relative convolutional multi-head attention, the ``"rcmha"`` mixer (Sugiharto et al.
2023, Sec. 3).

The projected queries, keys and values pass through causal depth-wise convolutions of width
``conv_size`` along the sequence, then attention scores get Transformer-XL's relative terms
``(q_i + u_h) . k_j + (q_i + w_h) . (W_R R(i - j))``
(:func:`attn_jax.mechanisms.rcmha_attention`, whose fast form appends the sinusoid features to
q and k so that every softmax backend runs it in ``O(T)`` memory). Positions are relative, so
``rope`` is not used.

Initialisation (ours): the convolutions start as the identity (last tap 1), ``u = w = 0``,
``W_R`` LeCun-normal.

Not yet: decoding (the three convolutions' histories and queries at a traced position) raises
``NotImplementedError``; packed documents (``segment_ids``) are refused.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from attn_jax import masks as masks_lib
from attn_jax import mechanisms
from attn_jax.layers import nn
from attn_jax.layers import registry
from attn_jax.layers.mixers import common


@dataclasses.dataclass(frozen=True, kw_only=True)
class RCMHAConfig(registry.MixerConfig):
  """RCMHA (causal; GQA allowed; ``rope`` unused: positions are relative).

  Attributes:
    conv_size: width of the depth-wise causal convolutions on q, k and v.
    relative_features: ``F``, the sinusoid of the distance has ``2F`` channels (None:
      ``head_dim // 2``, Transformer-XL's ``d_R = d``).
  """

  conv_size: int = 3
  relative_features: int | None = None

  def validate(self):
    super().validate()
    self.check_causal_only()
    self.check_positive("conv_size", allow_none=False)
    self.check_positive("relative_features")


def _identity(width, channels, param_dtype, axes):
  return nnx.Param(jnp.zeros((width, channels), param_dtype).at[-1].set(1.0), logical_axes=axes)


class RCMHA(nnx.Module):
  """Convolved q, k, v and Transformer-XL relative attention (mixer protocol without decoding)."""

  def __init__(self, config: RCMHAConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    del layer_index, num_layers
    self.config = config
    hq, hkv, d = config.num_heads, config.kv_heads, config.head_dim_for(dim)
    f = config.relative_features or max(1, d // 2)
    self.proj = common.Projections(config, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    w = config.conv_size
    self.conv_q = _identity(w, hq * d, param_dtype, ("conv", "heads"))
    self.conv_k = _identity(w, hkv * d, param_dtype, ("conv", "kv_heads"))
    self.conv_v = _identity(w, hkv * d, param_dtype, ("conv", "kv_heads"))
    self.rel_proj = nn.param(rngs, nn.fan_in_init(2 * f), (hq, 2 * f, d), ("heads", None, "head_dim"), param_dtype)
    self.u = nnx.Param(jnp.zeros((hq, d), param_dtype), logical_axes=("heads", "head_dim"))
    self.w = nnx.Param(jnp.zeros((hq, d), param_dtype), logical_axes=("heads", "head_dim"))
    self.mask = masks_lib.causal()

  def position_params(self):
    """``(conv_q, conv_k, conv_v, rel_proj, u, w)``, the arguments of ``rcmha_attention`` after q, k, v."""
    return tuple(p[...] for p in (self.conv_q, self.conv_k, self.conv_v, self.rel_proj, self.u, self.w))

  def __call__(self, x, *, segment_ids=None, **unused):
    """``x [B, T, C]`` -> ``[B, T, C]``."""
    common.no_segments("rcmha", segment_ids)
    q, k, v = self.proj.qkv(x)
    params = tuple(p.astype(q.dtype) for p in self.position_params())
    o = mechanisms.rcmha_attention(q, k, v, *params, mask=self.mask, implementation=self.config.implementation)
    return self.proj.o_proj(o)

  def init_cache(self, batch: int, max_len: int, dtype):
    raise NotImplementedError("mixer 'rcmha' does not decode yet (its cache would hold the q/k/v convolutions' "
                              "histories and relative features at a traced position); use the full call")


registry.register(registry.MixerEntry(
    name="rcmha",
    config=RCMHAConfig,
    layer=RCMHA,
    family="softmax",
    cache=None,
    description="relative convolutional multi-head attention: depth-wise causal convolutions on q, k, v and "
                "Transformer-XL relative position terms (as extra q/k channels: any softmax backend); "
                "no decoding yet",
    paper="Sugiharto et al. 2023, RCMHA: relative convolutional multi-head attention for natural language "
          "modelling",
    quality=(registry.QualityPreset("rcmha", description="RCMHA, convolutions of width 3"),),
    efficiency=(registry.EfficiencyPreset("rcmha (xla)", (("implementation", "xla"),),
                                          patterns=("causal_self",), default=False, quality="rcmha"),),
))
