"""Inspect and steer attention: probabilities, sinks, calibration, retrieval heads, head hooks and
multi-layer reachability.

These tools materialise what the fast backends never do (the ``[Tq, Tk]`` probability matrix of
every head), so they are for small inputs: analysis, interpretability, position-bias studies.
Each function states its memory cost. All are pure functions of arrays (no flax); the head hooks
are hashable callables that a layer applies to its per-head outputs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax import masks as masks_lib
from attn_jax.softmax import api as softmax_api

__all__ = ["attention_probs", "attend", "Sinks", "find_sinks", "calibrate_sinks", "retrieval_head_scores",
           "HeadHook", "head_hook", "ablate_heads", "scale_heads", "reachability"]


def _shape(x):
  return tuple(np.shape(x))


def _visible(mask, tq, tk, hq):
  """``[1 or Hq, Tq, Tk]`` boolean visibility of ``mask`` (a JAX array, evaluated on device)."""
  ctx = masks_lib.MaskContext(tq, tk)
  q_idx = jnp.arange(tq)[:, None]
  k_idx = jnp.arange(tk)[None, :]
  head = jnp.arange(hq)[:, None, None] if mask.depends_on_head else None
  vis = mask.evaluate(q_idx[None], k_idx[None], head, ctx, jnp)
  return jnp.broadcast_to(vis, (hq if mask.depends_on_head else 1, tq, tk))


def attention_probs(q, k, *, mask=None, scale=None, sinks=None, logits_soft_cap=None, q_segment_ids=None,
                    kv_segment_ids=None, implementation=None, config=None):
  """Attention probabilities and per-row log-sum-exp of :func:`attn_jax.attention`, for any mask
  and any backend.

  The LSE comes from the chosen backend (``implementation`` / ``config`` as in
  :func:`attn_jax.attention`), so the probabilities ``exp(l_ij - lse_i)`` are the ones that
  backend normalises with; the logits ``l_ij`` (scale, soft-cap, mask, segments) are recomputed
  densely in float32. Rows sum to 1, or to ``1 - p_sink`` with sinks; a row that sees no key is
  all zeros.

  Memory: ``O(B * Hq * Tq * Tk)`` float32 for the probabilities, plus the dense mask
  (``Tq * Tk`` booleans, times ``Hq`` for a head-dependent mask). At ``B = 1, Hq = 32`` and
  4k tokens that is 2 GiB: slice the batch and heads for long inputs.

  Args:
    q: ``[B, Tq, Hq, D]``; k: ``[B, Tk, Hkv, D]`` (``Hq`` a multiple of ``Hkv``).
    mask, scale, sinks, logits_soft_cap, q_segment_ids, kv_segment_ids, implementation, config:
      as in :func:`attn_jax.attention`.

  Returns:
    ``(probs [B, Hq, Tq, Tk] float32, lse [B, Tq, Hq] float32)``. With ``sinks`` the sink's own
    probability per row is ``1 - probs.sum(-1)``.
  """
  for name, x in (("q", q), ("k", k)):
    if not hasattr(x, "ndim") or x.ndim != 4:
      raise ValueError(f"{name} must have shape [batch, seq, heads, head_dim], got {_shape(x)}")
  # Values only feed the backend's output, which is not needed; a copy of k keeps shapes legal for
  # every backend (head_dim-sized values).
  _, lse = softmax_api.attention(
      q, k, k, mask=mask, scale=scale, sinks=sinks, logits_soft_cap=logits_soft_cap,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, implementation=implementation,
      return_lse=True, config=config)
  _, tq, hq, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  kf = jnp.repeat(k.astype(jnp.float32), hq // hkv, axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kf, precision=jax.lax.Precision.HIGHEST) * scale
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  vis = _visible(masks_lib.full() if mask is None else mask, tq, tk, hq)[None]
  if q_segment_ids is not None:
    kv_seg = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    vis = vis & (jnp.asarray(q_segment_ids)[:, None, :, None] == jnp.asarray(kv_seg)[:, None, None, :])
  finite = jnp.isfinite(lse).transpose(0, 2, 1)[..., None]
  shift = jnp.where(finite, lse.transpose(0, 2, 1)[..., None], 0.0)
  probs = jnp.where(vis & finite, jnp.exp(jnp.where(vis, logits, 0.0) - shift), 0.0)
  return probs, lse


def attend(probs, v):
  """``out = probs @ v`` per head: applies (possibly edited) probabilities to values.

  Args:
    probs: ``[B, Hq, Tq, Tk]``; v: ``[B, Tk, Hkv, Dv]`` with ``Hq`` a multiple of ``Hkv``.

  Returns:
    ``[B, Tq, Hq, Dv]`` float32.
  """
  if probs.ndim != 4 or v.ndim != 4 or probs.shape[3] != v.shape[1] or probs.shape[1] % v.shape[2]:
    raise ValueError(f"attend expects probs [B, Hq, Tq, Tk] and v [B, Tk, Hkv, Dv] with Hq a multiple of Hkv, "
                     f"got {_shape(probs)} and {_shape(v)}")
  vf = jnp.repeat(v.astype(jnp.float32), probs.shape[1] // v.shape[2], axis=2)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, vf, precision=jax.lax.Precision.HIGHEST)


class Sinks(NamedTuple):
  """Result of :func:`find_sinks`.

  Attributes:
    share: ``[B, H, Tk]`` mean probability each key receives, over the query rows.
    is_sink: ``[B, H, Tk]`` bool, ``share > ratio / Tk``.
    head_mass: ``[B, H]`` total share on the sink keys: how much of its attention the head parks
      on sinks (a "sink head" when large).
  """

  share: jax.Array
  is_sink: jax.Array
  head_mass: jax.Array


def find_sinks(probs, *, ratio: float = 5.0, ignore_first: int = 0) -> Sinks:
  """Attention sinks: keys that receive far more than their share of attention.

  Following ACT (Yu et al., "Unveiling and harnessing hidden attention sinks", Sec. 3), key ``j``
  is a sink of head ``h`` when its attention averaged over the query rows exceeds
  ``ratio / Tk`` (uniform attention would give ``1 / Tk``; ACT uses ``ratio = 5``). The average
  runs over all ``Tq`` rows, so under a causal mask early keys are favoured by construction: use
  it to compare heads and tokens of one input, or raise ``ratio``.

  Args:
    probs: ``[B, H, Tq, Tk]`` from :func:`attention_probs`.
    ratio: threshold multiple of the uniform share.
    ignore_first: exclude the first keys (e.g. BOS, which ACT leaves alone) from ``is_sink``.

  Memory: the input; the outputs are ``O(B * H * Tk)``.
  """
  if probs.ndim != 4:
    raise ValueError(f"probs must have shape [batch, heads, q_len, kv_len], got {_shape(probs)}")
  if not ratio > 0:
    raise ValueError(f"ratio must be > 0, got {ratio}")
  if isinstance(ignore_first, bool) or not isinstance(ignore_first, int) or ignore_first < 0:
    raise ValueError(f"ignore_first must be an int >= 0, got {ignore_first!r}")
  tk = probs.shape[3]
  share = probs.mean(axis=2)
  is_sink = (share > ratio / tk) & (jnp.arange(tk) >= ignore_first)
  return Sinks(share, is_sink, jnp.where(is_sink, share, 0.0).sum(-1))


def calibrate_sinks(probs, is_sink, beta=0.4):
  """ACT's attention calibration (Yu et al., Sec. 4): shrink sink columns and give their mass
  to the other keys, without training.

  In each row, the probability of every sink key is multiplied by ``beta`` and the removed mass
  ``(1 - beta) * sum_sinks p_ij`` is spread over the non-sink keys in proportion to their own
  probabilities, so the row keeps its total. A row with no mass on non-sink keys is left as is.
  ACT applies this to the heads a small calibration search selects; here ``beta`` may be given
  per head (``1`` leaves a head unchanged).

  Args:
    probs: ``[B, H, Tq, Tk]``.
    is_sink: ``[B, H, Tk]`` or ``[H, Tk]`` bool (e.g. ``find_sinks(...).is_sink``).
    beta: a float in ``[0, 1]`` or ``[H]`` per-head factors.

  Returns:
    Calibrated ``[B, H, Tq, Tk]`` probabilities; apply them with :func:`attend`.
  """
  if probs.ndim != 4:
    raise ValueError(f"probs must have shape [batch, heads, q_len, kv_len], got {_shape(probs)}")
  b, h, _, tk = probs.shape
  is_sink = jnp.asarray(is_sink, bool)
  if is_sink.shape not in ((b, h, tk), (h, tk)):
    raise ValueError(f"is_sink must have shape [batch, heads, kv_len] = {(b, h, tk)} or [heads, kv_len], "
                     f"got {_shape(is_sink)}")
  if np.shape(beta) not in ((), (h,)):
    raise ValueError(f"beta must be a scalar or have shape [heads] = ({h},), got {_shape(beta)}")
  if not isinstance(beta, jax.Array) and not ((np.asarray(beta) >= 0) & (np.asarray(beta) <= 1)).all():
    raise ValueError(f"beta must lie in [0, 1], got {beta}")
  beta = jnp.asarray(beta, jnp.float32)
  sink = jnp.broadcast_to(is_sink if is_sink.ndim == 3 else is_sink[None], (b, h, tk))[:, :, None, :]
  beta = jnp.broadcast_to(beta, (h,))[None, :, None, None]
  sink_mass = jnp.where(sink, probs, 0.0).sum(-1, keepdims=True)
  rest = probs.sum(-1, keepdims=True) - sink_mass
  gain = jnp.where(rest > 0, (1 - beta) * sink_mass / jnp.where(rest > 0, rest, 1.0), 0.0)
  calibrated = jnp.where(sink, beta * probs, probs * (1 + gain))
  return jnp.where(rest > 0, calibrated, probs)


def retrieval_head_scores(probs, key_tokens, output_tokens, needle):
  """Retrieval score of every head (Wu et al., "Retrieval head mechanistically explains
  long-context factuality", Sec. 2).

  On a needle-in-a-haystack input, a head performs a copy-paste at decoding step ``t`` when the
  key it attends to most (``argmax_j p_tj``) lies inside the needle and holds the token the model
  emits at that step. The head's score is the fraction of needle tokens it copy-pasted at least
  once: ``|copied positions| / |needle|``.

  Args:
    probs: ``[B, H, Tq, Tk]``: the decoding steps' attention (the queries that produced
      ``output_tokens``) over the context keys.
    key_tokens: ``[B, Tk]`` int token ids at the key positions.
    output_tokens: ``[B, Tq]`` int token emitted at each step.
    needle: ``(start, end)`` key span of the needle, or a ``[B, Tk]`` bool mask.

  Returns:
    ``[B, H]`` float32 scores in ``[0, 1]``.

  Memory: one ``[B, H, Tq, Tk]`` boolean on top of the input.
  """
  if probs.ndim != 4:
    raise ValueError(f"probs must have shape [batch, heads, q_len, kv_len], got {_shape(probs)}")
  b, _, tq, tk = probs.shape
  key_tokens, output_tokens = jnp.asarray(key_tokens), jnp.asarray(output_tokens)
  if key_tokens.shape != (b, tk):
    raise ValueError(f"key_tokens must have shape [batch, kv_len] = {(b, tk)}, got {_shape(key_tokens)}")
  if output_tokens.shape != (b, tq):
    raise ValueError(f"output_tokens must have shape [batch, q_len] = {(b, tq)}, got {_shape(output_tokens)}")
  if isinstance(needle, tuple):
    if len(needle) != 2 or not 0 <= needle[0] < needle[1] <= tk:
      raise ValueError(f"needle must be a span (start, end) with 0 <= start < end <= kv_len={tk}, got {needle}")
    in_needle = jnp.broadcast_to((jnp.arange(tk) >= needle[0]) & (jnp.arange(tk) < needle[1]), (b, tk))
  else:
    in_needle = jnp.asarray(needle, bool)
    if in_needle.shape != (b, tk):
      raise ValueError(f"needle must be a (start, end) span or a [batch, kv_len] = {(b, tk)} mask, "
                       f"got shape {_shape(in_needle)}")
  top = jnp.argmax(probs, axis=-1)                                           # [B, H, Tq]
  hit = jax.nn.one_hot(top, tk, dtype=bool)                                  # [B, H, Tq, Tk]
  match = key_tokens[:, None, :] == output_tokens[:, :, None]                # [B, Tq, Tk]
  event = hit & (match & in_needle[:, None, :])[:, None]
  copied = event.any(axis=2).sum(-1)                                         # [B, H]
  return copied / jnp.maximum(in_needle.sum(-1), 1)[:, None]


@dataclasses.dataclass(frozen=True)
class HeadHook:
  """A pure, hashable edit of per-head attention outputs ``[B, T, H, Dv]`` (before the output
  projection): zero- or mean-ablation of some heads and scaling of others.

  Layers that accept a ``head_hook`` call it on their per-head outputs, so an experiment can
  knock out or amplify heads inside a model's forward without touching its parameters; being
  hashable it can be a static argument of ``jax.jit``.

  Attributes:
    num_heads: ``H``, checked against the outputs.
    ablate: heads to ablate.
    mode: ``"zero"`` replaces an ablated head's output by 0; ``"mean"`` by its mean over the
      sequence (mean-ablation keeps the head's average contribution, removing only what depends
      on the token; the mean reads every position, so it is for analysis, not for causal
      training).
    scales: ``H`` multipliers (None: all 1), applied to the heads not ablated.
  """

  num_heads: int
  ablate: tuple = ()
  mode: str = "zero"
  scales: tuple | None = None

  def __call__(self, out):
    if out.ndim != 4 or out.shape[2] != self.num_heads:
      raise ValueError(f"head hook for {self.num_heads} heads expects outputs [B, T, {self.num_heads}, Dv], "
                       f"got {_shape(out)}")
    if self.scales is not None:
      out = out * jnp.asarray(self.scales, out.dtype)[None, None, :, None]
    if self.ablate:
      drop = np.zeros(self.num_heads, bool)
      drop[list(self.ablate)] = True
      fill = jnp.zeros_like(out) if self.mode == "zero" else jnp.broadcast_to(out.mean(1, keepdims=True), out.shape)
      out = jnp.where(jnp.asarray(drop)[None, None, :, None], fill, out)
    return out


def head_hook(num_heads: int, *, ablate: Sequence[int] = (), mode: str = "zero", scales=None) -> HeadHook:
  """Builds a :class:`HeadHook` (validated)."""
  if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
    raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
  ablate = tuple(int(h) for h in ablate)
  bad = [h for h in ablate if not 0 <= h < num_heads]
  if bad:
    raise ValueError(f"ablate must name heads in [0, {num_heads}), got {bad}")
  if mode not in ("zero", "mean"):
    raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
  if scales is not None:
    scales = tuple(float(s) for s in np.asarray(scales, np.float64).reshape(-1))
    if len(scales) != num_heads:
      raise ValueError(f"scales must have num_heads={num_heads} entries, got {len(scales)}")
  return HeadHook(num_heads, ablate, mode, scales)


def ablate_heads(out, heads: Sequence[int], mode: str = "zero"):
  """Zero- or mean-ablates ``heads`` of per-head outputs ``[B, T, H, Dv]`` (see :class:`HeadHook`)."""
  if not hasattr(out, "ndim") or out.ndim != 4:
    raise ValueError(f"out must have shape [batch, seq, heads, dim], got {_shape(out)}")
  return head_hook(out.shape[2], ablate=heads, mode=mode)(out)


def scale_heads(out, scales):
  """Multiplies each head of ``[B, T, H, Dv]`` by ``scales[h]`` (traced scales allowed)."""
  if not hasattr(out, "ndim") or out.ndim != 4:
    raise ValueError(f"out must have shape [batch, seq, heads, dim], got {_shape(out)}")
  scales = jnp.asarray(scales)
  if scales.shape != (out.shape[2],):
    raise ValueError(f"scales must have shape [heads] = ({out.shape[2]},), got {_shape(scales)}")
  return out * scales.astype(out.dtype)[None, None, :, None]


def reachability(layer_masks, length: int, *, residual: bool = True, mode: str = "reach", num_heads=None):
  """Which input positions can influence which outputs through a stack of masked self-attention
  layers, for position-bias analysis.

  Layer ``l`` lets position ``i`` read position ``j`` when its mask allows it (for any head of a
  head-dependent mask), and with ``residual`` also ``j = i`` (the residual stream). Composing the
  layers gives:

  * ``mode="reach"``: ``R[l, i, j]`` True iff input ``j`` can influence output ``i`` after
    layers ``0..l`` (a boolean matrix product per layer). A sliding window of ``w`` reaches
    ``l * (w - 1)`` back after ``l`` layers; PowerAttention-like patterns reach exponentially.
  * ``mode="rollout"``: attention rollout (Abnar & Zuidema 2020) with uniform attention over the
    visible keys: each layer is the row-stochastic ``A = rownorm(mask)``, mixed with the
    residual as ``0.5 A + 0.5 I``; ``R[l, i, j]`` is the share of output ``i`` that flows from
    input ``j``. Under a causal mask this mass piles onto the first tokens as depth grows, the
    structural position bias sinks and PINE react to.

  Args:
    layer_masks: a sequence of masks, one per layer (repeat a mask for a uniform stack).
    length: sequence length ``T`` (self-attention).
    residual: include the residual path.
    mode: ``"reach"`` or ``"rollout"``.
    num_heads: required when a mask depends on the head.

  Returns:
    ``[L, T, T]`` NumPy array (bool for ``"reach"``, float64 for ``"rollout"``), one matrix per
    depth.

  Memory and time: host NumPy, ``O(L * T^2)`` memory and ``O(L * T^3)`` time; meant for ``T`` up to a
  few thousand.
  """
  if isinstance(layer_masks, masks_lib.Mask):
    raise ValueError("layer_masks must be a sequence of masks, one per layer; got a single mask")
  layer_masks = list(layer_masks)
  if not layer_masks:
    raise ValueError("layer_masks must name at least one layer")
  for i, m in enumerate(layer_masks):
    if not isinstance(m, masks_lib.Mask):
      raise ValueError(f"layer_masks[{i}] must be an attn_jax.masks.Mask, got {type(m).__name__}")
  if isinstance(length, bool) or not isinstance(length, int) or length < 1:
    raise ValueError(f"length must be a positive int, got {length!r}")
  if mode not in ("reach", "rollout"):
    raise ValueError(f"mode must be 'reach' or 'rollout', got {mode!r}")
  eye = np.eye(length, dtype=bool)
  out = []
  total = None
  for m in layer_masks:
    dense = m.materialize(length, length, num_heads if m.depends_on_head else None)
    if dense.ndim == 3:
      dense = dense.any(0)
    if mode == "reach":
      step = (dense | eye) if residual else dense
      total = step if total is None else (step.astype(np.float32) @ total.astype(np.float32)) > 0
    else:
      rows = dense.sum(-1, keepdims=True)
      a = np.where(rows > 0, dense / np.maximum(rows, 1), 0.0)
      step = 0.5 * a + 0.5 * np.eye(length) if residual else a
      total = step if total is None else step @ total
    out.append(total)
  return np.stack(out)
