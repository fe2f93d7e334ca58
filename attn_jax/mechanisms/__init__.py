"""The literature's named attention mechanisms, built on the attn_jax primitives (no flax)."""

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
