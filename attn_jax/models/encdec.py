"""Encoder-decoder transformer with cross attention (the two cross patterns of CAB).

The encoder is non-causal self attention over the source; each decoder layer has causal self
attention, cross attention to the encoder output and an MLP. ``cross.causal=False`` is CAB's
non-causal cross pattern (every target position sees the whole source); ``cross.causal=True``
is the causal cross pattern (target position ``i`` sees source positions ``j <= i``).
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
class EncDecConfig:
  """Encoder-decoder over a shared vocabulary.

  Attributes:
    encoder: typed mixer config(s) of the encoder (non-causal), cycled over ``encoder_layers``.
    decoder: mixer config(s) of the decoder self mixing (causal), cycled over ``decoder_layers``.
    cross: the cross-attention config, of a mechanism with a cross form (``"softmax"``);
      ``causal`` picks the pattern.
  """

  vocab_size: int = 256
  dim: int = 64
  encoder_layers: int = 2
  decoder_layers: int = 2
  mlp_dim: int = 128
  encoder: registry.MixerConfig | tuple[registry.MixerConfig, ...] = registry.mixer_config(
      "softmax", causal=False)
  decoder: registry.MixerConfig | tuple[registry.MixerConfig, ...] = registry.mixer_config("softmax")
  cross: registry.MixerConfig = registry.mixer_config("softmax", causal=False, rope=0)
  dtype: str = "float32"
  param_dtype: str = "float32"

  def replace(self, **changes) -> "EncDecConfig":
    return dataclasses.replace(self, **changes)


def tiny(**changes) -> EncDecConfig:
  """1 encoder + 2 decoder layers, width 32, 4 query / 2 KV heads."""
  heads = dict(num_heads=4, num_kv_heads=2)
  return EncDecConfig(
      vocab_size=64, dim=32, encoder_layers=1, decoder_layers=2, mlp_dim=64,
      encoder=registry.mixer_config("softmax", causal=False, **heads),
      decoder=registry.mixer_config("softmax", **heads),
      cross=registry.mixer_config("softmax", causal=False, rope=0, **heads)).replace(**changes)


def small(**changes) -> EncDecConfig:
  """T5-small-like: 6 + 6 layers, width 512, 8 heads."""
  heads = dict(num_heads=8)
  return EncDecConfig(
      vocab_size=32000, dim=512, encoder_layers=6, decoder_layers=6, mlp_dim=1408,
      encoder=registry.mixer_config("softmax", causal=False, **heads),
      decoder=registry.mixer_config("softmax", **heads),
      cross=registry.mixer_config("softmax", causal=False, rope=0, **heads)).replace(**changes)


def base(**changes) -> EncDecConfig:
  """T5-base-like: 12 + 12 layers, width 768, 12 heads."""
  heads = dict(num_heads=12)
  return EncDecConfig(
      vocab_size=32000, dim=768, encoder_layers=12, decoder_layers=12, mlp_dim=2048,
      encoder=registry.mixer_config("softmax", causal=False, **heads),
      decoder=registry.mixer_config("softmax", **heads),
      cross=registry.mixer_config("softmax", causal=False, rope=0, **heads)).replace(**changes)


class EncoderDecoder(nnx.Module):
  """``(source [B, S], target [B, T]) -> logits [B, T, vocab]`` (float32)."""

  def __init__(self, config: EncDecConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    encoder_configs = block_lib.expand_schedule(config.encoder, config.encoder_layers)
    decoder_configs = block_lib.expand_schedule(config.decoder, config.decoder_layers)
    for c in encoder_configs:
      if c.causal:
        raise ValueError(f"encoder mixers must be non-causal (causal=False), got {c}")
    self.embed = nn.Embed(config.vocab_size, config.dim, **kw)
    self.encoder = nn.module_list(
        block_lib.Block(c, config.dim, config.mlp_dim, layer_index=i, num_layers=len(encoder_configs), **kw)
        for i, c in enumerate(encoder_configs))
    self.encoder_norm = nn.RMSNorm(config.dim, rngs=rngs, param_dtype=param_dtype)
    self.decoder = nn.module_list(
        block_lib.Block(c, config.dim, config.mlp_dim, cross=config.cross, layer_index=i,
                        num_layers=len(decoder_configs), **kw)
        for i, c in enumerate(decoder_configs))
    self.norm = nn.RMSNorm(config.dim, rngs=rngs, param_dtype=param_dtype)
    self.head = nn.Dense(config.dim, config.vocab_size, in_axes=("embed",), out_axes=("vocab",), **kw)

  def _embed(self, tokens, name):
    if tokens.ndim != 2:
      raise ValueError(f"{name} must have shape [batch, seq], got {tokens.shape}")
    return sharding.constrain(self.embed(tokens), ("batch", "seq", "act_embed"))

  def _logits(self, x):
    logits = self.head(self.norm(x)).astype(jnp.float32)
    return sharding.constrain(logits, ("batch", "seq", "act_vocab"))

  def _encode(self, source, source_mask=None):
    x = self._embed(source, "source")
    positions = jnp.broadcast_to(jnp.arange(source.shape[1], dtype=jnp.int32), source.shape)
    segments = None if source_mask is None else jnp.where(source_mask, 0, 1).astype(jnp.int32)
    aux = {}
    for blk in self.encoder:
      x, blk_aux = blk(x, positions=positions, segment_ids=segments)
      aux = registry.add_losses(aux, blk_aux)
    return self.encoder_norm(x), aux

  def encode(self, source, source_mask=None):
    """``source [B, S]`` -> memory ``[B, S, C]``; ``source_mask [B, S]`` bool marks real tokens."""
    return self._encode(source, source_mask)[0]

  def __call__(self, source, target, *, source_mask=None, return_aux=False):
    """``(source [B, S], target [B, T]) -> logits [B, T, V]`` (and the mixers' auxiliary losses,
    summed over both stacks, with ``return_aux``)."""
    memory, aux = self._encode(source, source_mask)
    x = self._embed(target, "target")
    positions = jnp.broadcast_to(jnp.arange(target.shape[1], dtype=jnp.int32), target.shape)
    for blk in self.decoder:
      x, blk_aux = blk(x, positions=positions, memory=memory, memory_mask=source_mask)
      aux = registry.add_losses(aux, blk_aux)
    logits = self._logits(x)
    return (logits, aux) if return_aux else logits

  def loss(self, batch):
    """Teacher-forced cross-entropy of ``batch["target"] [B, T+1]`` given ``batch["source"]``,
    plus the mixers' auxiliary losses."""
    target = batch["target"]
    logits, aux = self(batch["source"], target[:, :-1], source_mask=batch.get("source_mask"), return_aux=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, target[:, 1:]).mean() + sum(aux.values())

  def init_cache(self, batch: int, max_len: int):
    """Decoder self-attention caches; the cross caches are filled by :meth:`prefill`."""
    dtype = jnp.dtype(self.config.dtype)
    return {"self": tuple(blk.init_cache(batch, max_len, dtype) for blk in self.decoder),
            "cross": None, "source_mask": None}

  def prefill(self, tokens, cache, *, source, source_mask=None):
    """Encodes ``source``, projects it once per layer for cross attention, runs the target
    prompt ``tokens [B, T]`` -> ``(logits [B, T, V], cache)``."""
    memory = self.encode(source, source_mask)
    x = self._embed(tokens, "tokens")
    self_caches, cross_caches = [], []
    for blk, c in zip(self.decoder, cache["self"]):
      x, c = blk.prefill(x, c, memory=memory, memory_mask=source_mask)
      self_caches.append(c)
      cross_caches.append(blk.init_cross_cache(memory))
    return self._logits(x), {"self": tuple(self_caches), "cross": tuple(cross_caches),
                             "source_mask": source_mask}

  def decode(self, token, cache, *, position):
    """``token [B]`` at target ``position`` -> ``(logits [B, V], cache)``."""
    x = self._embed(token[:, None], "token")
    self_caches = []
    for blk, c, cc in zip(self.decoder, cache["self"], cache["cross"]):
      x, c = blk.decode(x, c, position=position, cross_cache=cc, memory_mask=cache["source_mask"])
      self_caches.append(c)
    return self._logits(x)[:, 0], dict(cache, self=tuple(self_caches))
