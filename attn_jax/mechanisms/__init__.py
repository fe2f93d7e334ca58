"""The literature's named attention mechanisms, built on the attn_jax primitives (no flax)."""

from attn_jax.mechanisms.block_topk import block_scores
from attn_jax.mechanisms.block_topk import topk_block_attention
from attn_jax.mechanisms.block_topk import topk_block_attention_reference
from attn_jax.mechanisms.block_topk import topk_block_mask
from attn_jax.mechanisms.core_context import CoreContextMask
from attn_jax.mechanisms.core_context import core_context_attention
from attn_jax.mechanisms.core_context import core_context_attention_reference
from attn_jax.mechanisms.core_context import core_tokens
from attn_jax.mechanisms.dhsa import chunk_similarity
from attn_jax.mechanisms.dhsa import dhsa_attention
from attn_jax.mechanisms.dhsa import dhsa_attention_reference
from attn_jax.mechanisms.dynamic_mask import dynamic_mask_attention
from attn_jax.mechanisms.dynamic_mask import dynamic_mask_attention_reference
from attn_jax.mechanisms.dynamic_mask import dynamic_mask_bias
from attn_jax.mechanisms.dynamic_mask import dynamic_mask_block_mask
from attn_jax.mechanisms.hyper import hyper_attention
from attn_jax.mechanisms.hyper import hyper_attention_reference
from attn_jax.mechanisms.hyper import lsh_codes
from attn_jax.mechanisms.landmark import landmark_attention
from attn_jax.mechanisms.landmark import landmark_attention_reference
from attn_jax.mechanisms.recycled import recycled_attention
from attn_jax.mechanisms.recycled import recycled_attention_reference
from attn_jax.mechanisms.routing import routing_attention
from attn_jax.mechanisms.routing import routing_attention_reference
from attn_jax.mechanisms.routing import routing_update_centroids
from attn_jax.mechanisms.superlinear import superlinear_attention
from attn_jax.mechanisms.superlinear import superlinear_attention_reference

from attn_jax.mechanisms.linear import aaren
from attn_jax.mechanisms.linear import aaren_init_state
from attn_jax.mechanisms.linear import aaren_step
from attn_jax.mechanisms.linear import based_linear_attention
from attn_jax.mechanisms.linear import jrt_prefix_linear_attention
from attn_jax.mechanisms.linear import jrt_prefix_state
from attn_jax.mechanisms.linear import lightnet_attention
from attn_jax.mechanisms.linear import lightnet_init_state
from attn_jax.mechanisms.linear import lightnet_step
from attn_jax.mechanisms.linear import lightning_attention
from attn_jax.mechanisms.linear import lightning_slopes
from attn_jax.mechanisms.linear import retention
from attn_jax.mechanisms.linear import retnet_decays
from attn_jax.mechanisms.linear import short_conv
from attn_jax.mechanisms.linear import sliding_window_attention
from attn_jax.mechanisms.compressed_conv import compressed_conv_attention
from attn_jax.mechanisms.compressed_conv import value_shift
from attn_jax.mechanisms.local_linear import local_linear_attention
from attn_jax.mechanisms.local_linear import local_linear_attention_reference
from attn_jax.mechanisms.moh import MoHGates
from attn_jax.mechanisms.moh import moh_attention
from attn_jax.mechanisms.moh import moh_attention_reference
from attn_jax.mechanisms.moh import moh_gates
from attn_jax.mechanisms.rcmha import rcmha_attention
from attn_jax.mechanisms.rcmha import relative_attention
from attn_jax.mechanisms.rcmha import relative_attention_reference
from attn_jax.mechanisms.rcmha import relative_frequencies
from attn_jax.mechanisms.selective import selective_attention
from attn_jax.mechanisms.selective import selective_attention_reference
from attn_jax.mechanisms.selective import selective_temperature
from attn_jax.mechanisms.titans import MemorySpec
from attn_jax.mechanisms.titans import MemoryState
from attn_jax.mechanisms.titans import init_memory
from attn_jax.mechanisms.titans import init_state as init_memory_state
from attn_jax.mechanisms.titans import memory_readout
from attn_jax.mechanisms.titans import neural_memory
from attn_jax.mechanisms.titans import neural_memory_step
from attn_jax.mechanisms.titans_blocks import TitansConfig
from attn_jax.mechanisms.titans_blocks import init_titans
from attn_jax.mechanisms.titans_blocks import mac_mask
from attn_jax.mechanisms.titans_blocks import titans_block
from attn_jax.mechanisms.titans_blocks import titans_mac
from attn_jax.mechanisms.titans_blocks import titans_mag
from attn_jax.mechanisms.titans_blocks import titans_mal

__all__ = [
    "aaren",
    "aaren_init_state",
    "aaren_step",
    "based_linear_attention",
    "jrt_prefix_linear_attention",
    "jrt_prefix_state",
    "lightnet_attention",
    "lightnet_init_state",
    "lightnet_step",
    "lightning_attention",
    "lightning_slopes",
    "retention",
    "retnet_decays",
    "short_conv",
    "sliding_window_attention",
]

# Attention layers and test-time memories.
__all__ += [
    "compressed_conv_attention", "value_shift", "local_linear_attention", "local_linear_attention_reference",
    "MoHGates", "moh_attention", "moh_attention_reference", "moh_gates", "rcmha_attention", "relative_attention",
    "relative_attention_reference", "relative_frequencies", "selective_attention", "selective_attention_reference",
    "selective_temperature", "MemorySpec", "MemoryState", "init_memory", "init_memory_state", "memory_readout",
    "neural_memory", "neural_memory_step", "TitansConfig", "init_titans", "mac_mask", "titans_block", "titans_mac",
    "titans_mag", "titans_mal",
]

# Content-dependent sparse attention.
__all__ += [
    "block_scores", "topk_block_attention", "topk_block_attention_reference", "topk_block_mask",
    "CoreContextMask", "core_context_attention", "core_context_attention_reference", "core_tokens",
    "chunk_similarity", "dhsa_attention", "dhsa_attention_reference", "dynamic_mask_attention",
    "dynamic_mask_attention_reference", "dynamic_mask_bias", "dynamic_mask_block_mask", "hyper_attention",
    "hyper_attention_reference", "lsh_codes", "landmark_attention", "landmark_attention_reference",
    "recycled_attention", "recycled_attention_reference", "routing_attention", "routing_attention_reference",
    "routing_update_centroids", "superlinear_attention", "superlinear_attention_reference",
]
