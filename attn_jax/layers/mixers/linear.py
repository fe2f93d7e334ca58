"""Generic linear attention, the ``"linear"`` mixer, on ``attn_jax.linear_attention``.

The primitive computes ``S_t = a_t S_{t-1} + phi(k_t) v_t^T``, ``o_t = phi(q_t)^T S_t``
(normalised by ``phi(q_t)^T z_t`` when asked) in chunked form for training and prefill, and a
recurrent step for decoding. This layer adds the projections, the decay parameterisation (none,
fixed per-head slopes, or a data-dependent per-step decay) and the per-head output norm, and
keeps the primitive's final state as its decoding cache (a
:class:`~attn_jax.layers.cache.RecurrentCache` of constant size). The literature's named linear
mechanisms (Lightning, Based, RetNet, GLA, ...) are their own mixers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import attn_jax
from attn_jax.context_parallel import config as context_parallel
from attn_jax.layers import cache as cache_lib
from attn_jax.layers import nn
from attn_jax.layers import registry
from attn_jax.layers.mixers import common

PRIMITIVE = "linear_attention"
STEP = "linear_attention_step"
DECAYS = ("none", "fixed", "data")
FEATURE_MAPS = ("identity", "elu_plus_one", "elu+1", "relu", "taylor")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearConfig(registry.MixerConfig):
  """Linear attention (``rope`` is not used).

  Attributes:
    feature_map: ``phi``: ``"identity"``, ``"elu_plus_one"``, ``"relu"``, ``"taylor"`` (Based's
      second-order map) or a function (see :func:`attn_jax.linear_attention`).
    decay: ``"none"``, ``"fixed"`` (per-head ALiBi-like slopes, as Lightning / RetNet) or
      ``"data"`` (a per-step, per-head log decay from the input: simple GLA / Mamba-2).
    normalize: divide by ``phi(q) . z`` (normalised linear attention).
    output_norm: RMS-normalise each head's output (Lightning / RetNet's group norm).
    chunk_size: chunk size of the chunked form (None: the backend's default).
  """

  feature_map: Any = "elu_plus_one"
  decay: str = "none"
  normalize: bool = True
  output_norm: bool = True
  chunk_size: int | None = None

  def validate(self):
    super().validate()
    if self.decay not in DECAYS:
      raise self.error(f"decay must be one of {DECAYS}, got {self.decay!r}")
    check_feature_map(self, self.feature_map)
    self.check_positive("chunk_size")
    for name in ("normalize", "output_norm"):
      if not isinstance(getattr(self, name), bool):
        raise self.error(f"{name} must be a bool, got {getattr(self, name)!r}")
    if self.decay != "none" and not self.causal:
      raise self.error(f"decay={self.decay!r} orders the tokens: it needs causal=True")


def check_feature_map(config, feature_map) -> None:
  if isinstance(feature_map, str):
    if feature_map not in FEATURE_MAPS:
      raise config.error(f"feature_map must be one of {FEATURE_MAPS} or a function, got {feature_map!r}")
  elif not callable(feature_map):
    raise config.error(f"feature_map must be a name or a function, got {feature_map!r}")


def fixed_log_decay(num_heads: int) -> jnp.ndarray:
  """Per-head log decays ``-slope_h`` with ALiBi's geometric slopes ``2^(-8 h / H)`` (Lightning,
  RetNet use the same family), ``[H]`` float32."""
  h = jnp.arange(1, num_heads + 1, dtype=jnp.float32)
  return -(2.0 ** (-8.0 * h / num_heads))


def primitive():
  """``attn_jax.linear_attention``, looked up when called so that a build without it fails at
  construction (the entry's ``requires``) and tests can substitute a stand-in."""
  return getattr(attn_jax, PRIMITIVE)


def step_fn(name: str):
  fn = getattr(attn_jax, STEP, None)
  if fn is None:
    raise ValueError(f"decoding with mixer {name!r} needs attn_jax.{STEP}, which this installation lacks")
  return fn


def zero_state(call, shapes: dict, dtype):
  """A zero state shaped like ``call(..., return_final_state=True)``'s (by abstract evaluation).

  ``shapes``: name -> shape of the one-token arguments of ``call``; float32 for names ending in
  ``decay``, ``dtype`` otherwise.
  """
  args = {n: None if s is None else jax.ShapeDtypeStruct(s, jnp.float32 if n.endswith("decay") else dtype)
          for n, s in shapes.items()}
  _, state = jax.eval_shape(lambda a: call(**a), args)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)


