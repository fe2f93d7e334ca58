"""Aaren ("Attention as an RNN"), the ``"aaren"`` mixer.

``y_t = Wo softmax-attention(query_h, x_{<=t} Wk, x_{<=t} Wv)`` with one learned query per head:
exact causal softmax attention computed as an associative scan
(:func:`attn_jax.mechanisms.aaren`). Decoding keeps ``(m, u, w)`` per head (the running max, the
softmax denominator and numerator): O(1) memory and time per token.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from attn_jax import mechanisms
from attn_jax.layers import cache as cache_lib
from attn_jax.layers import nn
from attn_jax.layers import registry
from attn_jax.layers.mixers import common


@dataclasses.dataclass(frozen=True, kw_only=True)
class AarenConfig(registry.MixerConfig):
  """Aaren (causal; no GQA; ``rope`` and ``implementation`` are not used: the scan is plain jnp)."""

  def validate(self):
    super().validate()
    self.check_causal_only()
    self.check_no_grouped_heads()


class AarenAttention(nnx.Module):
  """Softmax attention of one learned query per head over the prefix, as an RNN (mixer protocol)."""

  def __init__(self, config: AarenConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    del layer_index, num_layers
    self.config = config
    h, d = config.num_heads, config.head_dim_for(dim)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.key = nn.Dense(dim, (h, d), in_axes=("embed",), out_axes=("heads", "head_dim"), **kw)
    self.value = nn.Dense(dim, (h, d), in_axes=("embed",), out_axes=("heads", "head_dim"), **kw)
    self.query = nn.param(rngs, nn.fan_in_init(1), (h, d), ("heads", "head_dim"), param_dtype)
    self.out = nn.Dense((h, d), dim, in_axes=("heads", "head_dim"), out_axes=("embed",), **kw)

  def _kv(self, x):
    return common.heads(self.key, x), common.heads(self.value, x)

  def __call__(self, x, *, segment_ids=None, **unused):
    """``x [B, T, C]`` -> ``[B, T, C]``."""
    common.no_segments("aaren", segment_ids)
    return self.out(mechanisms.aaren(self.query[...], *self._kv(x)))

  def init_cache(self, batch: int, max_len: int, dtype) -> cache_lib.RecurrentCache:
    del max_len, dtype
    h, d = self.query[...].shape
    return cache_lib.RecurrentCache(mechanisms.aaren_init_state(batch, h, d))

  def prefill(self, x, cache: cache_lib.RecurrentCache, **unused):
    """The prompt at positions ``0 .. T-1``; the cache must be empty (it is replaced)."""
    o, state = mechanisms.aaren(self.query[...], *self._kv(x), return_final_state=True)
    return self.out(o), cache_lib.RecurrentCache(state)

  def decode(self, x, cache: cache_lib.RecurrentCache, **unused):
    k, v = self._kv(x)
    state, o = mechanisms.aaren_step(cache.state, self.query[...], k[:, 0], v[:, 0])
    return self.out(o[:, None]), cache_lib.RecurrentCache(state)


registry.register(registry.MixerEntry(
    name="aaren",
    config=AarenConfig,
    layer=AarenAttention,
    family=None,
    cache=cache_lib.RecurrentCache,
    description="causal softmax attention of one learned query per head, as an associative scan; "
                "O(1) decoding state",
    paper="Feng et al. 2024, Attention as an RNN (arXiv:2405.13956)",
    quality=(registry.QualityPreset("aaren", description="Aaren"),),
    efficiency=(registry.EfficiencyPreset("aaren (jnp scan)", patterns=("causal_self",), default=False,
                                          quality="aaren"),),
))
