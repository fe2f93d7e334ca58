"""Axial rotary position embeddings (RoPE per spatial axis) for grid tokens."""

from __future__ import annotations

import jax.numpy as jnp


def axial_rope(x, base: float = 10000.0):
  """Rotates ``x [B, *spatial, H, D]`` by its grid coordinates, one RoPE per spatial axis.

  The head dimension is split into ``n = len(spatial)`` equal chunks; chunk ``a`` gets the
  standard rotary embedding (NeoX / Llama "rotate half" pairing ``(i, i + D_a / 2)``,
  frequencies ``base ** (-2i / D_a)``) of the coordinate along axis ``a``. The dot product of
  two rotated vectors then depends on the coordinates only through their per-axis differences,
  which makes neighborhood attention translation-equivariant, like a relative position bias.

  Args:
    x: ``[B, *spatial, H, D]`` with ``D`` divisible by ``2 * len(spatial)``.
    base: RoPE base.

  Returns:
    The rotated array, in the dtype of ``x`` (computed in float32).
  """
  n = x.ndim - 3
  d = x.shape[-1]
  if n < 1 or d % (2 * n):
    raise ValueError(f"axial_rope needs head_dim divisible by 2 * (number of spatial axes) = {2 * n}, "
                     f"got x of shape {tuple(x.shape)}")
  chunk = d // n
  half = chunk // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [half]
  xf = x.astype(jnp.float32)
  parts = []
  for a in range(n):
    length = x.shape[1 + a]
    angle = jnp.arange(length, dtype=jnp.float32)[:, None] * freqs[None, :]  # [L_a, half]
    # Broadcast the angles along every other spatial axis and the heads: [L_a] at axis 1 + a.
    shape = [1] * (x.ndim - 1) + [half]
    shape[1 + a] = length
    cos = jnp.cos(angle).reshape(shape)
    sin = jnp.sin(angle).reshape(shape)
    x1 = xf[..., a * chunk:a * chunk + half]
    x2 = xf[..., a * chunk + half:(a + 1) * chunk]
    parts += [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
  return jnp.concatenate(parts, axis=-1).astype(x.dtype)
