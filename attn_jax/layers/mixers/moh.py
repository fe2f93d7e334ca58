"""MoH, mixture-of-head attention, the ``"moh"`` mixer (Jin et al., ICML 2025, Sec. 3.2).

Multi-head softmax attention whose heads are experts: per token, ``num_shared_heads`` heads are
always on and a router picks the ``top_k`` of the other heads; the output projection sums the
heads weighted by their gates (:func:`attn_jax.mechanisms.moh_gates`,
:func:`attn_jax.mechanisms.moh_attention`). The router, the shared-head logits and the
shared/routed mix are linear maps of the token (``W_r``, ``W_s``, ``W_h`` in the paper, here one
``[dim, H]`` kernel for ``W_s`` and ``W_r`` and a ``[dim, 2]`` one for ``W_h``).

The training call returns the load-balancing loss (Eq. 6) times ``balance_weight`` (the
paper's beta = 0.01) as the auxiliary loss ``"moh_load_balance"``
(:class:`~attn_jax.layers.MixerOutput`), which the models add to their training loss (summed
over layers). Decoding: a plain KV cache; a step computes its own token's gates.
"""

from __future__ import annotations

import dataclasses

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

AUX_NAME = "moh_load_balance"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoHConfig(registry.MixerConfig):
  """MoH (GQA allowed; causal or not; RoPE per ``rope``).

  Attributes:
    num_shared_heads: heads every token uses (``0 <= h_s <= num_heads - 2``: at least two heads are
      routed, or routing would be trivial); None: ``num_heads // 4``.
    top_k: routed heads per token among the ``num_heads - num_shared_heads`` others; None: half
      of them, rounded up (the paper activates 50-90 % of the heads).
    balance_weight: weight of the load-balancing loss in the training loss (paper: 0.01).
  """

  num_shared_heads: int | None = None
  top_k: int | None = None
  balance_weight: float = 0.01

  def validate(self):
    super().validate()
    hs = self.num_shared_heads
    if hs is not None and (isinstance(hs, bool) or not isinstance(hs, int) or not 0 <= hs <= self.num_heads - 2):
      raise self.error(f"num_shared_heads must be None or an int in [0, num_heads - 2 = {self.num_heads - 2}] "
                       f"(at least two routed heads), got {hs!r}")
    if self.num_heads < 2:
      raise self.error(f"num_heads must be >= 2 (heads are routed), got {self.num_heads}")
    routed = self.num_heads - self.shared_heads
    k = self.top_k
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= routed):
      raise self.error(f"top_k must be None or an int in [1, {routed}] (the routed heads), got {k!r}")
    w = self.balance_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
      raise self.error(f"balance_weight must be a float >= 0, got {w!r}")
    if self.rope > 1:
      raise self.error(f"rope must be 0 or 1, got {self.rope}")

  @property
  def shared_heads(self) -> int:
    return self.num_heads // 4 if self.num_shared_heads is None else self.num_shared_heads

  @property
  def routed_top_k(self) -> int:
    routed = self.num_heads - self.shared_heads
    return -(-routed // 2) if self.top_k is None else self.top_k


class MoHAttention(nnx.Module):
  """Mixture-of-head softmax attention (mixer protocol); returns the load-balancing loss."""

  def __init__(self, config: MoHConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    del layer_index, num_layers
    self.config = config
    hs = config.shared_heads
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.mask = masks_lib.causal() if config.causal else masks_lib.full()
    self.proj = common.Projections(config, dim, **kw)
    self.router = nn.Dense(dim, config.num_heads - hs, in_axes=("embed",), out_axes=("heads",), **kw)
    # One shared head has softmax weight 1 whatever its logit: W_s exists from two shared heads.
    self.shared_router = nn.Dense(dim, hs, in_axes=("embed",), out_axes=("heads",), **kw) if hs > 1 else None
    self.mix = nn.Dense(dim, 2, in_axes=("embed",), out_axes=(None,), **kw) if hs else None

  def gates(self, x) -> mechanisms.MoHGates:
    """The gates ``[B, T, H]`` (shared heads first), selections and balance loss of tokens ``x``."""
    hs = self.config.shared_heads
    shared = mix = None
    if hs:
      shared = (jnp.zeros(x.shape[:2] + (1,), jnp.float32) if self.shared_router is None
                else self.shared_router(x).astype(jnp.float32))
      mix = self.mix(x).astype(jnp.float32)
    return mechanisms.moh_gates(self.router(x).astype(jnp.float32), self.config.routed_top_k,
                                shared_logits=shared, mix_logits=mix)

  def _qkv(self, x, positions):
    q, k, v = self.proj.qkv(x)
    if self.config.rope:
      q = rope_lib.apply_rope(q, positions, theta=self.config.rope_theta)
      k = rope_lib.apply_rope(k, positions, theta=self.config.rope_theta)
    return q, k, v

  def __call__(self, x, *, positions=None, segment_ids=None, **unused):
    """``x [B, T, C]`` -> ``MixerOutput([B, T, C], {"moh_load_balance": loss})``."""
    b, t = x.shape[:2]
    if positions is None or positions.ndim != 2:
      positions = jnp.arange(t, dtype=jnp.int32)[None]
    q, k, v = self._qkv(x, jnp.broadcast_to(positions, (b, t)))
    g = self.gates(x)
    if segment_ids is None:
      o = mechanisms.moh_attention(q, k, v, g.gates, mask=self.mask, implementation=self.config.implementation)
    else:  # moh_attention's weighting, with segment ids
      o = attn_jax.attention(q, k, v, mask=self.mask, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                             implementation=self.config.implementation)
      o = (o.astype(jnp.float32) * g.gates[..., None]).astype(q.dtype)
    y = self.proj.o_proj(o)
    return registry.MixerOutput(y, {AUX_NAME: self.config.balance_weight * g.load_balance_loss})

  def init_cache(self, batch: int, max_len: int, dtype) -> cache_lib.KVCache:
    if not self.config.causal:
      raise ValueError("mixer 'moh': decoding needs causal=True")
    d = self.proj.q_proj.kernel[...].shape[-1]
    return cache_lib.KVCache.create(batch, max_len, self.config.kv_heads, d, d, dtype)

  def prefill(self, x, cache: cache_lib.KVCache, **unused):
    b, t = x.shape[:2]
    q, k, v = self._qkv(x, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
    o = mechanisms.moh_attention(q, k, v, self.gates(x).gates, mask=self.mask,
                                 implementation=self.config.implementation)
    return self.proj.o_proj(o), cache.fill(k, v).constrained()

  def decode(self, x, cache: cache_lib.KVCache, *, position, **unused):
    position = jnp.asarray(position, jnp.int32)
    q, k, v = self._qkv(x, jnp.full((x.shape[0], 1), position, jnp.int32))
    cache = cache.append(k, v, position).constrained()
    o = common.attend_cache(q, cache.k, cache, position, self.mask, implementation=self.config.implementation)
    o = (o.astype(jnp.float32) * self.gates(x).gates[..., None]).astype(q.dtype)
    return self.proj.o_proj(o), cache


registry.register(registry.MixerEntry(
    name="moh",
    config=MoHConfig,
    layer=MoHAttention,
    family="softmax",
    cache=cache_lib.KVCache,
    uses_rope=True,
    description="mixture-of-head attention: shared heads plus top-k routed heads per token, gated sum of "
                "heads; load-balancing loss added to the training loss",
    paper="Jin et al. 2025, MoH: multi-head attention as mixture-of-head attention (arXiv:2410.11842)",
    quality=(registry.QualityPreset("moh", min_heads=4,
                                    description="MoH, at least 4 heads: num_heads // 4 shared, half the others "
                                                "routed"),),
    efficiency=(registry.EfficiencyPreset("moh (xla)", (("implementation", "xla"),),
                                          patterns=("noncausal_self", "causal_self"), default=False,
                                          quality="moh"),),
))
