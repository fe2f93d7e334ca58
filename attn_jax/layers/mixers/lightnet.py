"""LightNet's additive linear recurrence ("You only scan once"), the ``"lightnet"`` mixer.

``q = silu(x Wq)``, ``k = x Wk``, ``v = x Wv``; :func:`attn_jax.mechanisms.lightnet_attention`
(each key channel normalised by a softmax over the tokens read so far, as a linear recurrence
with per-channel decays); a per-head RMS norm; the output projection. Non-causal: one global sum
over every token (of a grid too: a single pass, not one scan per axis). Decoding keeps
``(S [B, H, D, Dv], Z [B, H, D])``, the state and the running log-sum-exp of the keys.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax import mechanisms
from attn_jax.layers import cache as cache_lib
from attn_jax.layers import nn
from attn_jax.layers import registry
from attn_jax.layers.mixers import common
from attn_jax.layers.mixers import linear


@dataclasses.dataclass(frozen=True, kw_only=True)
class LightNetConfig(registry.MixerConfig):
  """LightNet (causal or not; no GQA; ``rope`` is not used).

  Attributes:
    chunk_size: chunk size of the causal chunked form (None: the backend's default).
  """

  chunk_size: int | None = None

  def validate(self):
    super().validate()
    self.check_no_grouped_heads()
    self.check_positive("chunk_size")


class LightNetAttention(nnx.Module):
  """LightNet's additive recurrence with softmax-normalised keys (mixer protocol)."""

  def __init__(self, config: LightNetConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    del layer_index, num_layers
    self.config = config
    d = config.head_dim_for(dim)
    self.proj = common.Projections(config, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm = nn.RMSNorm(d, rngs=rngs, param_dtype=param_dtype, axis_name="head_dim")

  def _qkv(self, x):
    q, k, v = self.proj.qkv(x)
    return jax.nn.silu(q), k, v

  def __call__(self, x, *, segment_ids=None, **unused):
    """``x [B, T, C]`` -> ``[B, T, C]``."""
    common.no_segments("lightnet", segment_ids)
    c = self.config
    o = mechanisms.lightnet_attention(*self._qkv(x), causal=c.causal, chunk_size=c.chunk_size,
                                      implementation=c.implementation)
    return self.proj.o_proj(self.norm(o))

  def init_cache(self, batch: int, max_len: int, dtype) -> cache_lib.RecurrentCache:
    del max_len
    if not self.config.causal:
      raise ValueError("mixer 'lightnet' decodes its causal form only (causal=True)")
    d, dv = self.proj.q_proj.kernel[...].shape[-1], self.proj.v_proj.kernel[...].shape[-1]
    return cache_lib.RecurrentCache(mechanisms.lightnet_init_state(batch, self.config.num_heads, d, dv))

  def prefill(self, x, cache: cache_lib.RecurrentCache, **unused):
    """The prompt at positions ``0 .. T-1``; the cache must be empty (it is replaced)."""
    c = self.config
    o, state = mechanisms.lightnet_attention(*self._qkv(x), chunk_size=c.chunk_size,
                                             implementation=c.implementation, return_final_state=True)
    return self.proj.o_proj(self.norm(o)), cache_lib.RecurrentCache(state)

  def decode(self, x, cache: cache_lib.RecurrentCache, **unused):
    linear.step_fn("lightnet")
    q, k, v = self._qkv(x)
    state, o = mechanisms.lightnet_step(cache.state, q[:, 0], k[:, 0], v[:, 0])
    return self.proj.o_proj(self.norm(o[:, None])), cache_lib.RecurrentCache(state)


registry.register(registry.MixerEntry(
    name="lightnet",
    config=LightNetConfig,
    layer=LightNetAttention,
    family="linear",
    cache=cache_lib.RecurrentCache,
    requires=(linear.PRIMITIVE,),
    description="additive linear recurrence with softmax-normalised keys (logcumsumexp decays); "
                "non-causal: one global sum",
    paper="Qin et al. 2024, You only scan once: efficient multi-dimension sequential modeling with "
          "LightNet (arXiv:2405.21022)",
    quality=(registry.QualityPreset("lightnet", description="LightNet additive recurrence"),),
    efficiency=(registry.EfficiencyPreset("lightnet (xla)", (("implementation", "xla"),), default=False,
                                          quality="lightnet"),),
))
