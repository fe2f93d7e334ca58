"""``attn_jax.attention``: softmax attention with masks, sinks, soft-cap, segments and GQA."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from attn_jax import block_mask_traced
from attn_jax import dispatch
from attn_jax import masks as masks_lib
from attn_jax.context_parallel import config as cp_config
from attn_jax.context_parallel import softmax as cp_softmax
from attn_jax.softmax import common
from attn_jax.softmax import cudnn
from attn_jax.softmax import pallas
from attn_jax.softmax import reference
from attn_jax.softmax import xla

FAMILY = "softmax"

dispatch.register(FAMILY, "reference", reference.attention)
dispatch.register(FAMILY, "xla", xla.attention)
dispatch.register(FAMILY, "pallas_tpu", pallas.attention_tpu)
dispatch.register(FAMILY, "pallas_gpu", pallas.attention_gpu)
dispatch.register(FAMILY, "cudnn", cudnn.attention)

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _shape(x):
  return tuple(x.shape)


def _check_float(name, x):
  if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
    raise ValueError(f"{name} must be float32, bfloat16 or float16, got dtype {x.dtype}")


def _check_segments(name, seg, batch, length, length_name):
  if seg is None:
    return None
  if not hasattr(seg, "shape") or not hasattr(seg, "dtype"):
    seg = jnp.asarray(seg)
  if _shape(seg) != (batch, length):
    raise ValueError(f"{name} must have shape [batch, {length_name}] = {(batch, length)}, got {_shape(seg)}")
  if not jnp.issubdtype(seg.dtype, jnp.integer):
    raise ValueError(f"{name} must have an integer dtype, got {seg.dtype}")
  return seg.astype(jnp.int32)


def _check_static_number(name, value, positive=False):
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or isinstance(value, jax.Array):
    raise ValueError(f"{name} must be a Python float (static), got {value!r}")
  value = float(value)
  if not math.isfinite(value) or (positive and value <= 0):
    raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, got {value}")
  return value


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: masks_lib.Mask | None = None,
              scale: float | None = None, sinks: ArrayLike | None = None,
              logits_soft_cap: float | None = None, q_segment_ids: ArrayLike | None = None,
              kv_segment_ids: ArrayLike | None = None, implementation: str | None = None,
              return_lse: bool = False,
              config: xla.XlaConfig | pallas.PallasTpuConfig | pallas.PallasGpuConfig | None = None,
              context_parallel: cp_config.ContextParallel | None = None,
              block_mask: block_mask_traced.TracedBlockMask | None = None,
              ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Softmax attention ``softmax(scale * q k^T + mask) v`` in the ``[batch, seq, heads, dim]`` layout.

  Covers the four CAB patterns: non-causal self (``mask=None``), causal self
  (``masks.causal()``), non-causal cross (different ``q``/``k`` lengths, ``mask=None``) and causal
  cross (``masks.causal()``, aligned bottom-right by default).

  Args:
    q: queries ``[B, Tq, Hq, D]``.
    k: keys ``[B, Tk, Hkv, D]``. ``Hq`` must be a multiple of ``Hkv`` (GQA; ``Hkv = 1`` is MQA);
      K/V are never repeated in memory by the fast backends.
    v: values ``[B, Tk, Hkv, Dv]``; ``Dv`` may differ from ``D``.
    mask: an :mod:`attn_jax.masks` mask, or None for full attention.
    scale: logit scale, a Python float; default ``D ** -0.5``.
    sinks: ``[Hq]`` learned per-head logits that join the softmax denominator only (gpt-oss):
      ``p_ij = exp(l_ij) / (exp(sink_h) + sum_j exp(l_ij))``. Differentiable.
    logits_soft_cap: if given, logits become ``cap * tanh(logits / cap)`` (after scaling, before
      masking), as in Gemma 2.
    q_segment_ids, kv_segment_ids: ``[B, Tq]`` / ``[B, Tk]`` integer document ids; a query sees
      a key only if their ids are equal (packed sequences), in addition to ``mask``. For self
      attention ``kv_segment_ids`` may be omitted and defaults to ``q_segment_ids``.
    implementation: None (first backend of this platform that serves the call), or one of
      ``"reference"``, ``"xla"``, ``"pallas_tpu"``, ``"pallas_gpu"``, ``"cudnn"`` (cuDNN through
      ``jax.nn.dot_product_attention``: NVIDIA GPUs, bf16/f16, causal bands). An explicit choice
      that cannot serve the call raises ``NotImplementedError``; it is never replaced.
    return_lse: also return the log-sum-exp of each row.
    config: backend tunables (e.g. :class:`attn_jax.XlaConfig`); with ``implementation=None`` it
      selects its own backend.
    context_parallel: an :class:`attn_jax.ContextParallel`: q, k, v (and segment ids) are split
      along the sequence over its mesh axis and each device attends its queries to every key
      shard by ring or all-gather (see :mod:`attn_jax.context_parallel.softmax`); each device
      runs the chosen backend on its local tiles. ``q_len`` and ``kv_len`` must be divisible by
      the axis size (times 2 with zig-zag load balancing). None: no sequence sharding.
    block_mask: a :class:`attn_jax.TracedBlockMask` built inside ``jit`` from data (see
      :mod:`attn_jax.block_mask_traced`): query ``i`` sees key ``j`` only if its query block
      selected ``j``'s key block, in addition to the mask (which is the block mask's static
      mask; ``mask`` may be omitted or must equal it). Its blocks are the backends' tiles.
      Served by the reference, xla and pallas_gpu backends, forward and backward; new data
      never recompiles.

  Returns:
    ``out [B, Tq, Hq, Dv]`` in the dtype of ``q``; with ``return_lse``, also
    ``lse [B, Tq, Hq]`` float32, which includes the sink term. A query row that sees no key
    returns zeros and ``lse = -inf`` (or ``lse = sink`` with sinks); its gradients are finite.
  """
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise ValueError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != 4:
      raise ValueError(f"{name} must have shape [batch, seq, heads, head_dim], got shape {_shape(x)}")
    _check_float(name, x)
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  b, tq, hq, d = q.shape
  _, tk, hkv, _ = k.shape
  if k.shape[0] != b or v.shape[0] != b:
    raise ValueError(f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}; expected the same batch")
  if k.shape[3] != d:
    raise ValueError(f"k head_dim must equal q head_dim {d}, got k shape {_shape(k)}")
  if v.shape[1] != tk or v.shape[2] != hkv:
    raise ValueError(f"v must have shape [batch, {tk}, {hkv}, Dv] to match k {_shape(k)}, got {_shape(v)}")
  if min(tq, tk, hq, hkv, d, v.shape[3]) < 1:
    raise ValueError(f"empty dimension: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
  if hq % hkv:
    raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv}) for GQA/MQA")

  if block_mask is not None:
    if not isinstance(block_mask, block_mask_traced.TracedBlockMask):
      raise ValueError(f"block_mask must be an attn_jax.TracedBlockMask or None, got {type(block_mask).__name__}")
    if mask is not None and mask != block_mask.mask:
      raise ValueError(f"mask {mask!r} differs from block_mask's static mask {block_mask.mask!r}: expected the "
                       f"same mask or None")
    block_mask.check_compatible(b, tq, tk, hq, hkv)
    mask = block_mask.mask
  if mask is None:
    mask = masks_lib.full()
  elif not isinstance(mask, masks_lib.Mask):
    raise ValueError(f"mask must be an attn_jax.masks.Mask or None, got {type(mask).__name__}")
  mask.validate(masks_lib.MaskContext(tq, tk))
  masks_lib.check_heads(mask, hq)
  masks_lib.check_num_heads(mask, hq)

  scale = 1.0 / math.sqrt(d) if scale is None else _check_static_number("scale", scale)
  if logits_soft_cap is not None:
    logits_soft_cap = _check_static_number("logits_soft_cap", logits_soft_cap, positive=True)

  if sinks is not None:
    if not hasattr(sinks, "shape"):
      sinks = jnp.asarray(sinks, jnp.float32)
    if _shape(sinks) != (hq,):
      raise ValueError(f"sinks must have shape [num_q_heads] = ({hq},), got {_shape(sinks)}")
    if not jnp.issubdtype(sinks.dtype, jnp.floating):
      raise ValueError(f"sinks must have a floating dtype, got {sinks.dtype}")

  if kv_segment_ids is None and q_segment_ids is not None:
    if tq != tk:
      raise ValueError(f"kv_segment_ids is required for cross attention (q_len {tq} != kv_len {tk})")
    kv_segment_ids = q_segment_ids
  if q_segment_ids is None and kv_segment_ids is not None:
    raise ValueError("q_segment_ids is required when kv_segment_ids is given")
  q_segment_ids = _check_segments("q_segment_ids", q_segment_ids, b, tq, "q_len")
  kv_segment_ids = _check_segments("kv_segment_ids", kv_segment_ids, b, tk, "kv_len")

  if implementation is None and config is not None:
    implementation = getattr(config, "backend", None)
    if implementation is None:
      raise ValueError(f"config must be a backend config such as XlaConfig, got {type(config).__name__}")

  spec = common.Spec(
      mask=mask, scale=scale, logits_soft_cap=logits_soft_cap, q_len=tq, kv_len=tk,
      num_q_heads=hq, num_kv_heads=hkv, head_dim=d, v_head_dim=v.shape[3],
      has_sinks=sinks is not None, has_segments=q_segment_ids is not None, return_lse=bool(return_lse),
      traced_layout=None if block_mask is None else block_mask.layout)
  if context_parallel is not None:
    if not isinstance(context_parallel, cp_config.ContextParallel):
      raise ValueError(f"context_parallel must be an attn_jax.ContextParallel or None, got "
                       f"{type(context_parallel).__name__}")
    if block_mask is not None:
      raise NotImplementedError("a traced block_mask with context_parallel (its lists are not sharded along "
                                "the sequence yet)")
    out, lse = cp_softmax.attention(q, k, v, sinks, q_segment_ids, kv_segment_ids, spec=spec,
                                    cp=context_parallel, implementation=implementation, config=config)
  else:
    # The traced BlockMask travels with the arrays (dispatch's keyword arguments are static).
    out, lse = dispatch.dispatch(FAMILY, implementation, q, k, v, sinks, q_segment_ids,
                                 kv_segment_ids, block_mask, spec=spec, config=config)
  return (out, lse) if return_lse else out

