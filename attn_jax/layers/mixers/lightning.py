"""Lightning Attention 1 / 2 in TransNormerLLM's gated layer, the ``"lightning"`` mixer.

``q = silu(x Wq)``, ``k = silu(x Wk)``, ``v = x Wv``, ``u = x Wu``; ``o`` = Lightning attention
(:func:`attn_jax.mechanisms.lightning_attention`: causal linear attention, identity features,
per-head decay ``exp(-slope_h)`` with ALiBi's slopes scaled by the layer's depth); output
``Wo (RMSNorm(o) * sigmoid(u))`` with one RMS norm over all heads. Decoding keeps the
``[B, H, D, Dv]`` state (:class:`~attn_jax.layers.cache.RecurrentCache`).
"""

from __future__ import annotations

import dataclasses

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
class LightningConfig(registry.MixerConfig):
  """Lightning attention (causal; GQA allowed; ``rope`` is not used).

  Attributes:
    version: 1 (one quadratic block, Lightning Attention-1) or 2 (chunked intra/inter-chunk).
    chunk_size: version 2's chunk size (None: the backend's default).
  """

  version: int = 2
  chunk_size: int | None = None

  def validate(self):
    super().validate()
    self.check_causal_only()
    if self.version not in (1, 2) or isinstance(self.version, bool):
      raise self.error(f"version must be 1 or 2, got {self.version!r}")
    self.check_positive("chunk_size")
    if self.version == 1 and self.chunk_size is not None:
      raise self.error("chunk_size applies to version 2 only (version 1 is one quadratic block)")


class LightningAttention(nnx.Module):
  """TransNormerLLM's gated linear attention with Lightning Attention inside (mixer protocol)."""

  def __init__(self, config: LightningConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    self.config = config
    hq, d = config.num_heads, config.head_dim_for(dim)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.slopes = tuple(float(s) for s in mechanisms.lightning_slopes(hq, layer_index, num_layers))
    self.proj = common.Projections(config, dim, **kw)
    self.gate = nn.Dense(dim, (hq, d), in_axes=("embed",), out_axes=("heads", "head_dim"), **kw)
    self.norm = nn.RMSNorm(hq * d, rngs=rngs, param_dtype=param_dtype)

  def _inputs(self, x):
    q, k, v = self.proj.qkv(x)
    return jax.nn.silu(q), jax.nn.silu(k), v, common.heads(self.gate, x)

  def _finish(self, o, u):
    lead = o.shape[:-2]
    o = self.norm(o.reshape(lead + (-1,))).reshape(o.shape)
    return self.proj.o_proj(o * jax.nn.sigmoid(u))

  def _attend(self, q, k, v, **kw):
    c = self.config
    return mechanisms.lightning_attention(q, k, v, np.asarray(self.slopes, np.float32), version=c.version,
                                          chunk_size=c.chunk_size, implementation=c.implementation, **kw)

  def __call__(self, x, *, segment_ids=None, **unused):
    """``x [B, T, C]`` -> ``[B, T, C]``; ``segment_ids`` restart the state per document."""
    q, k, v, u = self._inputs(x)
    return self._finish(self._attend(q, k, v, segment_ids=segment_ids), u)

  def init_cache(self, batch: int, max_len: int, dtype) -> cache_lib.RecurrentCache:
    del max_len
    d = self.proj.v_proj.kernel[...].shape[-1]
    return cache_lib.RecurrentCache(jnp.zeros((batch, self.config.num_heads, d, d), jnp.float32))

  def prefill(self, x, cache: cache_lib.RecurrentCache, **unused):
    q, k, v, u = self._inputs(x)
    o, state = self._attend(q, k, v, initial_state=cache.state, return_final_state=True)
    return self._finish(o, u), cache_lib.RecurrentCache(state)

  def decode(self, x, cache: cache_lib.RecurrentCache, **unused):
    q, k, v, u = self._inputs(x)
    log_decay = -jnp.asarray(self.slopes, jnp.float32)
    state, o = linear.step_fn("lightning")(cache.state, q[:, 0], k[:, 0], v[:, 0], log_decay)
    return self._finish(o[:, None], u), cache_lib.RecurrentCache(state)


registry.register(registry.MixerEntry(
    name="lightning",
    config=LightningConfig,
    layer=LightningAttention,
    family="linear",
    cache=cache_lib.RecurrentCache,
    requires=(linear.PRIMITIVE,),
    description="TransNormerLLM's gated linear attention: fixed per-head decays (ALiBi slopes by depth), "
                "silu features, RMS norm and sigmoid gate; version 1 (one block) or 2 (chunked)",
    paper="Qin et al. 2024, Lightning Attention-2 (arXiv:2401.04658); TransNormerLLM (arXiv:2307.14995)",
    quality=(registry.QualityPreset("lightning", description="Lightning Attention-2 layer"),),
    efficiency=(registry.EfficiencyPreset("lightning (xla)", (("implementation", "xla"),),
                                          patterns=("causal_self",), quality="lightning"),),
))
