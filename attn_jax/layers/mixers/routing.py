"""Routing Transformer attention, the ``"routing"`` mixer: balanced k-means clusters of the
(shared) queries and keys, dense attention inside each cluster, local heads beside the routing
heads (:func:`attn_jax.mechanisms.routing_attention`).

The centroids are *state*, not parameters: a :class:`Centroids` variable, unit vectors
``[Hq, C, D]`` moved by online k-means with an exponential moving average
(:func:`attn_jax.mechanisms.routing_update_centroids`) on every training call; gradients never
reach them. Like BatchNorm's statistics they are frozen by ``model.eval()`` (which sets
``use_running_average=True``). The update is a state change of the module: it persists under
eager calls and nnx transforms (``nnx.jit``, ``nnx.value_and_grad``); a purely functional step
(``nnx.merge`` inside ``jax.jit``, as :mod:`attn_jax.models.train` does) must return the new
state itself, otherwise the centroids stay at their initial values. Routing is on the rotated
(RoPE) vectors that the attention scores use.

No decoding: a decoded token's cluster membership depends on the top-k balancing over the whole
sequence, which a causal decoder cannot know; not built here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax import mechanisms
from attn_jax import sharding
from attn_jax.layers import nn
from attn_jax.layers import registry
from attn_jax.layers.mixers import common


class Centroids(nnx.Variable):
  """Routing attention's k-means centroids ``[Hq, C, D]``: EMA state, not a trainable parameter."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoutingConfig(registry.MixerConfig):
  """Routing attention (shared fields: :class:`~attn_jax.layers.MixerConfig`).

  Attributes:
    num_clusters: centroids ``C`` per head.
    cluster_size: queries and keys per cluster ``w`` (None: ``T // num_clusters``, at least 1);
      capped at the sequence length.
    num_local_heads: heads using local attention instead of routing (the paper mixes both), a
      multiple of the GQA group size.
    window: the local heads' window (None: the cluster size).
    decay: EMA decay of the centroids, in ``[0, 1)``.
    shared_qk: keys are the queries (the paper's shared QK routing heads); needs
      ``num_kv_heads = num_heads``. False: separate key projection.
  """

  num_clusters: int = 4
  cluster_size: int | None = None
  num_local_heads: int = 0
  window: int | None = None
  decay: float = 0.999
  shared_qk: bool = True

  def validate(self):
    super().validate()
    self.check_positive("num_clusters", allow_none=False)
    self.check_positive("cluster_size", "window")
    n = self.num_local_heads
    group = self.num_heads // self.kv_heads
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.num_heads or n % group:
      raise self.error(f"num_local_heads must be an int in [0, num_heads={self.num_heads}] and a multiple of "
                       f"the GQA group size {group}, got {n!r}")
    d = self.decay
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
      raise self.error(f"decay must be a float in [0, 1), got {d!r}")
    if not isinstance(self.shared_qk, bool):
      raise self.error(f"shared_qk must be a bool, got {self.shared_qk!r}")
    if self.shared_qk:
      self.check_no_grouped_heads()


class SharedQKProjections(nnx.Module):
  """Query (= key), value and output projections of shared-QK attention (``qkv`` as in
  :class:`~attn_jax.layers.mixers.common.Projections`)."""

  def __init__(self, config, dim, *, rngs, dtype, param_dtype):
    h, d = config.num_heads, config.head_dim_for(dim)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = nn.Dense(dim, (h, d), in_axes=("embed",), out_axes=("heads", "head_dim"), **kw)
    self.v_proj = nn.Dense(dim, (h, d), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), **kw)
    self.o_proj = nn.Dense((h, d), dim, in_axes=("heads", "head_dim"), out_axes=("embed",), **kw)

  def qkv(self, x):
    q = sharding.constrain(self.q_proj(x), common.Q_SPEC)
    return q, q, sharding.constrain(self.v_proj(x), common.KV_SPEC)


class RoutingAttention(common.SparseAttention):
  """Projections, RoPE, routing attention and the EMA update of its centroids (mixer protocol)."""

  NO_DECODE = ("a token's cluster membership comes from top-k balancing over the whole sequence, which "
               "a causal decoder does not know")

  def __init__(self, config: RoutingConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    super().__init__(config, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype, layer_index=layer_index,
                     num_layers=num_layers)
    if config.shared_qk:
      self.proj = SharedQKProjections(config, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    c = jax.random.normal(rngs.params(), (config.num_heads, config.num_clusters, config.head_dim_for(dim)))
    # Replicated (the sharding rules place every variable by its logical axes; these are tiny).
    self.centroids = Centroids(c / jnp.linalg.norm(c, axis=-1, keepdims=True), logical_axes=(None, None, None))
    self.use_running_average = False

  def sizes(self, seq_len: int) -> tuple[int, int | None]:
    """``(cluster_size, local window or None)`` for a sequence of ``seq_len`` tokens."""
    c = self.config
    w = min(c.cluster_size or max(1, seq_len // c.num_clusters), seq_len)
    return w, (min(c.window or w, seq_len) if c.num_local_heads else None)

  def attend(self, q, k, v, **unused):
    c = self.config
    w, window = self.sizes(q.shape[1])
    centroids = self.centroids[...]
    out = mechanisms.routing_attention(q, k, v, centroids, cluster_size=w, causal=c.causal,
                                       num_local_heads=c.num_local_heads, local_window=window,
                                       implementation=c.implementation)
    if not self.use_running_average:
      self.centroids[...] = mechanisms.routing_update_centroids(centroids, q, k, decay=c.decay)
    return out


registry.register(registry.MixerEntry(
    name="routing",
    config=RoutingConfig,
    layer=RoutingAttention,
    family="softmax",
    cache=None,
    uses_rope=True,
    description="Routing Transformer: online k-means (EMA centroids, nnx state) on shared QK, balanced top-w "
                "per cluster, dense inside clusters, plus local heads; no decoding (balancing is global)",
    paper="Roy et al. 2021, Efficient content-based sparse attention with Routing Transformers "
          "(arXiv:2003.05997)",
    quality=(registry.QualityPreset(
        "routing", lambda t: dict(num_clusters=4),
        description="4 balanced clusters of seq_len / 4 on every head (the quality suite's models have one "
                    "head, so no local heads)"),),
    efficiency=(registry.EfficiencyPreset(
        "routing16 (xla)", (("implementation", "xla"), ("num_clusters", 16)), patterns=("causal_self",),
        default=False, quality="routing"),),
))