class LinearMixer(nnx.Module):
  """Linear attention with an optional fixed or data-dependent decay and output norm (mixer protocol)."""

  def __init__(self, config: LinearConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    del layer_index, num_layers
    self.config = config
    hq, d = config.num_heads, config.head_dim_for(dim)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj = common.Projections(config, dim, **kw)
    if config.decay == "data":
      self.decay_proj = nn.Dense(dim, hq, in_axes=("embed",), out_axes=("heads",),
                                 init=lambda key, shape, dt: jnp.zeros(shape, dt), **kw)
      # softplus(bias) near 0.05 starts each head with a memory of about 20 tokens.
      self.decay_bias = nnx.Param(jnp.full((hq,), math.log(math.expm1(0.05)), param_dtype),
                                  logical_axes=("heads",))
    else:
      self.decay_proj = None
      self.decay_bias = None
    if config.output_norm:
      self.out_norm = nn.RMSNorm(d, rngs=rngs, param_dtype=param_dtype, axis_name="head_dim")
    else:
      self.out_norm = None

  def _log_decay(self, x):
    """``None``, ``[H]`` (fixed) or ``[B, T, H]`` (data) log decays, float32, <= 0."""
    c = self.config
    if c.decay == "none":
      return None
    if c.decay == "fixed":
      return fixed_log_decay(c.num_heads)
    gate = self.decay_proj(x).astype(jnp.float32) + self.decay_bias[...].astype(jnp.float32)
    return -jax.nn.softplus(gate)

  def _out(self, o):
    if self.out_norm is not None:
      o = self.out_norm(o)
    return self.proj.o_proj(o)

  def _call(self, q, k, v, log_decay, *, initial_state=None, return_final_state=False, segment_ids=None):
    c = self.config
    # Context parallel when the active rules split seq (passed only then: a stand-in primitive
    # with the original signature keeps working).
    cp = context_parallel.from_active_rules(q.shape[1], k.shape[1], num_heads=q.shape[2],
                                            num_kv_heads=k.shape[2], batch=q.shape[0])
    extra = {} if cp is None else {"context_parallel": cp}
    return primitive()(q, k, v, log_decay=log_decay, feature_map=c.feature_map, normalize=c.normalize,
                       causal=c.causal, initial_state=initial_state, return_final_state=return_final_state,
                       segment_ids=segment_ids, chunk_size=c.chunk_size, implementation=c.implementation,
                       **extra)

  def __call__(self, x, *, segment_ids=None, **unused):
    """``x [B, T, C]`` -> ``[B, T, C]``; ``segment_ids`` reset the state between documents."""
    q, k, v = self.proj.qkv(x)
    return self._out(self._call(q, k, v, self._log_decay(x), segment_ids=segment_ids))

  def init_cache(self, batch: int, max_len: int, dtype) -> cache_lib.RecurrentCache:
    """A zero state shaped like the primitive's final state."""
    del max_len
    c = self.config
    if not c.causal:
      raise ValueError("decoding needs a causal linear attention (causal=True)")
    step_fn("linear")
    d = self.proj.q_proj.kernel[...].shape[-1]
    decay = {"none": None, "fixed": (c.num_heads,), "data": (batch, 1, c.num_heads)}[c.decay]
    state = zero_state(
        lambda q, k, v, log_decay: self._call(q, k, v, log_decay, return_final_state=True),
        dict(q=(batch, 1, c.num_heads, d), k=(batch, 1, c.kv_heads, d), v=(batch, 1, c.kv_heads, d),
             log_decay=decay), dtype)
    return cache_lib.RecurrentCache(state)

  def prefill(self, x, cache: cache_lib.RecurrentCache, **unused):
    q, k, v = self.proj.qkv(x)
    o, state = self._call(q, k, v, self._log_decay(x), initial_state=cache.state, return_final_state=True)
    return self._out(o), cache_lib.RecurrentCache(state)

  def decode(self, x, cache: cache_lib.RecurrentCache, **unused):
    """One recurrent step on ``x [B, 1, C]``."""
    c = self.config
    q, k, v = self.proj.qkv(x)
    log_decay = self._log_decay(x)
    if log_decay is not None and log_decay.ndim == 3:
      log_decay = log_decay[:, 0]
    state, o = step_fn("linear")(cache.state, q[:, 0], k[:, 0], v[:, 0], log_decay,
                                 feature_map=c.feature_map, normalize=c.normalize)
    return self._out(o[:, None]), cache_lib.RecurrentCache(state)


registry.register(registry.MixerEntry(
    name="linear",
    config=LinearConfig,
    layer=LinearMixer,
    family="linear",
    cache=cache_lib.RecurrentCache,
    requires=(PRIMITIVE,),
    description="linear attention with a feature map (elu+1, relu, Taylor, yours) and an optional "
                "fixed or data-dependent decay",
    paper="Katharopoulos et al. 2020, Transformers are RNNs (arXiv:2006.16236)",
    quality=(
        registry.QualityPreset("linear", default=True, description="normalised linear attention, elu + 1 features"),
        registry.QualityPreset("linear_decay", lambda t: dict(decay="data"),
                               description="linear attention with a data-dependent decay (simple GLA / Mamba-2)"),
    ),
    efficiency=(
        registry.EfficiencyPreset("linear elu+1 (xla)", (("implementation", "xla"),), quality="linear"),
    ),
))
