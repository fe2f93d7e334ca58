"""The registry of token-mixing mechanisms: config value -> layer, checks, decoding cache.

A :class:`Mechanism` entry says, for one value of ``AttentionConfig.mechanism``:

* ``layer``: the ``nnx.Module`` class built as ``layer(config, dim, rngs=..., dtype=...,
  param_dtype=...)``. It implements the mixer protocol:

  - ``__call__(x, *, positions, segment_ids=None, grid=None) -> y``: training and full
    recomputation, ``x, y [B, T, C]``;
  - ``init_cache(batch, max_len, dtype) -> cache``: the decoding cache, a pytree the mechanism
    chooses (a KV cache, a rolling KV cache, a recurrent state, a convolution window);
  - ``prefill(x, cache) -> (y, cache)``: the prompt at positions ``0 .. T-1``;
  - ``decode(x, cache, *, position) -> (y, cache)``: one token ``x [B, 1, C]``.

* ``requires``: names that must exist on ``attn_jax`` (the primitive the layer calls). When one
  is missing, :func:`build` fails at construction with a message naming it.
* ``check(config, platform)``: raises :class:`UnsupportedConfigError` when the config cannot
  run on ``platform`` ("cpu", "gpu", "tpu"), before any parameter is created or anything traced.
* ``cache``: a description of the decoding cache, for documentation and error messages.
* ``family``: the :mod:`attn_jax.dispatch` family whose backends ``implementation=`` names;
  ``uses_rope``: whether the layer applies ``config.rope``.

Register a new mechanism with :func:`register`; models pick it up through the config alone.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

import attn_jax
from attn_jax import dispatch
from attn_jax import masks as masks_lib
from attn_jax.layers import attention
from attn_jax.layers import config as config_lib
from attn_jax.layers import conv
from attn_jax.layers import linear_mixer
from attn_jax.layers import neighborhood_mixer


class UnsupportedConfigError(ValueError):
  """A mixer config that cannot run here (missing primitive, backend, platform or option)."""


@dataclasses.dataclass(frozen=True)
class Mechanism:
  name: str
  layer: type
  check: Callable[[config_lib.AttentionConfig, str], None]
  cache: str
  requires: tuple[str, ...] = ()
  family: str | None = None
  uses_rope: bool = False


_REGISTRY: dict[str, Mechanism] = {}


def register(mechanism: Mechanism) -> None:
  _REGISTRY[mechanism.name] = mechanism


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(name: str) -> Mechanism:
  if name not in _REGISTRY:
    raise UnsupportedConfigError(f"mechanism must be one of {sorted(_REGISTRY)}, got {name!r}")
  return _REGISTRY[name]


def check(config: config_lib.AttentionConfig, platform: str | None = None) -> Mechanism:
  """Raises :class:`UnsupportedConfigError` if ``config`` cannot run on ``platform``."""
  if not isinstance(config, config_lib.AttentionConfig):
    raise UnsupportedConfigError(f"config must be an AttentionConfig, got {type(config).__name__}")
  mech = get(config.mechanism)
  for name in mech.requires:
    if getattr(attn_jax, name, None) is None:
      raise UnsupportedConfigError(
          f"mechanism {mech.name!r} needs attn_jax.{name}, which this installation lacks")
  platform = platform or dispatch.current_platform()
  _check_common(config)
  _check_implementation(mech, config, platform)
  mech.check(config, platform)
  return mech


def build(config: config_lib.AttentionConfig, dim: int, *, rngs, dtype=None, param_dtype=None,
          platform: str | None = None):
  """Checks ``config`` and builds its layer for model width ``dim``."""
  mech = check(config, platform)
  hd = config.head_dim_for(dim)
  if hd < 1:
    raise UnsupportedConfigError(
        f"head_dim must be >= 1: dim {dim} // num_heads {config.num_heads} = {hd}; set head_dim")
  if mech.uses_rope and config.rope and hd % (2 * config.rope):
    raise UnsupportedConfigError(
        f"head_dim ({hd}) must be divisible by 2 * rope = {2 * config.rope} for {config.rope}-D RoPE")
  return mech.layer(config, dim, rngs=rngs, dtype=dtype or jnp.float32,
                    param_dtype=param_dtype or jnp.float32)


def _positive(config, name, allow_none=True):
  value = getattr(config, name)
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise UnsupportedConfigError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def _check_common(c):
  _positive(c, "num_heads", allow_none=False)
  _positive(c, "num_kv_heads")
  _positive(c, "head_dim")
  if c.num_heads % c.kv_heads:
    raise UnsupportedConfigError(
        f"num_heads ({c.num_heads}) must be a multiple of num_kv_heads ({c.kv_heads})")
  if c.rope not in (0, 1, 2, 3):
    raise UnsupportedConfigError(f"rope must be 0, 1, 2 or 3 (RoPE axes), got {c.rope!r}")


def _check_implementation(mech, c, platform):
  impl = c.implementation
  if impl is None or mech.family is None:
    return
  available = dispatch.backends(mech.family)
  if available and impl not in available:
    raise UnsupportedConfigError(
        f"mechanism {mech.name!r}: implementation={impl!r} is not available in this installation "
        f"(available: {sorted(available)})")
  # A Pallas kernel runs on its own platform, or on a CPU in interpret mode; never on the other
  # accelerator.
  for kernel_platform in ("tpu", "gpu"):
    if impl == f"pallas_{kernel_platform}" and platform not in (kernel_platform, "cpu"):
      raise UnsupportedConfigError(
          f"mechanism {mech.name!r}: implementation={impl!r} cannot run on platform {platform!r}")
  if impl == "cudnn" and platform != "gpu":
    raise UnsupportedConfigError(
        f"mechanism {mech.name!r}: implementation='cudnn' needs an NVIDIA GPU, platform is {platform!r}")


def _check_softmax(c, platform):
  del platform
  _positive(c, "window")
  _positive(c, "chunk_size")
  if isinstance(c.num_sink_tokens, bool) or not isinstance(c.num_sink_tokens, int) or c.num_sink_tokens < 0:
    raise UnsupportedConfigError(f"num_sink_tokens must be an int >= 0, got {c.num_sink_tokens!r}")
  if c.mask is not None and not isinstance(c.mask, masks_lib.Mask):
    raise UnsupportedConfigError(f"mask must be an attn_jax.masks.Mask or None, got {type(c.mask).__name__}")
  if c.chunk_size is not None and not c.causal:
    raise UnsupportedConfigError("chunk_size (chunked causal attention) needs causal=True")
  if c.rope_in_cache not in config_lib.ROPE_MODES:
    raise UnsupportedConfigError(f"rope_in_cache must be one of {config_lib.ROPE_MODES}, got {c.rope_in_cache!r}")
  if c.rolling_cache and not (c.mask is None and c.causal and c.window is not None and c.chunk_size is None):
    raise UnsupportedConfigError(
        "rolling_cache=True needs a causal sliding window (window=..., optionally num_sink_tokens) "
        "and no explicit mask or chunk_size: the cache keeps exactly the keys such a mask shows")
  if c.logits_soft_cap is not None and not (isinstance(c.logits_soft_cap, (int, float)) and c.logits_soft_cap > 0):
    raise UnsupportedConfigError(f"logits_soft_cap must be a positive float or None, got {c.logits_soft_cap!r}")
  shard_map = c.shard_map if c.shard_map is not None else (c.implementation or "").startswith("pallas")
  if shard_map and c.build_mask().depends_on_head:
    raise UnsupportedConfigError(
        "shard_map splits heads across devices, so the mask must not depend on the head index")


def _per_axis_ints(c, name):
  value = getattr(c, name)
  values = value if isinstance(value, (tuple, list)) else (value,)
  if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
    raise UnsupportedConfigError(f"{name} must be a positive int or a tuple of them, got {value!r}")


def _check_neighborhood(c, platform):
  del platform
  for name in ("kernel_size", "stride", "dilation"):
    _per_axis_ints(c, name)
  if c.kv_heads != c.num_heads:
    raise UnsupportedConfigError(
        f"mechanism 'neighborhood' needs num_kv_heads == num_heads, got {c.kv_heads} and {c.num_heads}")
  if c.learned_sinks or c.window is not None or c.mask is not None:
    raise UnsupportedConfigError(
        "mechanism 'neighborhood' takes kernel_size / stride / dilation, not learned_sinks, window or mask")


def _check_linear(c, platform):
  del platform
  if c.decay not in linear_mixer.DECAYS:
    raise UnsupportedConfigError(f"decay must be one of {linear_mixer.DECAYS}, got {c.decay!r}")
  if not isinstance(c.feature_map, str) and not callable(c.feature_map):
    raise UnsupportedConfigError(f"feature_map must be a name or a function, got {c.feature_map!r}")
  _positive(c, "linear_chunk_size")
  if c.window is not None or c.mask is not None or c.learned_sinks:
    raise UnsupportedConfigError("mechanism 'linear' takes no window, mask or learned_sinks")


def _check_short_conv(c, platform):
  del platform
  _positive(c, "conv_size", allow_none=False)
  if not c.causal:
    raise UnsupportedConfigError("mechanism 'short_conv' is a causal convolution: set causal=True")


register(Mechanism(
    name="softmax", layer=attention.SoftmaxAttention, check=_check_softmax, family="softmax",
    uses_rope=True,
    cache="KVCache: keys/values of every position, or num_sink_tokens + window slots (rolling)"))
register(Mechanism(
    name="neighborhood", layer=neighborhood_mixer.NeighborhoodMixer, check=_check_neighborhood,
    requires=(neighborhood_mixer.PRIMITIVE,), family="neighborhood", uses_rope=True,
    cache="none (non-causal grids; causal 1D local attention decodes as softmax with a window)"))
register(Mechanism(
    name="linear", layer=linear_mixer.LinearMixer, check=_check_linear,
    requires=(linear_mixer.PRIMITIVE,), family="linear",
    cache="RecurrentCache: the primitive's final state (S, and z when normalised), constant size"))
register(Mechanism(
    name="short_conv", layer=conv.ShortConv, check=_check_short_conv,
    cache="ConvCache: the last conv_size - 1 inputs, constant size"))
