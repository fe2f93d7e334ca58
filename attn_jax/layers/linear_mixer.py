"""Linear-attention mixer (the ``"linear"`` mechanism) on ``attn_jax.linear_attention``.

The primitive (issue 5) computes ``S_t = a_t S_{t-1} + phi(k_t) v_t^T``, ``o_t = phi(q_t)^T S_t``
(normalised by ``phi(q_t)^T z_t`` when asked) in chunked form for training and prefill, and a
recurrent step for decoding. This layer adds the projections, the decay parameterisation and
the per-head output norm, and keeps the primitive's final state as its decoding cache
(:class:`~attn_jax.layers.cache.RecurrentCache`, constant size).

The primitive is looked up on ``attn_jax`` when the layer runs (``PRIMITIVE`` / ``STEP``), so a
build without it fails at construction (see :mod:`attn_jax.layers.mechanisms`) and a build with
it needs no change here beyond matching the call signature in :meth:`LinearMixer._call` and
:meth:`LinearMixer.decode`. The named mechanisms of the linear family (Lightning, Based,
RetNet, ...) are standalone layers in :mod:`attn_jax.layers.linear`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

import attn_jax
from attn_jax import sharding
from attn_jax.context_parallel import config as context_parallel
from attn_jax.layers import attention
from attn_jax.layers import cache as cache_lib
from attn_jax.layers import config as config_lib
from attn_jax.layers import nn

PRIMITIVE = "linear_attention"
STEP = "linear_attention_step"
DECAYS = ("none", "fixed", "data")


def fixed_log_decay(num_heads: int) -> jnp.ndarray:
  """Per-head log decays ``-slope_h`` with ALiBi's geometric slopes ``2^(-8 h / H)`` (Lightning,
  RetNet use the same family), ``[H]`` float32."""
  h = jnp.arange(1, num_heads + 1, dtype=jnp.float32)
  return -(2.0 ** (-8.0 * h / num_heads))


class LinearMixer(nnx.Module):
  """The model zoo's linear-attention mixer: optional fixed or data-dependent decay, output norm."""

  def __init__(self, config: config_lib.AttentionConfig, dim: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.config = config
    hq, d = config.num_heads, config.head_dim_for(dim)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj = attention.Projections(config, dim, **kw)
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

  def _qkv(self, x):
    q = sharding.constrain(self.proj.q_proj(x), ("batch", "seq", "act_heads", None))
    k = sharding.constrain(self.proj.k_proj(x), ("batch", "seq", "act_kv_heads", None))
    v = sharding.constrain(self.proj.v_proj(x), ("batch", "seq", "act_kv_heads", None))
    return q, k, v

  def _out(self, o):
    if self.out_norm is not None:
      o = self.out_norm(o)
    return self.proj.o_proj(o)

  def _call(self, q, k, v, log_decay, *, initial_state=None, return_final_state=False,
            segment_ids=None):
    c = self.config
    fn = getattr(attn_jax, PRIMITIVE)
    # Context parallel when the active rules split seq (passed only then: a stand-in primitive
    # with the original signature keeps working).
    cp = context_parallel.from_active_rules(q.shape[1], k.shape[1], num_heads=q.shape[2],
                                            num_kv_heads=k.shape[2], batch=q.shape[0])
    extra = {} if cp is None else {"context_parallel": cp}
    return fn(q, k, v, log_decay=log_decay, feature_map=c.feature_map, normalize=c.normalize,
              causal=c.causal, initial_state=initial_state, return_final_state=return_final_state,
              segment_ids=segment_ids, chunk_size=c.linear_chunk_size,
              implementation=c.implementation, **extra)

  def __call__(self, x, *, segment_ids=None, **unused):
    """``x [B, T, C]`` -> ``[B, T, C]``; ``segment_ids`` reset the state between documents."""
    q, k, v = self._qkv(x)
    return self._out(self._call(q, k, v, self._log_decay(x), segment_ids=segment_ids))

  def init_cache(self, batch: int, max_len: int, dtype) -> cache_lib.RecurrentCache:
    """A zero state shaped like the primitive's final state (found by abstract evaluation)."""
    del max_len
    if not self.config.causal:
      raise ValueError("decoding needs a causal linear attention (causal=True)")
    if getattr(attn_jax, STEP, None) is None:
      raise ValueError(f"decoding with mechanism 'linear' needs attn_jax.{STEP}, which this "
                       "installation lacks")
    c = self.config
    d = self.proj.q_proj.kernel[...].shape[-1]
    q = jax.ShapeDtypeStruct((batch, 1, c.num_heads, d), dtype)
    kv = jax.ShapeDtypeStruct((batch, 1, c.kv_heads, d), dtype)
    decay = {"none": None, "fixed": jax.ShapeDtypeStruct((c.num_heads,), jnp.float32),
             "data": jax.ShapeDtypeStruct((batch, 1, c.num_heads), jnp.float32)}[c.decay]
    _, state = jax.eval_shape(
        lambda q, k, v, a: self._call(q, k, v, a, return_final_state=True), q, kv, kv, decay)
    return cache_lib.RecurrentCache(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))

  def prefill(self, x, cache: cache_lib.RecurrentCache, **unused):
    q, k, v = self._qkv(x)
    o, state = self._call(q, k, v, self._log_decay(x), initial_state=cache.state,
                          return_final_state=True)
    return self._out(o), cache_lib.RecurrentCache(state)

  def decode(self, x, cache: cache_lib.RecurrentCache, **unused):
    """One recurrent step on ``x [B, 1, C]``."""
    c = self.config
    q, k, v = self._qkv(x)
    log_decay = self._log_decay(x)
    if log_decay is not None and log_decay.ndim == 3:
      log_decay = log_decay[:, 0]
    step = getattr(attn_jax, STEP)
    state, o = step(cache.state, q[:, 0], k[:, 0], v[:, 0], log_decay,
                    feature_map=c.feature_map, normalize=c.normalize)
    return self._out(o[:, None]), cache_lib.RecurrentCache(state)
