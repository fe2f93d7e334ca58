"""Decoder-only language model (Llama-style): pre-norm blocks, RoPE, SwiGLU, RMSNorm, untied head.

The mixer of each layer comes from ``config.schedule`` (typed mixer configs of
:mod:`attn_jax.layers.registry`, cycled), so a pure softmax model, a sliding-window + sinks
model, a Based model or a 7 : 1 linear/softmax hybrid differ only in the config.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax
from flax import nnx

from attn_jax import sharding
from attn_jax.layers import block as block_lib
from attn_jax.layers import nn
from attn_jax.layers import registry


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Decoder-only LM.

  Attributes:
    vocab_size, dim, num_layers, mlp_dim: sizes.
    schedule: a typed mixer config (:func:`attn_jax.layers.mixer_config`), or a tuple of them
      cycled over the layers (hybrids).
    dtype: activation/compute dtype name; param_dtype: parameter dtype name.
  """

  vocab_size: int = 256
  dim: int = 64
  num_layers: int = 2
  mlp_dim: int = 128
  schedule: registry.MixerConfig | tuple[registry.MixerConfig, ...] = registry.mixer_config("softmax")
  dtype: str = "float32"
  param_dtype: str = "float32"

  def replace(self, **changes) -> "LMConfig":
    return dataclasses.replace(self, **changes)

  def layer_configs(self) -> tuple[registry.MixerConfig, ...]:
    return block_lib.expand_schedule(self.schedule, self.num_layers)


def tiny(**changes) -> LMConfig:
  """2 layers, width 32, 4 query / 2 KV heads: tests and smoke runs."""
  return LMConfig(vocab_size=64, dim=32, num_layers=2, mlp_dim=64,
                  schedule=registry.mixer_config("softmax", num_heads=4, num_kv_heads=2)).replace(**changes)


def small(**changes) -> LMConfig:
  """24M non-embedding parameters: 8 layers, width 512, 8 query / 4 KV heads."""
  return LMConfig(vocab_size=32000, dim=512, num_layers=8, mlp_dim=1408,
                  schedule=registry.mixer_config("softmax", num_heads=8, num_kv_heads=4)).replace(**changes)


def base(**changes) -> LMConfig:
  """75M non-embedding parameters: 12 layers, width 768, 12 query / 4 KV heads."""
  return LMConfig(vocab_size=32000, dim=768, num_layers=12, mlp_dim=2048,
                  schedule=registry.mixer_config("softmax", num_heads=12, num_kv_heads=4)).replace(**changes)


class DecoderLM(nnx.Module):
  """``tokens [B, T] -> logits [B, T, vocab]`` (float32)."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.embed = nn.Embed(config.vocab_size, config.dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    layer_configs = config.layer_configs()
    self.blocks = nn.module_list(
        block_lib.Block(c, config.dim, config.mlp_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                        layer_index=i, num_layers=len(layer_configs))
        for i, c in enumerate(layer_configs))
    self.norm = nn.RMSNorm(config.dim, rngs=rngs, param_dtype=param_dtype)
    self.head = nn.Dense(config.dim, config.vocab_size, in_axes=("embed",), out_axes=("vocab",),
                         rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def _embed(self, tokens):
    if tokens.ndim != 2:
      raise ValueError(f"tokens must have shape [batch, seq], got {tokens.shape}")
    return sharding.constrain(self.embed(tokens), ("batch", "seq", "act_embed"))

  def _logits(self, x):
    logits = self.head(self.norm(x)).astype(jnp.float32)
    return sharding.constrain(logits, ("batch", "seq", "act_vocab"))

  def __call__(self, tokens, *, positions=None, segment_ids=None, return_aux=False, **inputs):
    """Full forward: ``tokens [B, T]`` -> ``logits [B, T, V]``.

    ``positions [B, T]`` default to ``0 .. T-1``; ``segment_ids [B, T]`` pack documents
    (attention, convolutions and linear states do not cross them); ``**inputs`` go to every
    mixer (per-token inputs such as modality ids). With ``return_aux``: ``(logits, aux_losses)``,
    the mixers' auxiliary losses summed over layers (``{}`` for most mechanisms).
    """
    x = self._embed(tokens)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    aux = {}
    for blk in self.blocks:
      x, blk_aux = blk(x, positions=positions, segment_ids=segment_ids, **inputs)
      aux = registry.add_losses(aux, blk_aux)
      x = sharding.constrain(x, ("batch", "seq", "act_embed"))
    logits = self._logits(x)
    return (logits, aux) if return_aux else logits

  def loss(self, batch):
    """Mean next-token cross-entropy of ``batch["tokens"] [B, T+1]``, plus the mixers' auxiliary losses."""
    tokens = batch["tokens"]
    logits, aux = self(tokens[:, :-1], return_aux=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return ce + sum(aux.values())

  def init_cache(self, batch: int, max_len: int):
    """One cache per layer, for sequences of up to ``max_len`` tokens."""
    dtype = jnp.dtype(self.config.dtype)
    return tuple(blk.init_cache(batch, max_len, dtype) for blk in self.blocks)

  def prefill(self, tokens, cache):
    """``tokens [B, T]`` at positions ``0 .. T-1`` -> ``(logits [B, T, V], cache)``."""
    x = self._embed(tokens)
    new = []
    for blk, c in zip(self.blocks, cache):
      x, c = blk.prefill(x, c)
      new.append(c)
    return self._logits(x), tuple(new)

  def decode(self, token, cache, *, position):
    """``token [B]`` at ``position`` (traced int) -> ``(logits [B, V], cache)``."""
    x = self._embed(token[:, None])
    new = []
    for blk, c in zip(self.blocks, cache):
      x, c = blk.decode(x, c, position=position)
      new.append(c)
    return self._logits(x)[:, 0], tuple(new)

