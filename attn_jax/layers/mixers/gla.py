"""Gated linear attention (GLA), the ``"gla"`` mixer.

``q = x Wq``, ``k = x Wk`` (``dk = expand_k * head_dim`` per head), ``v = x Wv``; per-channel
forget gates ``log a_t = logsigmoid(x W1 W2 + b) / gate_normalizer`` (a rank-``gate_low_rank``
projection, ``[B, T, H, dk]``), which decay the rows of the state:
``S_t = diag(a_t) S_{t-1} + k_t v_t^T``, ``o_t = q_t^T S_t / sqrt(dk)``
(:func:`attn_jax.linear_attention` with a ``[B, T, H, dk]`` ``log_decay``, whose chunked and
Pallas backends serve per-channel gates); output ``Wo (RMSNorm(o) * swish(x Wg))`` with one RMS
norm per head. Decoding keeps the ``[B, Hkv, dk, Dv]`` state.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.layers import cache as cache_lib
from attn_jax.layers import nn
from attn_jax.layers import registry
from attn_jax.layers.mixers import common
from attn_jax.layers.mixers import linear


@dataclasses.dataclass(frozen=True, kw_only=True)
class GLAConfig(registry.MixerConfig):
  """GLA (causal; GQA allowed: gates and state per key/value head; ``rope`` is not used).

  Attributes:
    expand_k: key (and query) width per head as a fraction of ``head_dim`` (GLA: 0.5).
    gate_low_rank: rank of the gate projection (GLA: 16).
    gate_normalizer: the log gates are divided by it (GLA: 16), so gates start near 1: a long
      memory at initialisation.
    chunk_size: chunk size of the chunked form (None: the backend's default).
  """

  expand_k: float = 0.5
  gate_low_rank: int = 16
  gate_normalizer: float = 16.0
  chunk_size: int | None = None

  def validate(self):
    super().validate()
    self.check_causal_only()
    self.check_positive("gate_low_rank", allow_none=False)
    self.check_positive("chunk_size")
    for name in ("expand_k", "gate_normalizer"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise self.error(f"{name} must be a positive float, got {value!r}")

  def key_dim(self, dim: int) -> int:
    """Query/key width per head: ``expand_k * head_dim``, at least 1."""
    return max(1, int(self.head_dim_for(dim) * self.expand_k))


class GatedLinearAttention(nnx.Module):
  """GLA with per-channel data-dependent gates, per-head RMS norm and swish output gate (mixer protocol)."""

  def __init__(self, config: GLAConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    del layer_index, num_layers
    self.config = config
    hq, hkv, d, dk = config.num_heads, config.kv_heads, config.head_dim_for(dim), config.key_dim(dim)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj = common.Projections(config, dim, qk_dim=dk, v_dim=d, **kw)
    self.gate_down = nn.Dense(dim, config.gate_low_rank, in_axes=("embed",), out_axes=(None,), **kw)
    self.gate_up = nn.Dense(config.gate_low_rank, (hkv, dk), in_axes=(None,), out_axes=("kv_heads", "head_dim"),
                            **kw)
    self.gate_bias = nnx.Param(jnp.zeros((hkv, dk), param_dtype), logical_axes=("kv_heads", "head_dim"))
    self.out_gate = nn.Dense(dim, (hq, d), in_axes=("embed",), out_axes=("heads", "head_dim"), **kw)
    self.norm = nn.RMSNorm(d, rngs=rngs, param_dtype=param_dtype, axis_name="head_dim")

  def _inputs(self, x):
    q, k, v = self.proj.qkv(x)
    logits = self.gate_up(self.gate_down(x)).astype(jnp.float32) + self.gate_bias[...].astype(jnp.float32)
    log_gate = jax.nn.log_sigmoid(logits) / self.config.gate_normalizer  # [B, T, Hkv, dk], <= 0
    return q, k, v, log_gate

  def _finish(self, o, x):
    return self.proj.o_proj(self.norm(o) * jax.nn.swish(common.heads(self.out_gate, x)))

  def _scale(self, q):
    return 1.0 / math.sqrt(q.shape[-1])

  def _attend(self, q, k, v, log_gate, **kw):
    c = self.config
    return linear.primitive()(q, k, v, log_decay=log_gate, scale=self._scale(q), chunk_size=c.chunk_size,
                              implementation=c.implementation, **kw)

  def __call__(self, x, *, segment_ids=None, **unused):
    """``x [B, T, C]`` -> ``[B, T, C]``; ``segment_ids`` restart the state per document."""
    q, k, v, g = self._inputs(x)
    return self._finish(self._attend(q, k, v, g, segment_ids=segment_ids), x)

  def init_cache(self, batch: int, max_len: int, dtype) -> cache_lib.RecurrentCache:
    del max_len, dtype
    c = self.config
    dk, dv = self.proj.k_proj.kernel[...].shape[-1], self.proj.v_proj.kernel[...].shape[-1]
    return cache_lib.RecurrentCache(jnp.zeros((batch, c.kv_heads, dk, dv), jnp.float32))

  def prefill(self, x, cache: cache_lib.RecurrentCache, **unused):
    q, k, v, g = self._inputs(x)
    o, state = self._attend(q, k, v, g, initial_state=cache.state, return_final_state=True)
    return self._finish(o, x), cache_lib.RecurrentCache(state)

  def decode(self, x, cache: cache_lib.RecurrentCache, **unused):
    q, k, v, g = self._inputs(x)
    state, o = linear.step_fn("gla")(cache.state, q[:, 0], k[:, 0], v[:, 0], g[:, 0], scale=self._scale(q))
    return self._finish(o[:, None], x), cache_lib.RecurrentCache(state)


registry.register(registry.MixerEntry(
    name="gla",
    config=GLAConfig,
    layer=GatedLinearAttention,
    family="linear",
    cache=cache_lib.RecurrentCache,
    requires=(linear.PRIMITIVE,),
    description="gated linear attention: data-dependent per-channel forget gates (low-rank, logsigmoid / 16), "
                "per-head RMS norm, swish output gate",
    paper="Yang et al. 2024, Gated linear attention transformers with hardware-efficient training "
          "(arXiv:2312.06635)",
    quality=(registry.QualityPreset("gla", description="GLA, key width head_dim / 2"),),
    efficiency=(registry.EfficiencyPreset("gla (xla)", (("implementation", "xla"),), patterns=("causal_self",),
                                          default=False, quality="gla"),),
))
