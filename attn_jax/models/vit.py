"""Vision transformer on a 2D grid of patches: dense or neighborhood attention, 2D RoPE.

There is no class token: the patch grid stays a grid (neighborhood attention needs it), and the
classifier reads the mean of the final patch states.
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
from attn_jax.layers import rope as rope_lib


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Vision transformer.

  Attributes:
    image_size: ``(height, width)`` in pixels, multiples of ``patch_size``.
    patch_size, channels, num_classes, dim, num_layers, mlp_dim: sizes.
    schedule: typed mixer config(s), non-causal; ``rope=2`` gives per-axis 2D RoPE, ``rope=0`` a
      learned position embedding instead (also used when no layer's mechanism applies RoPE).
  """

  image_size: tuple[int, int] = (32, 32)
  patch_size: int = 4
  channels: int = 3
  num_classes: int = 10
  dim: int = 64
  num_layers: int = 2
  mlp_dim: int = 128
  schedule: registry.MixerConfig | tuple[registry.MixerConfig, ...] = registry.mixer_config(
      "softmax", causal=False, rope=2)
  dtype: str = "float32"
  param_dtype: str = "float32"

  def replace(self, **changes) -> "ViTConfig":
    return dataclasses.replace(self, **changes)

  @property
  def grid(self) -> tuple[int, int]:
    h, w = self.image_size
    return h // self.patch_size, w // self.patch_size

  def layer_configs(self):
    return block_lib.expand_schedule(self.schedule, self.num_layers)


def tiny(**changes) -> ViTConfig:
  """16x16 images, 4x4 patches (a 4x4 grid), width 32, 2 layers."""
  return ViTConfig(image_size=(16, 16), patch_size=4, channels=3, num_classes=10, dim=32,
                   num_layers=2, mlp_dim=64,
                   schedule=registry.mixer_config("softmax", num_heads=4, causal=False, rope=2)).replace(**changes)


def small(**changes) -> ViTConfig:
  """ViT-S/16 at 224 px: 12 layers, width 384, 6 heads."""
  return ViTConfig(image_size=(224, 224), patch_size=16, num_classes=1000, dim=384, num_layers=12,
                   mlp_dim=1024,
                   schedule=registry.mixer_config("softmax", num_heads=6, causal=False, rope=2)).replace(**changes)


def base(**changes) -> ViTConfig:
  """ViT-B/16 at 224 px: 12 layers, width 768, 12 heads."""
  return ViTConfig(image_size=(224, 224), patch_size=16, num_classes=1000, dim=768, num_layers=12,
                   mlp_dim=2048,
                   schedule=registry.mixer_config("softmax", num_heads=12, causal=False, rope=2)).replace(**changes)


class ViT(nnx.Module):
  """``images [B, H, W, C] -> logits [B, num_classes]`` (float32)."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    self.config = config
    h, w = config.image_size
    p = config.patch_size
    if h % p or w % p:
      raise ValueError(f"image_size {config.image_size} must be multiples of patch_size {p}")
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    layer_configs = config.layer_configs()
    uses_rope = [registry.entry_of(c).uses_rope and c.rope > 0 for c in layer_configs]
    for c in layer_configs:
      if c.causal:
        raise ValueError(f"ViT mixers must be non-causal (causal=False), got {c}")
      if c.rope not in (0, 2):
        raise ValueError(f"ViT mixers take 2D RoPE (rope=2) or none (rope=0), got rope={c.rope}")
    self.patch_embed = nn.Dense(p * p * config.channels, config.dim, in_axes=(None,),
                                out_axes=("embed",), **kw)
    if not any(uses_rope):
      n = config.grid[0] * config.grid[1]
      self.pos_embed = nn.param(rngs, nn.fan_in_init(1), (n, config.dim), (None, "embed"), param_dtype)
    else:
      self.pos_embed = None
    self.blocks = nn.module_list(
        block_lib.Block(c, config.dim, config.mlp_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                        layer_index=i, num_layers=len(layer_configs))
        for i, c in enumerate(layer_configs))
    self.norm = nn.RMSNorm(config.dim, rngs=rngs, param_dtype=param_dtype)
    self.head = nn.Dense(config.dim, config.num_classes, in_axes=("embed",), out_axes=(None,), **kw)

  def patchify(self, images):
    """``[B, H, W, C] -> [B, gh * gw, p * p * C]`` in row-major patch order."""
    c = self.config
    expected = tuple(c.image_size) + (c.channels,)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"images must have shape [batch, {expected[0]}, {expected[1]}, {expected[2]}], got {images.shape}")
    b = images.shape[0]
    p = c.patch_size
    gh, gw = c.grid
    x = images.reshape(b, gh, p, gw, p, c.channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, p * p * c.channels)

  def __call__(self, images, *, return_aux=False):
    """``images [B, H, W, C]`` -> ``logits [B, classes]`` (and the mixers' auxiliary losses with
    ``return_aux``)."""
    x = self.patch_embed(self.patchify(images))
    if self.pos_embed is not None:
      x = x + self.pos_embed[...].astype(x.dtype)
    x = sharding.constrain(x, ("batch", "seq", "act_embed"))
    positions = rope_lib.grid_positions(self.config.grid)[None].astype(jnp.int32)  # [1, T, 2]
    aux = {}
    for blk in self.blocks:
      x, blk_aux = blk(x, positions=positions, grid=self.config.grid)
      aux = registry.add_losses(aux, blk_aux)
      x = sharding.constrain(x, ("batch", "seq", "act_embed"))
    logits = self.head(self.norm(x).mean(axis=1)).astype(jnp.float32)
    return (logits, aux) if return_aux else logits

  def loss(self, batch):
    """Mean cross-entropy of ``batch["images"]`` against integer ``batch["labels"] [B]``, plus the
    mixers' auxiliary losses."""
    logits, aux = self(batch["images"], return_aux=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean() + sum(aux.values())
