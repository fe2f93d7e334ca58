"""flax.nnx layers built on the attn_jax primitives (imports flax; ``import attn_jax`` does not).

Token mixers come from one registry (:mod:`attn_jax.layers.registry`): each mechanism is a module
of :mod:`attn_jax.layers.mixers` declaring a typed config, its layer, its decoding cache and its
benchmark presets. ``mixer_names()`` lists them; ``mixer_config(name, **fields)`` builds a
config, which models take as a value (one, or a tuple cycled over layers for hybrids).
"""

from attn_jax.layers import block
from attn_jax.layers import cache
from attn_jax.layers import mixers
from attn_jax.layers import neighborhood
from attn_jax.layers import nn
from attn_jax.layers import partitioning
from attn_jax.layers import registry
from attn_jax.layers import rope
from attn_jax.layers.block import Block, expand_schedule
from attn_jax.layers.cache import ConvCache, CrossKVCache, KVCache, RecurrentCache
from attn_jax.layers.mixers.aaren import AarenAttention, AarenConfig
from attn_jax.layers.mixers.based import BasedAttention, BasedCache, BasedConfig
from attn_jax.layers.mixers.gla import GatedLinearAttention, GLAConfig
from attn_jax.layers.mixers.jrt import JRTConfig, JRTPrefixAttention
from attn_jax.layers.mixers.lightning import LightningAttention, LightningConfig
from attn_jax.layers.mixers.lightnet import LightNetAttention, LightNetConfig
from attn_jax.layers.mixers.linear import LinearConfig, LinearMixer
from attn_jax.layers.mixers.neighborhood import NeighborhoodConfig, NeighborhoodMixer
from attn_jax.layers.mixers.retnet import MultiScaleRetention, RetNetConfig
from attn_jax.layers.mixers.short_conv import ShortConv, ShortConvConfig
from attn_jax.layers.mixers.softmax import CrossAttention, SoftmaxAttention, SoftmaxConfig
from attn_jax.layers.neighborhood import NeighborhoodAttention
from attn_jax.layers.nn import Dense, Embed, RMSNorm, SwiGLU
from attn_jax.layers.registry import (EfficiencyPreset, MixerConfig, MixerEntry, MixerOutput, QualityPreset,
                                      Task, UnsupportedConfigError, build as build_mixer, get as mixer_entry,
                                      mixer_config, mixer_names)
from attn_jax.layers.rope import apply_rope, grid_positions
# The content-dependent sparse mixers.
from attn_jax.layers.mixers.block_topk import BlockTopKAttention, BlockTopKConfig
from attn_jax.layers.mixers.core_context import CoreContextAttention, CoreContextConfig
from attn_jax.layers.mixers.dhsa import DHSAAttention, DHSAConfig
from attn_jax.layers.mixers.dynamic_mask import DynamicMaskAttention, DynamicMaskConfig
from attn_jax.layers.mixers.hyper import HyperAttention, HyperConfig
from attn_jax.layers.mixers.landmark import LandmarkAttention, LandmarkConfig
from attn_jax.layers.mixers.power import PowerAttention, PowerConfig
from attn_jax.layers.mixers.recycled import RecycledAttention, RecycledCache, RecycledConfig
from attn_jax.layers.mixers.routing import Centroids, RoutingAttention, RoutingConfig
from attn_jax.layers.mixers.superlinear import SuperlinearAttention, SuperlinearConfig

__all__ = [
    "AarenAttention",
    "AarenConfig",
    "BasedAttention",
    "BasedCache",
    "BasedConfig",
    "Block",
    "ConvCache",
    "CrossAttention",
    "CrossKVCache",
    "Dense",
    "EfficiencyPreset",
    "Embed",
    "GLAConfig",
    "GatedLinearAttention",
    "JRTConfig",
    "JRTPrefixAttention",
    "KVCache",
    "LightNetAttention",
    "LightNetConfig",
    "LightningAttention",
    "LightningConfig",
    "LinearConfig",
    "LinearMixer",
    "MixerConfig",
    "MixerEntry",
    "MixerOutput",
    "MultiScaleRetention",
    "NeighborhoodAttention",
    "NeighborhoodConfig",
    "NeighborhoodMixer",
    "QualityPreset",
    "RMSNorm",
    "RecurrentCache",
    "RetNetConfig",
    "ShortConv",
    "ShortConvConfig",
    "SoftmaxAttention",
    "SoftmaxConfig",
    "SwiGLU",
    "Task",
    "UnsupportedConfigError",
    "apply_rope",
    "build_mixer",
    "expand_schedule",
    "grid_positions",
    "mixer_config",
    "mixer_entry",
    "mixer_names",
    "registry",
]

__all__ += [
    "BlockTopKAttention", "BlockTopKConfig", "CoreContextAttention", "CoreContextConfig", "DHSAAttention",
    "DHSAConfig", "DynamicMaskAttention", "DynamicMaskConfig", "HyperAttention", "HyperConfig",
    "LandmarkAttention", "LandmarkConfig", "PowerAttention", "PowerConfig", "RecycledAttention", "RecycledCache",
    "RecycledConfig", "Centroids", "RoutingAttention", "RoutingConfig", "SuperlinearAttention", "SuperlinearConfig",
]

_REMOVED = {
    "AttentionConfig": "the flat AttentionConfig was replaced by one typed config per mechanism: "
                       "attn_jax.layers.mixer_config('softmax', num_heads=4, window=256) (or "
                       "layers.SoftmaxConfig(...)); the old field `mechanism` is the name, the "
                       "linear family's `linear_chunk_size` is now LinearConfig.chunk_size; "
                       "mixer_names() lists the mechanisms",
    "mechanisms": "attn_jax.layers.mechanisms was replaced by the mixer registry "
                  "attn_jax.layers.registry (mixer_names, mixer_config, build_mixer, mixer_entry)",
}


def __getattr__(name):
  if name in _REMOVED:
    raise AttributeError(f"attn_jax.layers.{name} no longer exists: {_REMOVED[name]}")
  raise AttributeError(f"module 'attn_jax.layers' has no attribute {name!r}")
