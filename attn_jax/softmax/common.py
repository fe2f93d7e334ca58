"""Pieces shared by every softmax-attention backend: the static call description and tile masks."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from attn_jax import masks as masks_lib

# A masked logit is finfo.min rather than -inf: the running maximum of an online softmax over a
# row whose keys so far are all masked stays finite, so exp(m_old - m_new) is exp(0) = 1 and not
# exp(-inf - -inf) = NaN. Probabilities of masked entries are zeroed explicitly as well.
NEG_INF = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static (hashable) description of one attention call, after argument checking."""

  mask: masks_lib.Mask
  scale: float
  logits_soft_cap: float | None
  q_len: int
  kv_len: int
  num_q_heads: int
  num_kv_heads: int
  head_dim: int
  v_head_dim: int
  has_sinks: bool
  has_segments: bool
  # Whether the caller asked for the log-sum-exp; backends that cannot produce it (cudnn) refuse.
  return_lse: bool = False
  # The static part of a traced BlockMask (block_mask=), or None: the block lists then travel as
  # arrays in the backend's ``block_mask`` argument.
  traced_layout: Any = None

  @property
  def group_size(self) -> int:
    return self.num_q_heads // self.num_kv_heads

  @property
  def mask_context(self) -> masks_lib.MaskContext:
    return masks_lib.MaskContext(self.q_len, self.kv_len)


def tile_visibility(spec: Spec, q_idx, kv_idx, head=None):
  """Mask predicate on a tile, with key padding (``kv_idx >= kv_len``) masked out.

  Args:
    q_idx: int array broadcastable to ``[..., bq, 1]``.
    kv_idx: int array broadcastable to ``[..., 1, bk]``.
    head: query-head indices broadcastable against the tile, or None if the mask ignores heads.
  """
  visible = spec.mask.evaluate(q_idx, kv_idx, head, spec.mask_context, jnp)
  return visible & (kv_idx < spec.kv_len)


def soft_cap(logits, cap):
  """``cap * tanh(logits / cap)``; identity when cap is None."""
  if cap is None:
    return logits
  return cap * jnp.tanh(logits / cap)


def pad_axis(x, axis: int, size: int, value=0):
  """``x`` padded with ``value`` at the end of ``axis`` to length ``size``."""
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def soft_cap_with_tanh(raw, cap):
  """``(cap * tanh(raw / cap), tanh(raw / cap))`` (the tanh is kept for the VJP); ``(raw, None)``
  when cap is None."""
  if cap is None:
    return raw, None
  th = jnp.tanh(raw / cap)
  return cap * th, th
