"""flax.nnx layers of the linear-attention family, on :mod:`attn_jax.mechanisms.linear`.

Every layer maps ``x [B, T, F] -> [B, T, F]`` (LightNet also ``[B, *spatial, F]`` when
non-causal) with its paper's projections, feature maps, norms and gates around the mechanism.
The causal layers with a constant-size recurrent state also decode one token at a time:
``init_state(batch)`` and ``step(x_t [B, F], state) -> (y_t [B, F], state)`` give the same
outputs as the full call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn_jax.linear import api as linear_api
from attn_jax.mechanisms import linear as mech


def _positive_int(name, value):
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return value


def _head_dim(num_features, num_heads, head_dim):
  _positive_int("num_features", num_features)
  _positive_int("num_heads", num_heads)
  if head_dim is None:
    if num_features % num_heads:
      raise ValueError(f"num_features ({num_features}) must be divisible by num_heads ({num_heads}) "
                       f"unless head_dim is given")
    return num_features // num_heads
  return _positive_int("head_dim", head_dim)


def _check_tokens(x, num_features, name="x"):
  if not hasattr(x, "ndim") or x.ndim != 3 or x.shape[-1] != num_features:
    raise ValueError(f"{name} must have shape [batch, seq, {num_features}], got "
                     f"{tuple(x.shape) if hasattr(x, 'shape') else type(x).__name__}")


def _projections(num_features, shapes, rngs, **kw):
  return {name: nnx.LinearGeneral(num_features, shape, rngs=rngs, **kw) for name, shape in shapes.items()}


def _head_group_norm(x, scale, bias, eps=1e-6):
  """RetNet's group norm: one group per head, per token (``x [..., H, D]``, affine ``[H, D]``)."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = ((xf - mean) ** 2).mean(-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


