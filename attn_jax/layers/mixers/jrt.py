"""JRT-Prefix linear attention ("Just read twice"), the ``"jrt"`` mixer.

The first ``prefix_len`` tokens (the prompt) are also read non-causally, through their own key
and value projections ``ke, ve``; their sums initialise the state of the causal linear attention
over the whole sequence (:func:`attn_jax.mechanisms.jrt_prefix_linear_attention`), so every
token, including the prompt's own, reads the whole prompt. As with a prefix-LM mask, a token in
the prefix therefore sees the prefix tokens after it (train with the loss on later tokens).

Decoding: the prompt (at least ``prefix_len`` tokens) is prefilled in one call, which leaves the
normalised linear state ``[B, H, F, Dv + 1]``; every later token is one recurrent step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from attn_jax import mechanisms
from attn_jax.layers import cache as cache_lib
from attn_jax.layers import nn
from attn_jax.layers import registry
from attn_jax.layers.mixers import common
from attn_jax.layers.mixers import linear


@dataclasses.dataclass(frozen=True, kw_only=True)
class JRTConfig(registry.MixerConfig):
  """JRT-Prefix (causal after the prefix; GQA allowed; ``rope`` is not used).

  Attributes:
    prefix_len: tokens read twice (non-causally, then causally); a sequence shorter than this
      is read twice whole.
    feature_map: ``phi`` of the linear attention (as :class:`LinearConfig`'s).
    chunk_size: chunk size of the causal read (None: the backend's default).
  """

  prefix_len: int = 8
  feature_map: Any = "elu_plus_one"
  chunk_size: int | None = None

  def validate(self):
    super().validate()
    self.check_causal_only()
    self.check_positive("prefix_len", allow_none=False)
    self.check_positive("chunk_size")
    linear.check_feature_map(self, self.feature_map)


class JRTPrefixAttention(nnx.Module):
  """JRT-Prefix linear attention (mixer protocol)."""

  def __init__(self, config: JRTConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    del layer_index, num_layers
    self.config = config
    hkv, d = config.kv_heads, config.head_dim_for(dim)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj = common.Projections(config, dim, **kw)
    self.prefix_key = nn.Dense(dim, (hkv, d), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), **kw)
    self.prefix_value = nn.Dense(dim, (hkv, d), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), **kw)

  def _read(self, x, **kw):
    c = self.config
    prefix = x[:, :min(c.prefix_len, x.shape[1])]
    q, k, v = self.proj.qkv(x)
    ke = common.heads(self.prefix_key, prefix, common.KV_SPEC)
    ve = common.heads(self.prefix_value, prefix, common.KV_SPEC)
    return mechanisms.jrt_prefix_linear_attention(q, k, v, ke, ve, feature_map=c.feature_map,
                                                  chunk_size=c.chunk_size, implementation=c.implementation, **kw)

  def __call__(self, x, *, segment_ids=None, **unused):
    """``x [B, T, C]`` -> ``[B, T, C]``."""
    common.no_segments("jrt", segment_ids)
    return self.proj.o_proj(self._read(x))

  def init_cache(self, batch: int, max_len: int, dtype) -> cache_lib.RecurrentCache:
    del max_len
    linear.step_fn("jrt")
    c = self.config
    d = self.proj.v_proj.kernel[...].shape[-1]
    features = linear.zero_state(
        lambda q, k, v: mechanisms.jrt_prefix_linear_attention(q, k, v, k, v, feature_map=c.feature_map,
                                                                return_final_state=True),
        dict(q=(batch, 1, c.num_heads, d), k=(batch, 1, c.kv_heads, d), v=(batch, 1, c.kv_heads, d)), dtype)
    return cache_lib.RecurrentCache(features)

  def prefill(self, x, cache: cache_lib.RecurrentCache, **unused):
    """The prompt ``x [B, T, C]`` with ``T >= prefix_len`` (the cache's state is replaced)."""
    if x.shape[1] < self.config.prefix_len:
      raise ValueError(
          f"mixer 'jrt' reads its first prefix_len={self.config.prefix_len} tokens non-causally, so the "
          f"prompt it prefills must hold them all; got {x.shape[1]} tokens")
    o, state = self._read(x, return_final_state=True)
    return self.proj.o_proj(o), cache_lib.RecurrentCache(state)

  def decode(self, x, cache: cache_lib.RecurrentCache, **unused):
    q, k, v = self.proj.qkv(x)
    state, o = linear.step_fn("jrt")(cache.state, q[:, 0], k[:, 0], v[:, 0],
                                     feature_map=self.config.feature_map, normalize=True)
    return self.proj.o_proj(o[:, None]), cache_lib.RecurrentCache(state)


registry.register(registry.MixerEntry(
    name="jrt",
    config=JRTConfig,
    layer=JRTPrefixAttention,
    family="linear",
    cache=cache_lib.RecurrentCache,
    requires=(linear.PRIMITIVE,),
    description="JRT-Prefix: the prompt read non-causally initialises a causal linear attention's state",
    paper="Arora et al. 2024, Just read twice: closing the recall gap for recurrent language models "
          "(arXiv:2407.05483)",
    quality=(registry.QualityPreset("jrt", lambda t: dict(prefix_len=max(1, t.prefix_len)),
                                    description="JRT-Prefix over the task's context (MQAR: the key-value pairs)"),),
    efficiency=(registry.EfficiencyPreset("jrt (xla)", (("implementation", "xla"), ("prefix_len", 64)),
                                          patterns=("causal_self",), default=False, quality="jrt"),),
))
