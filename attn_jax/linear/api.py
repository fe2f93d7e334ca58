"""``attn_jax.linear_attention`` and its decoding step ``attn_jax.linear_attention_step``."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from attn_jax import _jit_cache
from attn_jax import dispatch
from attn_jax.context_parallel import config as cp_config
from attn_jax.context_parallel import linear as cp_linear
from attn_jax.linear import common
from attn_jax.linear import feature_maps
from attn_jax.linear import pallas
from attn_jax.linear import reference
from attn_jax.linear import xla

FAMILY = "linear"

dispatch.register(FAMILY, "reference", reference.linear_attention)
dispatch.register(FAMILY, "xla", xla.linear_attention)
dispatch.register(FAMILY, "pallas_tpu", pallas.linear_attention_tpu)
dispatch.register(FAMILY, "pallas_gpu", pallas.linear_attention_gpu)

# Added to the normaliser phi(q)^T z before dividing, so that a query whose features are all zero
# (relu features, an empty state) returns 0 rather than 0 / 0.
NORMALIZE_EPS = 1e-6

_FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


def _shape(x):
  return tuple(x.shape)


def _check_array(name, x, ndim, layout):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{name} must be an array, got {type(x).__name__}")
  if x.ndim != ndim:
    raise ValueError(f"{name} must have shape {layout}, got shape {_shape(x)}")
  if jnp.dtype(x.dtype) not in _FLOAT_DTYPES:
    raise ValueError(f"{name} must be float32, bfloat16 or float16, got dtype {x.dtype}")


def _check_scale(scale):
  if scale is None:
    return 1.0
  if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or isinstance(scale, jax.Array):
    raise ValueError(f"scale must be a Python float (static), got {scale!r}")
  scale = float(scale)
  if not math.isfinite(scale):
    raise ValueError(f"scale must be finite, got {scale}")
  return scale


def _apply_feature_map(phi, name, x):
  y = phi(x)
  if not hasattr(y, "shape") or y.ndim != x.ndim or _shape(y)[:-1] != _shape(x)[:-1] or y.shape[-1] < 1:
    raise ValueError(f"feature_map must map {name} {_shape(x)} to [..., features] with the same leading "
                     f"axes, got {_shape(y) if hasattr(y, 'shape') else type(y).__name__}")
  if not jnp.issubdtype(y.dtype, jnp.floating):
    raise ValueError(f"feature_map must return floats, got dtype {y.dtype} for {name}")
  return y.astype(x.dtype)


def _scaled(fq, scale):
  """``scale * fq`` in the dtype of ``fq``; the product is taken in float32."""
  if scale == 1.0:
    return fq
  return (fq.astype(jnp.float32) * scale).astype(fq.dtype)


def _features(q, k, feature_map, scale):
  """``(scale * phi(q), phi(k))`` in the input dtype; the scale is applied in float32."""
  phi = feature_maps.resolve(feature_map)
  fq = _apply_feature_map(phi, "q", q)
  fk = _apply_feature_map(phi, "k", k)
  if fq.shape[-1] != fk.shape[-1]:
    raise ValueError(f"feature_map gave {fq.shape[-1]} query features but {fk.shape[-1]} key features")
  return _scaled(fq, scale), fk


def _feature_plan(q, k, feature_map, scale):
  """``(fq, fk, f, inner_map)``: where the feature map runs and how many features it gives.

  A named map (pure library code) runs inside the cached computation (``inner_map`` is its
  name); a user callable runs here, eagerly, on every call, because a cached trace must not
  capture what a user function closes over (module parameters under an outer jit, say): it
  would replay a stale value. ``fq``/``fk`` are then the mapped arrays and ``inner_map`` None.
  """
  if feature_maps.is_named(feature_map):
    feature_maps.resolve(feature_map)
    return q, k, feature_maps.num_features(feature_map, q.shape[-1]), feature_map or "identity"
  fq, fk = _features(q, k, feature_map, scale)
  return fq, fk, fq.shape[-1], None


def _is_tracer(x) -> bool:
  tracer = getattr(getattr(jax, "core", None), "Tracer", None)
  if tracer is not None:
    return isinstance(x, tracer)
  try:  # Without jax.core.Tracer: only a concrete array converts to a host scalar.
    float(jnp.max(x))
    return False
  except jax.errors.ConcretizationTypeError:
    return True


def check_log_decay_sign(log_decay, name="log_decay"):
  """ValueError if a concrete ``log_decay`` has a positive entry (a decay passed as a log decay).

  Traced values (inside ``jit``, ``grad``, ``vmap``) cannot be inspected without a host round
  trip; the primitives clamp them to ``<= 0`` instead (see :func:`clamp_log_decay`).
  """
  if log_decay is None or _is_tracer(log_decay):
    return
  largest = float(np.max(log_decay)) if isinstance(log_decay, np.ndarray) else float(jnp.max(log_decay))
  if largest > 0:
    raise ValueError(
        f"{name} must be <= 0: it is the log of a decay a_t in (0, 1], got a largest value of {largest:g} "
        f"(shape {_shape(log_decay)}). Pass jnp.log(decay) for decays, or -rate for positive rates.")


def clamp_log_decay(log_decay):
  """``min(log_decay, 0)`` with gradient 1 where ``log_decay <= 0`` and 0 above.

  A positive log decay makes ``a_t > 1``: the state and the chunked form's factors would grow
  without bound and overflow to inf/NaN. Concrete values are rejected by
  :func:`check_log_decay_sign`; traced ones are clamped here, i.e. treated as no decay.
  """
  return jnp.where(log_decay > 0, 0.0, log_decay)


def _decay_heads(log_decay, hq, hkv, name="log_decay"):
  heads = log_decay.shape[-1] if log_decay.ndim == 1 else log_decay.shape[2 if log_decay.ndim >= 3 else 1]
  if heads not in (hq, hkv):
    raise ValueError(f"{name} must have {hkv} (k/v) or {hq} (query) heads, got shape {_shape(log_decay)}")
  return heads


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, log_decay: ArrayLike | None = None,
                     feature_map: str | Callable[[jax.Array], jax.Array] | None = None,
                     scale: float | None = None, normalize: bool = False, causal: bool = True,
                     initial_state: jax.Array | None = None, return_final_state: bool = False,
                     segment_ids: ArrayLike | None = None, chunk_size: int | None = None,
                     implementation: str | None = None,
                     config: xla.XlaConfig | pallas.PallasTpuConfig | pallas.PallasGpuConfig | None = None,
                     context_parallel: cp_config.ContextParallel | None = None,
                     ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Linear attention ``S_t = a_t S_{t-1} + phi(k_t) v_t^T``, ``o_t = scale * phi(q_t)^T S_t``.

  Layout ``[batch, seq, heads, dim]``. With ``normalize=True`` the output is divided by
  ``scale * phi(q_t)^T z_t + eps`` with ``z_t = a_t z_{t-1} + phi(k_t)`` (eps = 1e-6).

  Args:
    q: queries ``[B, T, Hq, D]``.
    k: keys ``[B, Tk, Hkv, D]``; ``Hq`` a multiple of ``Hkv`` (GQA): query head ``h`` reads the
      state of k/v head ``h // (Hq / Hkv)``. ``Tk = T`` unless ``causal=False``.
    v: values ``[B, Tk, Hkv, Dv]``.
    log_decay: the log of the decay ``a_t`` (so ``<= 0``; finite; use ``segment_ids`` for hard
      resets). One of

      * None: no decay (``a_t = 1``);
      * ``[Hd]``: one fixed decay per head (Lightning attention's and RetNet's slopes);
      * ``[B, T, Hd]``: one data-dependent decay per step and head (simple GLA, Mamba-2);
      * ``[B, T, Hd, F]``: one decay per key feature (GLA gates), decaying the rows of ``S``.

      ``Hd`` is ``Hkv`` (the state is shared by a GQA group) or ``Hq`` (one state per query
      head; k/v are then shared by the group's states). Differentiable.

      A positive entry (a decay passed where its log is expected) raises ``ValueError`` when
      ``log_decay`` is concrete. A traced ``log_decay`` (inside ``jit``, ``grad`` or ``vmap``)
      cannot be checked without a host round trip: positive entries are clamped to 0 (no decay
      at that step), with zero gradient there, so the output stays finite.
    feature_map: ``phi``: None or ``"identity"``, ``"elu_plus_one"`` (``"elu+1"``), ``"relu"``,
      ``"taylor"`` (Based's second-order Taylor map, ``D -> 1 + D + D^2`` features) or a
      function ``[..., D] -> [..., F]`` applied to q and k.
    scale: Python float multiplying ``phi(q)`` (default 1).
    normalize: divide by the normaliser as above.
    causal: False gives one global state: every query reads
      ``initial_state + sum_j phi(k_j) v_j^T`` (over its own document with ``segment_ids``);
      no decay. q and k/v lengths may then differ (cross attention). Without segments this is
      two matmuls, the same for every backend; with segments it is a causal plus an
      anti-causal pass of the chosen backend.
    initial_state: ``[B, Hs, F, Dv]`` state before token 0 (``Dv + 1`` columns with
      ``normalize``: the last column is ``z``), ``Hs = Hd`` with a decay, else ``Hkv``.
    return_final_state: also return the float32 state after the last token (the state of the
      last document with ``segment_ids``), ready for :func:`linear_attention_step`.
    segment_ids: ``[B, T]`` integer document ids; the state restarts from zero wherever the id
      changes (packed sequences). The initial state belongs to the first document.
    chunk_size: tokens per chunk of the chunked backends (default: the backend's).
    implementation: None (first backend of the platform that serves the call), ``"reference"``
      (token-by-token float32 recurrence), ``"xla"``, ``"pallas_tpu"`` or ``"pallas_gpu"``.
      An explicit choice that cannot serve the call raises ``NotImplementedError``.
    config: backend tunables, e.g. :class:`attn_jax.LinearXlaConfig`; selects its backend when
      ``implementation`` is None.
    context_parallel: an :class:`attn_jax.ContextParallel`: the sequence is split over its mesh
      axis; each device runs the backend on its shard and the shards' states are passed on by
      a prefix scan over the devices (:mod:`attn_jax.context_parallel.linear`). ``T`` must be
      divisible by the axis size. None: no sequence sharding.

  Returns:
    ``o [B, T, Hq, Dv]`` in the dtype of ``q``; with ``return_final_state`` also the state
    ``[B, Hs, F, Dv(+1)]`` float32.
  """
  _check_array("q", q, 4, "[batch, seq, heads, head_dim]")
  _check_array("k", k, 4, "[batch, seq, heads, head_dim]")
  _check_array("v", v, 4, "[batch, seq, heads, head_dim]")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  b, t, hq, d = q.shape
  _, tk, hkv, _ = k.shape
  dv = v.shape[3]
  if k.shape[0] != b or v.shape[0] != b:
    raise ValueError(f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}; expected the same batch")
  if k.shape[3] != d:
    raise ValueError(f"k head_dim must equal q head_dim {d}, got k shape {_shape(k)}")
  if v.shape[1] != tk or v.shape[2] != hkv:
    raise ValueError(f"v must have shape [batch, {tk}, {hkv}, Dv] to match k {_shape(k)}, got {_shape(v)}")
  if min(t, tk, hq, hkv, d, dv) < 1:
    raise ValueError(f"empty dimension: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
  if hq % hkv:
    raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv}) for GQA/MQA")
  if not isinstance(causal, bool):
    raise ValueError(f"causal must be a bool, got {causal!r}")
  if causal and tk != t:
    raise ValueError(f"causal linear attention needs equal q and k/v lengths, got q_len {t}, kv_len {tk}")
  if not isinstance(normalize, bool):
    raise ValueError(f"normalize must be a bool, got {normalize!r}")
  if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
  if implementation is not None and implementation not in dispatch.backends(FAMILY):
    raise ValueError(f"implementation must be one of {sorted(dispatch.backends(FAMILY))} or None, "
                     f"got {implementation!r}")
  if implementation is None and config is not None:
    implementation = getattr(config, "backend", None)
    if implementation is None:
      raise ValueError(f"config must be a backend config such as LinearXlaConfig, got {type(config).__name__}")
  scale = _check_scale(scale)
  fq, fk, f, inner_map = _feature_plan(q, k, feature_map, scale)

  decay_kind, hs = common.NONE, hkv
  if log_decay is not None:
    if not causal:
      raise ValueError("log_decay requires causal=True: a decay orders the tokens, the non-causal form has "
                       "one global state")
    if not hasattr(log_decay, "shape"):
      log_decay = jnp.asarray(log_decay, jnp.float32)
    if not jnp.issubdtype(log_decay.dtype, jnp.floating):
      raise ValueError(f"log_decay must have a floating dtype, got {log_decay.dtype}")
    if log_decay.ndim == 1:
      hs = _decay_heads(log_decay, hq, hkv)
      decay_kind = common.SCALAR
    elif log_decay.ndim == 3:
      if log_decay.shape[:2] != (b, t):
        raise ValueError(f"log_decay [batch, seq, heads] must start with {(b, t)}, got {_shape(log_decay)}")
      hs = _decay_heads(log_decay, hq, hkv)
      decay_kind = common.SCALAR
    elif log_decay.ndim == 4:
      if log_decay.shape[:2] != (b, t) or log_decay.shape[3] != f:
        raise ValueError(f"log_decay [batch, seq, heads, features] must be ({b}, {t}, Hd, {f}) "
                         f"(features = feature-map output size), got {_shape(log_decay)}")
      hs = _decay_heads(log_decay, hq, hkv)
      decay_kind = common.CHANNEL
    else:
      raise ValueError(f"log_decay must have shape [heads], [batch, seq, heads] or [batch, seq, heads, features], "
                       f"got {_shape(log_decay)}")
    check_log_decay_sign(log_decay)

  vd = dv + 1 if normalize else dv
  if initial_state is not None:
    if not hasattr(initial_state, "shape") or _shape(initial_state) != (b, hs, f, vd):
      got = _shape(initial_state) if hasattr(initial_state, "shape") else type(initial_state).__name__
      raise ValueError(f"initial_state must have shape [batch, state_heads, features, value_dim"
                       f"{' + 1' if normalize else ''}] = {(b, hs, f, vd)}, got {got}")
    if not jnp.issubdtype(initial_state.dtype, jnp.floating):
      raise ValueError(f"initial_state must have a floating dtype, got {initial_state.dtype}")
  if segment_ids is not None:
    if not hasattr(segment_ids, "shape"):
      segment_ids = jnp.asarray(segment_ids)
    if _shape(segment_ids) != (b, t) or tk != t:
      raise ValueError(f"segment_ids must have shape [batch, seq] = {(b, t)} (and q, k of equal length), "
                       f"got {_shape(segment_ids)}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids must have an integer dtype, got {segment_ids.dtype}")

  spec = common.Spec(seq_len=t, num_q_heads=hq, num_state_heads=hs, key_dim=f, value_dim=vd,
                     decay=decay_kind, has_initial_state=initial_state is not None,
                     has_segments=segment_ids is not None,
                     out_dtype=jnp.dtype(jnp.float32) if normalize else jnp.dtype(q.dtype),
                     chunk_size=chunk_size)
  if context_parallel is not None and not isinstance(context_parallel, cp_config.ContextParallel):
    raise ValueError(f"context_parallel must be an attn_jax.ContextParallel or None, got "
                     f"{type(context_parallel).__name__}")
  static = _LinearStatic(spec, inner_map, scale if inner_map is not None else 1.0, normalize, causal,
                         implementation, config, dispatch.state_key(FAMILY), context_parallel)
  o, state = _linear_cached(static, fq, fk, v, log_decay, initial_state, segment_ids)
  return (o, state) if return_final_state else o


