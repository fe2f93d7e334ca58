"""Compressed Convolutional Attention, the ``"compressed_conv"`` mixer (Figliolia et al. 2025):
CCA, and CCGQA when ``num_kv_heads < num_heads``.

``x`` is down-projected to latent queries ``[B, T, Hq, d]``, keys ``[B, T, Hkv, d]`` and two
value projections combined by the value shift (half the heads read token ``t - 1``), with
``d = head_dim // compression``; attention runs entirely in the latent
(:func:`attn_jax.mechanisms.compressed_conv_attention`: two causal convolutions on q and k, the
q-k mean, L2 normalisation with a learned temperature, RoPE on the latents) and the output is
up-projected from ``Hq * d`` channels. Parameters, attention FLOPs and the KV cache (when it
exists) shrink by ``compression``.

Initialisation (ours): both convolutions start as the identity (last tap 1, the channel-mixing
one the identity matrix), so the layer starts as normalised attention plus the q-k mean; the
temperature starts at ``sqrt(d)``, which gives unit-vector logits the spread of standard
scaled-dot-product logits.

Not yet: decoding (it needs the two convolutions' histories and the shifted value in a cache)
raises ``NotImplementedError``; packed documents (``segment_ids``) are refused.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx

from attn_jax import masks as masks_lib
from attn_jax import mechanisms
from attn_jax.layers import nn
from attn_jax.layers import registry
from attn_jax.layers import rope as rope_lib
from attn_jax.layers.mixers import common


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompressedConvConfig(registry.MixerConfig):
  """CCA / CCGQA (causal; GQA allowed: CCGQA; RoPE 0 or 1 on the latents).

  Attributes:
    compression: ``C``, the latent head width is ``head_dim // C`` (CCA: 2 to 8).
    conv1_size: width of the depth-wise sequence convolution on q and k.
    conv2_size: width of the sequence-and-channel convolution within each head.
  """

  compression: int = 2
  conv1_size: int = 4
  conv2_size: int = 2

  def validate(self):
    super().validate()
    self.check_causal_only()
    self.check_positive("compression", "conv1_size", "conv2_size", allow_none=False)
    if self.rope > 1:
      raise self.error(f"rope must be 0 or 1, got {self.rope}")

  def latent_dim(self, dim: int) -> int:
    return self.head_dim_for(dim) // self.compression


def _identity_conv(width, channels, param_dtype):
  return jnp.zeros((width, channels), param_dtype).at[-1].set(1.0)


class CompressedConvAttention(nnx.Module):
  """CCA / CCGQA in a compressed latent (mixer protocol without decoding)."""

  def __init__(self, config: CompressedConvConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    del layer_index, num_layers
    self.config = config
    self.dtype = dtype
    hq, hkv, d = config.num_heads, config.kv_heads, config.latent_dim(dim)
    if d < 1 or (config.rope and d % 2):
      raise config.error(f"the latent head width head_dim // compression = {config.head_dim_for(dim)} // "
                         f"{config.compression} = {d} must be >= 1 (and even with rope=1)")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj = common.Projections(config, dim, qk_dim=d, v_dim=d, **kw)
    self.v_prev = nn.Dense(dim, (hkv, d), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), **kw)
    self.conv1_q = nnx.Param(_identity_conv(config.conv1_size, hq * d, param_dtype), logical_axes=("conv", "heads"))
    self.conv1_k = nnx.Param(_identity_conv(config.conv1_size, hkv * d, param_dtype),
                             logical_axes=("conv", "kv_heads"))
    eye = lambda h: jnp.zeros((config.conv2_size, h, d, d), param_dtype).at[-1].set(jnp.eye(d))  # noqa: E731
    self.conv2_q = nnx.Param(eye(hq), logical_axes=("conv", "heads", "head_dim", None))
    self.conv2_k = nnx.Param(eye(hkv), logical_axes=("conv", "kv_heads", "head_dim", None))
    self.temperature = nnx.Param(jnp.full((hq,), math.sqrt(d), param_dtype), logical_axes=("heads",))
    self.mask = masks_lib.causal()

  def latents(self, x):
    """``q [B, T, Hq, d]``, ``k [B, T, Hkv, d]`` and the value-shifted ``v [B, T, Hkv, d]``."""
    q, k, v = self.proj.qkv(x)
    return q, k, mechanisms.value_shift(v, common.heads(self.v_prev, x, common.KV_SPEC))

  def conv_params(self):
    """``(conv1_q, conv1_k, conv2_q, conv2_k, temperature)`` in the compute dtype."""
    return tuple(p[...].astype(jnp.float32) for p in (self.conv1_q, self.conv1_k, self.conv2_q, self.conv2_k,
                                                      self.temperature))

  def __call__(self, x, *, positions=None, segment_ids=None, **unused):
    """``x [B, T, C]``, ``positions [B, T]`` -> ``[B, T, C]``."""
    common.no_segments("compressed_conv", segment_ids)
    c = self.config
    rope = None
    if c.rope:
      b, t = x.shape[:2]
      pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None] if positions is None or positions.ndim != 2
                             else positions, (b, t))
      rope = lambda q, k: (rope_lib.apply_rope(q, pos, theta=c.rope_theta),  # noqa: E731
                           rope_lib.apply_rope(k, pos, theta=c.rope_theta))
    q, k, v = self.latents(x)
    o = mechanisms.compressed_conv_attention(q, k, v, *self.conv_params(), mask=self.mask, rope=rope,
                                             implementation=c.implementation)
    return self.proj.o_proj(o.astype(self.dtype))

  def init_cache(self, batch: int, max_len: int, dtype):
    raise NotImplementedError("mixer 'compressed_conv' does not decode yet (its cache would hold the two "
                              "convolutions' histories and the shifted value); use the full call")


registry.register(registry.MixerEntry(
    name="compressed_conv",
    config=CompressedConvConfig,
    layer=CompressedConvAttention,
    family="softmax",
    cache=None,
    description="compressed convolutional attention (CCA; CCGQA with GQA): attention in a down-projected "
                "latent with causal convolutions and q-k mean on q and k, value shift; no decoding yet",
    paper="Figliolia et al. 2025, Compressed convolutional attention: efficient attention in a compressed "
          "latent space (Zyphra)",
    quality=(registry.QualityPreset("compressed_conv", description="CCA with compression 2"),),
    efficiency=(registry.EfficiencyPreset("compressed_conv (xla)", (("implementation", "xla"),),
                                          patterns=("causal_self",), default=False, quality="compressed_conv"),),
))
