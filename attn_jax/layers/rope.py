"""Rotary position embeddings: 1D (Llama / GPT-NeoX half-split form) and per axis for 2D/3D grids.

For ``n`` spatial axes the head dimension is split into ``n`` equal parts, each an even size,
and part ``a`` is rotated by the coordinate along axis ``a`` (the axial RoPE of vision
transformers). Relative-position property per axis: ``<rope(q, p), rope(k, s)>`` depends on the
coordinates only through ``p - s``.
"""

from __future__ import annotations

import jax.numpy as jnp


def check_head_dim(head_dim: int, num_axes: int) -> None:
  if num_axes < 1:
    raise ValueError(f"num_axes must be >= 1, got {num_axes}")
  if head_dim % (2 * num_axes):
    raise ValueError(
        f"head_dim must be divisible by 2 * num_axes = {2 * num_axes} for {num_axes}-D RoPE, got {head_dim}")


def _rotate(x, positions, theta):
  """Half-split rotation of the last axis of ``x [..., T, H, d]`` by ``positions [..., T]``."""
  d = x.shape[-1]
  half = d // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [d/2]
  angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [..., T, 1, d/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def apply_rope(x, positions, *, theta: float = 10000.0):
  """Rotates ``x [B, T, H, D]`` by ``positions``.

  Args:
    x: ``[B, T, H, D]`` queries or keys.
    positions: ``[B, T]`` integer positions (1D), or ``[B, T, n]`` grid coordinates for
      ``n``-D axial RoPE (``D`` divisible by ``2 n``); a batch of 1 broadcasts.
    theta: base wavelength.

  Returns:
    ``[B, T, H, D]`` in ``x.dtype``; computed in float32.
  """
  if x.ndim != 4:
    raise ValueError(f"x must have shape [batch, seq, heads, head_dim], got {x.shape}")
  positions = jnp.asarray(positions)
  b, t = x.shape[:2]
  if positions.ndim not in (2, 3) or positions.shape[0] not in (1, b) or positions.shape[1] != t:
    raise ValueError(
        f"positions must have shape [batch, seq] (1D) or [batch, seq, axes] (n-D) with batch in "
        f"(1, {b}) and seq={t}, got {positions.shape}")
  if not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"positions must be integers, got dtype {positions.dtype}")
  if positions.ndim == 2:
    check_head_dim(x.shape[-1], 1)
    return _rotate(x, positions, theta)
  n = positions.shape[-1]
  check_head_dim(x.shape[-1], n)
  part = x.shape[-1] // n
  pieces = [_rotate(x[..., a * part:(a + 1) * part], positions[..., a], theta) for a in range(n)]
  return jnp.concatenate(pieces, axis=-1)


def grid_positions(shape) -> jnp.ndarray:
  """Row-major coordinates ``[prod(shape), len(shape)]`` of a token grid (e.g. image patches)."""
  axes = jnp.meshgrid(*[jnp.arange(s) for s in shape], indexing="ij")
  return jnp.stack([a.reshape(-1) for a in axes], axis=-1)