@dataclasses.dataclass(frozen=True)
class _LinearStatic:
  """Static description of a :func:`linear_attention` call after argument checking (hashable)."""

  spec: common.Spec
  inner_map: str | None  # feature map applied inside the cached computation, or None if done
  scale: float           # applied with inner_map (1.0 when the features arrive scaled)
  normalize: bool
  causal: bool
  implementation: str | None
  config: object
  dispatch_state: tuple
  context_parallel: cp_config.ContextParallel | None = None


@_jit_cache.cached
def _linear_cached(st: _LinearStatic, fq, fk, v, log_decay, initial_state, segment_ids):
  """The array part of :func:`linear_attention`, compiled once per :class:`_LinearStatic`."""
  spec = st.spec
  b, t, _, _ = fq.shape
  hkv, dv = fk.shape[2], v.shape[3]
  hs = spec.num_state_heads
  if st.inner_map is not None:
    fq, fk = _features(fq, fk, st.inner_map, st.scale)
  if log_decay is not None:
    log_decay = clamp_log_decay(log_decay.astype(jnp.float32))
    if log_decay.ndim == 1:
      log_decay = jnp.broadcast_to(log_decay, (b, t, hs))
  if hs != hkv:
    # One state per query head: the group's states read the same keys and values.
    fk = jnp.repeat(fk, hs // hkv, axis=2)
    v = jnp.repeat(v, hs // hkv, axis=2)
  if st.normalize:
    v = jnp.concatenate([v, jnp.ones(v.shape[:3] + (1,), v.dtype)], axis=-1)
  if initial_state is not None:
    initial_state = initial_state.astype(jnp.float32)
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  if st.context_parallel is None:
    run = functools.partial(dispatch.dispatch, FAMILY, st.implementation)
  else:
    run = functools.partial(cp_linear.linear_attention, cp=st.context_parallel, implementation=st.implementation)
  if st.causal:
    o, state = run(fq, fk, v, log_decay, initial_state, segment_ids, spec=spec, config=st.config)
  else:
    o, state = _non_causal(fq, fk, v, initial_state, segment_ids, spec, run, st.config)
  if st.normalize:
    o = o[..., :dv] / (o[..., dv:] + NORMALIZE_EPS)
  return o.astype(fq.dtype), state


def _non_causal(fq, fk, v, initial_state, segment_ids, spec, run, config):
  """One global state per document; returns float32 outputs and the state. ``run`` is the
  causal backend call (``dispatch.dispatch`` bound to the family and implementation, or its
  context-parallel form)."""
  b, t, hq, f = fq.shape
  hs, g = spec.num_state_heads, spec.group_size
  hi = jax.lax.Precision.HIGHEST
  qg = fq.reshape(b, t, hs, g, f)
  if segment_ids is None:
    state = jnp.einsum("btsk,btsv->bskv", fk, v, preferred_element_type=jnp.float32, precision=hi)
    if initial_state is not None:
      state = state + initial_state
    o = jnp.einsum("btsgk,bskv->btsgv", qg.astype(jnp.float32), state, precision=hi)
    return o.reshape(b, t, hq, spec.value_dim), state
  # Per document: a causal pass plus an anti-causal pass (on the reversed sequence) covers every
  # pair of the document once, and the diagonal twice.
  fwd_spec = dataclasses.replace(spec, out_dtype=jnp.dtype(jnp.float32))
  bwd_spec = dataclasses.replace(fwd_spec, has_initial_state=False)
  o_fwd, state = run(fq, fk, v, None, initial_state, segment_ids, spec=fwd_spec, config=config)
  o_bwd, _ = run(jnp.flip(fq, 1), jnp.flip(fk, 1), jnp.flip(v, 1), None, None, jnp.flip(segment_ids, 1),
                 spec=bwd_spec, config=config)
  diag = jnp.einsum("btsgk,btsk->btsg", qg, fk, preferred_element_type=jnp.float32, precision=hi)
  diag = (diag[..., None] * v.astype(jnp.float32)[:, :, :, None]).reshape(b, t, hq, spec.value_dim)
  return o_fwd + jnp.flip(o_bwd, 1) - diag, state


def linear_attention_step(state: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array,
                          log_decay: ArrayLike | None = None, *,
                          feature_map: str | Callable[[jax.Array], jax.Array] | None = None,
                          scale: float | None = None, normalize: bool = False,
                          ) -> tuple[jax.Array, jax.Array]:
  """One decoding step of :func:`linear_attention`: ``(state, q_t, k_t, v_t, a_t) -> (state, o_t)``.

  Feeding the tokens of a sequence one by one, starting from its ``initial_state`` (or zeros),
  gives the outputs and final state of the causal chunked call with the same arguments.

  Args:
    state: ``[B, Hs, F, Dv]`` float32 (``Dv + 1`` with ``normalize``), e.g. the final state of a
      prefill call with ``return_final_state=True``.
    q: ``[B, Hq, D]``; k: ``[B, Hkv, D]``; v: ``[B, Hkv, Dv]``: this step's token.
    log_decay: None, ``[Hs]`` (fixed per head), ``[B, Hs]`` (this step's scalar per head) or
      ``[B, Hs, F]`` (per-channel gates); ``<= 0``, checked and clamped as in
      :func:`linear_attention`.
    feature_map, scale, normalize: as in :func:`linear_attention`.

  Returns:
    ``(new_state [B, Hs, F, Dv(+1)] float32, o [B, Hq, Dv] in q.dtype)``.
  """
  _check_array("q", q, 3, "[batch, heads, head_dim]")
  _check_array("k", k, 3, "[batch, heads, head_dim]")
  _check_array("v", v, 3, "[batch, heads, head_dim]")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  b, hq, d = q.shape
  hkv, dv = k.shape[1], v.shape[2]
  if k.shape != (b, hkv, d) or v.shape[:2] != (b, hkv) or hq % hkv:
    raise ValueError(f"step shapes must be q [B, Hq, D], k [B, Hkv, D], v [B, Hkv, Dv] with Hq a multiple "
                     f"of Hkv, got q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
  if not hasattr(state, "shape") or state.ndim != 4 or state.shape[0] != b or state.shape[1] not in (hq, hkv):
    raise ValueError(f"state must have shape [batch, state_heads, features, value_dim], state_heads "
                     f"{hkv} or {hq}, got {_shape(state) if hasattr(state, 'shape') else type(state).__name__}")
  scale = _check_scale(scale)
  fq, fk, f, inner_map = _feature_plan(q, k, feature_map, scale)
  hs = state.shape[1]
  vd = dv + 1 if normalize else dv
  if state.shape[2:] != (f, vd):
    raise ValueError(f"state must have shape {(b, hs, f, vd)} for these features and values, got {_shape(state)}")
  if log_decay is not None:
    if not hasattr(log_decay, "shape"):
      log_decay = jnp.asarray(log_decay, jnp.float32)
    if _shape(log_decay) not in ((hs,), (b, hs), (b, hs, f)):
      raise ValueError(f"log_decay must have shape {(hs,)}, {(b, hs)} or {(b, hs, f)}, got {_shape(log_decay)}")
    if not jnp.issubdtype(log_decay.dtype, jnp.floating):
      raise ValueError(f"log_decay must have a floating dtype, got {log_decay.dtype}")
    check_log_decay_sign(log_decay)
  static = (inner_map, scale if inner_map is not None else 1.0, normalize)
  return _step_cached(static, state, fq, fk, v, log_decay)


@_jit_cache.cached
def _step_cached(static, state, fq, fk, v, log_decay):
  """The array part of :func:`linear_attention_step`, compiled once per static arguments."""
  inner_map, scale, normalize = static
  if inner_map is not None:
    fq, fk = _features(fq, fk, inner_map, scale)
  b, hq, f = fq.shape
  hkv, dv = fk.shape[1], v.shape[2]
  hs, vd = state.shape[1], state.shape[3]
  if hs != hkv:
    fk = jnp.repeat(fk, hs // hkv, axis=1)
    v = jnp.repeat(v, hs // hkv, axis=1)
  if normalize:
    v = jnp.concatenate([v, jnp.ones(v.shape[:2] + (1,), v.dtype)], axis=-1)
  s = state.astype(jnp.float32)
  if log_decay is not None:
    a = jnp.exp(clamp_log_decay(log_decay.astype(jnp.float32)))
    if a.ndim == 1:
      s = s * a[None, :, None, None]
    elif a.ndim == 2:
      s = s * a[:, :, None, None]
    else:
      s = s * a[..., None]
  hi = jax.lax.Precision.HIGHEST
  s = s + jnp.einsum("bsk,bsv->bskv", fk.astype(jnp.float32), v.astype(jnp.float32), precision=hi)
  o = jnp.einsum("bsgk,bskv->bsgv", fq.astype(jnp.float32).reshape(b, hs, hq // hs, f), s, precision=hi)
  o = o.reshape(b, hq, vd)
  if normalize:
    o = o[..., :dv] / (o[..., dv:] + NORMALIZE_EPS)
  return s, o.astype(fq.dtype)