class LightningAttention(nnx.Module):
  """TransNormerLLM's gated linear attention with Lightning Attention 1 or 2 inside.

  ``q = silu(x Wq)``, ``k = silu(x Wk)``, ``v = x Wv``, ``u = x Wu``; ``o`` = Lightning attention
  with per-head decays ``exp(-slope_h)`` (:func:`attn_jax.mechanisms.lightning_slopes`, scaled
  by the layer's depth); output ``Wo (RMSNorm(o) * sigmoid(u))``.

  Args:
    num_features: model width; num_heads: heads; head_dim: default ``num_features // num_heads``.
    version: 1 (one quadratic block) or 2 (chunked, intra/inter-chunk).
    layer_index, num_layers: depth scaling of the slopes.
    implementation: linear-attention backend (None: the platform's default).
  """

  def __init__(self, num_features: int, num_heads: int, *, head_dim: int | None = None, version: int = 2,
               layer_index: int = 0, num_layers: int = 1, implementation: str | None = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    d = _head_dim(num_features, num_heads, head_dim)
    if version not in (1, 2):
      raise ValueError(f"version must be 1 or 2, got {version!r}")
    self.num_features, self.num_heads, self.head_dim, self.version = num_features, num_heads, d, version
    self.implementation = implementation
    self.slopes = tuple(float(s) for s in mech.lightning_slopes(num_heads, layer_index, num_layers))
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype)
    p = _projections(num_features, {n: (num_heads, d) for n in "qkvu"}, rngs, **kw)
    self.query, self.key, self.value, self.gate = p["q"], p["k"], p["v"], p["u"]
    self.norm = nnx.RMSNorm(num_heads * d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.out = nnx.LinearGeneral((num_heads, d), num_features, axis=(-2, -1), rngs=rngs, **kw)

  def _inputs(self, x):
    return nnx.silu(self.query(x)), nnx.silu(self.key(x)), self.value(x), self.gate(x)

  def _finish(self, o, u):
    lead = o.shape[:-2]
    o = self.norm(o.reshape(lead + (-1,))).reshape(o.shape)
    return self.out(o * jax.nn.sigmoid(u))

  def __call__(self, x, *, initial_state=None, return_state=False):
    """``x [B, T, F] -> [B, T, F]`` (and the final state ``[B, H, D, D]`` with ``return_state``)."""
    _check_tokens(x, self.num_features)
    q, k, v, u = self._inputs(x)
    o, state = mech.lightning_attention(q, k, v, np.asarray(self.slopes, np.float32), version=self.version,
                                        initial_state=initial_state, return_final_state=True,
                                        implementation=self.implementation)
    y = self._finish(o, u)
    return (y, state) if return_state else y

  def init_state(self, batch: int):
    return jnp.zeros((batch, self.num_heads, self.head_dim, self.head_dim), jnp.float32)

  def step(self, x_t, state):
    """One decoding step: ``x_t [B, F]`` -> ``(y_t [B, F], state)``."""
    q, k, v, u = self._inputs(x_t)
    state, o = linear_api.linear_attention_step(state, q, k, v, -jnp.asarray(self.slopes, jnp.float32))
    return self._finish(o, u), state


class BasedAttention(nnx.Module):
  """Based's three token mixers in one layer: short convolution, Taylor linear attention, window.

  ``x -> xc = x + short_conv(x)`` (causal depthwise, width ``conv_size``); then the sum of a
  normalised Taylor linear attention on ``feature_dim``-wide queries and keys (global, constant
  state) and causal softmax attention over the last ``window`` tokens (local, exact), followed by
  the output projection. (The Based paper interleaves these mixers across layers; here they sit
  side by side so that one layer has all three.)
  """

  def __init__(self, num_features: int, num_heads: int, *, feature_dim: int = 16, window: int = 64,
               conv_size: int = 3, head_dim: int | None = None, implementation: str | None = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    d = _head_dim(num_features, num_heads, head_dim)
    self.num_features, self.window = num_features, _positive_int("window", window)
    _positive_int("feature_dim", feature_dim)
    self.implementation = implementation
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype)
    p = _projections(num_features, {"lq": (num_heads, feature_dim), "lk": (num_heads, feature_dim),
                                    "lv": (num_heads, d), "wq": (num_heads, d), "wk": (num_heads, d),
                                    "wv": (num_heads, d)}, rngs, **kw)
    self.lin_q, self.lin_k, self.lin_v = p["lq"], p["lk"], p["lv"]
    self.win_q, self.win_k, self.win_v = p["wq"], p["wk"], p["wv"]
    self.conv = nnx.Param(jnp.zeros((_positive_int("conv_size", conv_size), num_features), param_dtype))
    self.out = nnx.LinearGeneral((num_heads, d), num_features, axis=(-2, -1), rngs=rngs, **kw)

  def __call__(self, x):
    _check_tokens(x, self.num_features)
    xc = x + mech.short_conv(x, self.conv[...])
    linear = mech.based_linear_attention(self.lin_q(xc), self.lin_k(xc), self.lin_v(xc),
                                         implementation=self.implementation)
    local = mech.sliding_window_attention(self.win_q(xc), self.win_k(xc), self.win_v(xc), self.window)
    return self.out(linear + local.astype(linear.dtype))


class JRTPrefixAttention(nnx.Module):
  """JRT-Prefix linear attention: the first ``prefix_len`` tokens are also read non-causally.

  ``q, k, v`` and the prefix's own ``ke, ve`` are projections of ``x``; the output is
  :func:`attn_jax.mechanisms.jrt_prefix_linear_attention` (feature map ``elu + 1`` by default,
  normalised), then the output projection.
  """

  def __init__(self, num_features: int, num_heads: int, *, head_dim: int | None = None,
               feature_map="elu_plus_one", implementation: str | None = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    d = _head_dim(num_features, num_heads, head_dim)
    self.num_features, self.feature_map, self.implementation = num_features, feature_map, implementation
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype)
    p = _projections(num_features, {n: (num_heads, d) for n in ("q", "k", "v", "ke", "ve")}, rngs, **kw)
    self.query, self.key, self.value = p["q"], p["k"], p["v"]
    self.prefix_key, self.prefix_value = p["ke"], p["ve"]
    self.out = nnx.LinearGeneral((num_heads, d), num_features, axis=(-2, -1), rngs=rngs, **kw)

  def __call__(self, x, prefix_len: int):
    _check_tokens(x, self.num_features)
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or not 0 < prefix_len <= x.shape[1]:
      raise ValueError(f"prefix_len must be an int in [1, {x.shape[1]}], got {prefix_len!r}")
    prefix = x[:, :prefix_len]
    o = mech.jrt_prefix_linear_attention(self.query(x), self.key(x), self.value(x), self.prefix_key(prefix),
                                         self.prefix_value(prefix), feature_map=self.feature_map,
                                         implementation=self.implementation)
    return self.out(o)


class MultiScaleRetention(nnx.Module):
  """RetNet's multi-scale retention: per-head decays ``1 - 2^(-5-h)``, group norm, swish gate.

  ``y = Wo (swish(x Wg) * GroupNorm_heads(Retention(x Wq, x Wk, x Wv)))``. (RetNet's xPos
  rotation of q and k is not applied.)
  """

  def __init__(self, num_features: int, num_heads: int, *, head_dim: int | None = None,
               value_dim: int | None = None, implementation: str | None = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    d = _head_dim(num_features, num_heads, head_dim)
    dv = d if value_dim is None else _positive_int("value_dim", value_dim)
    self.num_features, self.num_heads, self.head_dim, self.value_dim = num_features, num_heads, d, dv
    self.implementation = implementation
    self.gammas = tuple(float(g) for g in mech.retnet_decays(num_heads))
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype)
    p = _projections(num_features, {"q": (num_heads, d), "k": (num_heads, d), "v": (num_heads, dv),
                                    "g": (num_heads, dv)}, rngs, **kw)
    self.query, self.key, self.value, self.gate = p["q"], p["k"], p["v"], p["g"]
    self.norm_scale = nnx.Param(jnp.ones((num_heads, dv), param_dtype))
    self.norm_bias = nnx.Param(jnp.zeros((num_heads, dv), param_dtype))
    self.out = nnx.LinearGeneral((num_heads, dv), num_features, axis=(-2, -1), rngs=rngs, **kw)

  def __call__(self, x):
    _check_tokens(x, self.num_features)
    o = mech.retention(self.query(x), self.key(x), self.value(x), np.asarray(self.gammas, np.float32),
                       implementation=self.implementation)
    o = _head_group_norm(o, self.norm_scale[...], self.norm_bias[...])
    return self.out(nnx.swish(self.gate(x)) * o)


class LightNetAttention(nnx.Module):
  """LightNet's additive linear recurrence with softmax-normalised keys.

  ``q = silu(x Wq)``, ``k = x Wk``, ``v = x Wv``; :func:`attn_jax.mechanisms.lightnet_attention`;
  a per-head RMS norm; the output projection. Non-causal inputs may have several spatial axes
  (``[B, H, W, F]``): one global sum covers them all.
  """

  def __init__(self, num_features: int, num_heads: int, *, causal: bool = True, head_dim: int | None = None,
               implementation: str | None = None, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    d = _head_dim(num_features, num_heads, head_dim)
    self.num_features, self.causal, self.implementation = num_features, causal, implementation
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype)
    p = _projections(num_features, {n: (num_heads, d) for n in "qkv"}, rngs, **kw)
    self.query, self.key, self.value = p["q"], p["k"], p["v"]
    self.norm = nnx.RMSNorm(d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.out = nnx.LinearGeneral((num_heads, d), num_features, axis=(-2, -1), rngs=rngs, **kw)

  def __call__(self, x):
    if not hasattr(x, "ndim") or x.ndim < 3 or x.shape[-1] != self.num_features or (self.causal and x.ndim != 3):
      raise ValueError(f"x must have shape [batch, {'seq' if self.causal else '*spatial'}, {self.num_features}], "
                       f"got {tuple(x.shape) if hasattr(x, 'shape') else type(x).__name__}")
    o = mech.lightnet_attention(nnx.silu(self.query(x)), self.key(x), self.value(x), causal=self.causal,
                                implementation=self.implementation)
    return self.out(self.norm(o))


class AarenAttention(nnx.Module):
  """Aaren: softmax attention of one learned query per head over the prefix, as an RNN.

  ``y_t = Wo softmax-attention(query_h, x_{<=t} Wk, x_{<=t} Wv)``; decoding keeps
  ``(m, u, w)`` per head (O(1) per token).
  """

  def __init__(self, num_features: int, num_heads: int, *, head_dim: int | None = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    d = _head_dim(num_features, num_heads, head_dim)
    self.num_features, self.num_heads, self.head_dim = num_features, num_heads, d
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype)
    p = _projections(num_features, {n: (num_heads, d) for n in "kv"}, rngs, **kw)
    self.key, self.value = p["k"], p["v"]
    self.query = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (num_heads, d), param_dtype))
    self.out = nnx.LinearGeneral((num_heads, d), num_features, axis=(-2, -1), rngs=rngs, **kw)

  def __call__(self, x):
    _check_tokens(x, self.num_features)
    return self.out(mech.aaren(self.query[...], self.key(x), self.value(x)))

  def init_state(self, batch: int):
    return mech.aaren_init_state(batch, self.num_heads, self.head_dim)

  def step(self, x_t, state):
    """One decoding step: ``x_t [B, F]`` -> ``(y_t [B, F], state)``."""
    state, o = mech.aaren_step(state, self.query[...], self.key(x_t), self.value(x_t))
    return self.out(o), state
