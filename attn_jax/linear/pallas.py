"""Adapter from ``attn_jax.linear_attention`` to the chunked Pallas kernels (TPU and GPU).

What the adapter owns (the kernels in ``pallas_kernels`` know none of it):

* chunk sizes and padding: sequences to whole chunks; feature dims to multiples of 128 on TPU
  (the lane width) and to powers of two >= 16 on GPU (Triton tiles); zero padding is exact;
* the per-token factors in float32 (chunk-local cumulative log decay, query / key factors, run
  indices, and for per-channel decays the per-chunk state carry), shared with the xla backend
  (:func:`attn_jax.linear.xla.chunk_factors`);
* GQA: the kernels run one program per query head; the state gradient of a head group is fed to
  one head of the group, and ``dK``, ``dV`` and the initial-state gradient are summed per group;
* the custom VJP, including the decay gradient, which the kernels do not compute. With
  ``q^ = q exp(b)`` and ``k^ = k exp(-b)`` (``b`` the cumulative log decay), the loss depends on
  ``b_t`` only through ``q^_t``, ``k^_t`` and the final state's factor ``exp(b_T)``, so

      dL/db_t = sum(q_t * dq_t) - sum(k_t * dk_t) + [t = T - 1] sum(dS_T * S_T)

  and ``dL/dlog a_s = sum_{t >= s} dL/db_t``, summed inside the document of ``s`` (the sum over
  a later document is exactly zero) and zero where a document starts (its state was reset).
  Per-channel decays (GLA gates, ``[B, T, Hs, K]``) keep the feature axis: ``dL/db_t[f] =
  q_t[f] dq_t[f] - k_t[f] dk_t[f] + [t = T - 1] sum_v dS_T[f, v] S_T[f, v]`` (query heads
  summed per group), then the same reverse sum per document.

Per-channel decays run on their own kernels (sub-chunked intra-chunk scores, see
:mod:`pallas_kernels.linear_common`), selected statically, so the scalar and no-decay kernels are
unchanged. On a platform other than the kernel's own (e.g. CPU) the kernels run in Pallas
interpret mode: slow, exact, and meant for tests and debugging.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from attn_jax import dispatch
from attn_jax import sharding as sharding_lib
from attn_jax.linear import common
from attn_jax.linear import xla
from pallas_kernels import linear_gpu
from pallas_kernels import linear_tpu


@dataclasses.dataclass(frozen=True)
class PallasTpuConfig:
  """Tunables of the TPU (Mosaic) linear-attention kernels.

  Attributes:
    chunk_size: tokens per chunk, a multiple of 8 (``None``: 128, or the sequence rounded up to
      8 when shorter). A ``chunk_size=`` given to the call takes precedence.
    interpret: run in Pallas interpret mode; ``None`` means "unless running on a TPU".
    sharding: a NamedSharding of ``q`` (``[B, T, H, D]``); the kernels then run under
      ``shard_map`` over the mesh axes of the batch and head dimensions (sequence and feature
      dims unsharded; the state heads must divide among the head shards).
  """

  chunk_size: int | None = None
  interpret: bool | None = None
  sharding: NamedSharding | None = None

  backend: ClassVar[str] = "pallas_tpu"

  def __post_init__(self):
    dispatch.check_config_int("LinearPallasTpuConfig", "chunk_size", self.chunk_size, "a positive multiple of 8",
                              lambda c: c > 0 and c % 8 == 0)


@dataclasses.dataclass(frozen=True)
class PallasGpuConfig:
  """Tunables of the GPU (Triton-dialect Pallas) linear-attention kernels.

  Attributes:
    chunk_size: tokens per chunk, a power of two >= 16 (``None``: by feature dim and dtype, see
      :func:`gpu_launch_defaults`, or less for shorter sequences). A ``chunk_size=`` given to the
      call takes precedence.
    block_v: value columns per program, a power of two >= 16 (``None``: by feature dim and
      dtype).
    block_k: key channels per program, a power of two >= 16, in the forward and backward
      kernels (``None``: the whole key dim up to 128 in the forward pass and 64 channels in the
      backward pass, see :func:`gpu_launch_defaults`). Each program keeps a
      ``[block_k, block_v]`` float32 slice of the state (and in the backward pass of its
      gradient) in registers; the output (forward) and dV (backward) contract over the key
      channels and are summed over the blocks in float32.
    num_warps, num_stages: Triton launch parameters of the three kernels (``None``: the
      defaults by feature dim and dtype; 1 stage).
    interpret: run in Pallas interpret mode; ``None`` means "unless running on a GPU".
    sharding: as in :class:`PallasTpuConfig`.
  """

  chunk_size: int | None = None
  block_v: int | None = None
  block_k: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  interpret: bool | None = None
  sharding: NamedSharding | None = None

  backend: ClassVar[str] = "pallas_gpu"

  def __post_init__(self):
    for name in ("chunk_size", "block_v", "block_k"):
      dispatch.check_config_int("LinearPallasGpuConfig", name, getattr(self, name), "a power of two >= 16",
                                lambda c: c >= 16 and c & (c - 1) == 0)
    for name in ("num_warps", "num_stages"):
      dispatch.check_config_int("LinearPallasGpuConfig", name, getattr(self, name), "a positive int", lambda n: n > 0)


@dataclasses.dataclass(frozen=True)
class _Static:
  platform: str  # "tpu" or "gpu"
  spec: common.Spec
  chunk: int
  key_pad: int
  value_pad: int
  interpret: bool
  num_warps: int | None = None
  num_stages: int | None = None
  block_v: int | None = None  # GPU only: value columns per program.
  block_k: tuple[int, int] | None = None  # GPU only: key channels per program (forward, backward).


def _backend(platform: str):
  config_type = PallasTpuConfig if platform == "tpu" else PallasGpuConfig
  name = f"pallas_{platform}"

  def linear_attention(q, k, v, log_decay, initial_state, segment_ids, *, spec: common.Spec, config=None):
    """Pallas backend: same contract as :func:`attn_jax.linear.reference.linear_attention`."""
    config = config or config_type()
    if not isinstance(config, config_type):
      raise ValueError(f"config must be a Linear{config_type.__name__} for implementation={name!r}, "
                       f"got {type(config).__name__}")
    interpret = dispatch.pallas_interpret(config.interpret, platform)
    if platform == "tpu" and q.dtype == jnp.float16:
      # Mosaic rejects float16 vectors on TPU v4 ("Invalid vector type for load"); TPUs have no
      # float16 arithmetic anyway, so the kernels run on float32 copies.
      f32 = [x.astype(jnp.float32) for x in (q, k, v)]
      out, state = linear_attention(*f32, log_decay, initial_state, segment_ids,
                                    spec=dataclasses.replace(spec, out_dtype=jnp.dtype(jnp.float32)), config=config)
      return out.astype(spec.out_dtype), state
    chunk = spec.chunk_size or config.chunk_size
    if platform == "tpu":
      if chunk is not None and chunk % 8:
        raise ValueError(f"chunk_size must be a multiple of 8 for implementation={name!r}, got {chunk}")
      chunk = chunk or min(128, common.round_up(spec.seq_len, 8))
      key_pad, value_pad = common.round_up(spec.key_dim, 128), common.round_up(spec.value_dim, 128)
      static = _Static(platform, spec, chunk, key_pad, value_pad, interpret)
    else:
      if chunk is not None and (chunk < 16 or chunk & (chunk - 1)):
        raise ValueError(f"chunk_size must be a power of two >= 16 for implementation={name!r}, got {chunk}")
      key_pad, value_pad = dispatch.next_pow2(max(16, spec.key_dim)), dispatch.next_pow2(max(16, spec.value_dim))
      launch = gpu_launch_defaults(spec.decay, key_pad, jnp.dtype(q.dtype).itemsize)
      chunk = chunk or min(launch.chunk, max(16, dispatch.next_pow2(spec.seq_len)))
      block_v = min(config.block_v or launch.block_v, value_pad)
      block_k = tuple(min(config.block_k or b, key_pad) for b in (launch.block_k_fwd, launch.block_k_bwd))
      static = _Static(platform, spec, chunk, key_pad, value_pad, interpret, config.num_warps or launch.num_warps,
                       config.num_stages, block_v, block_k)
    dispatch.note("chunk", chunk)
    if config.sharding is not None:
      return _sharded(static, config.sharding, q, k, v, log_decay, initial_state, segment_ids)
    return _linear(static, q, k, v, log_decay, initial_state, segment_ids)

  return linear_attention


class GpuLaunch(NamedTuple):
  """Launch parameters of the GPU kernels (see :func:`gpu_launch_defaults`)."""

  chunk: int
  block_v: int
  num_warps: int
  block_k_fwd: int
  block_k_bwd: int


# (chunk, block_v, num_warps) of the GPU kernels by (decay kind, feature dim bucket, bytes per
# element); with the key blocks of gpu_launch_defaults, `python -m attn_jax.compile_check` finds
# no register spill on A100 or H100 (see benchmarks/compile_check), and no kernel above 240
# registers a thread, so that a small change in the code or the compilers does not tip one into
# spilling (A100's ptxas takes all 255 registers whenever it has a use for them). A program keeps a
# [block_k, block_v] float32 state slice (and in the backward pass its gradient) in registers,
# plus [chunk, block_k] tiles; per-channel decays add [chunk, 16] sub-chunk scores and
# [chunk, block_k] factors. 16 warps would cap ptxas at 128 registers a thread.
_GPU_LAUNCH = {
    ("scalar", 64, 2): (16, 32, 8), ("scalar", 128, 2): (16, 32, 8), ("scalar", 256, 2): (16, 32, 8),
    ("scalar", 64, 4): (16, 16, 8), ("scalar", 128, 4): (16, 16, 8), ("scalar", 256, 4): (16, 16, 8),
    ("channel", 64, 2): (16, 16, 8), ("channel", 128, 2): (16, 16, 8), ("channel", 256, 2): (16, 16, 8),
    ("channel", 64, 4): (16, 16, 8), ("channel", 128, 4): (16, 16, 8), ("channel", 256, 4): (16, 16, 8),
}


def gpu_launch_defaults(decay: str, key_dim: int, itemsize: int) -> GpuLaunch:
  """Default launch parameters of the GPU kernels.

  Args:
    decay: ``"none"``, ``"scalar"`` or ``"channel"`` (:mod:`attn_jax.linear.common`).
    key_dim: the (power-of-two padded) feature dim of q and k.
    itemsize: bytes per element of q / k / v.

  What bounds the registers is the matmuls whose output has the 16-row chunk dim (the scores
  ``q k^T``, and ``(k * kf) dS`` of dV): Triton splits an output's rows among the warps, so every
  warp holds all of their operands, ``block_k * (chunk + block_v)`` elements. Key blocks of 64
  channels keep the backward kernels in budget at any head dim; the forward kernels take the
  whole key dim up to 128 (their output is then written directly rather than summed over key
  blocks in float32) and 64-channel blocks above. One set serves A100 and H100 (the same
  register file), so no device query is needed.
  """
  kind = "channel" if decay == common.CHANNEL else "scalar"
  bucket = 64 if key_dim <= 64 else 128 if key_dim <= 128 else 256
  chunk, block_v, warps = _GPU_LAUNCH[(kind, bucket, 4 if itemsize >= 4 else 2)]
  return GpuLaunch(chunk, block_v, warps, block_k_fwd=key_dim if key_dim <= 128 else 64,
                   block_k_bwd=min(key_dim, 64))


linear_attention_tpu = _backend("tpu")
linear_attention_gpu = _backend("gpu")


def _pad_to(x, sizes):
  """Zero-pads the trailing axes of ``x`` to ``sizes`` (one per axis, None to keep)."""
  widths = [(0, 0)] * (x.ndim - len(sizes)) + [(0, 0 if s is None else s - n)
                                                 for s, n in zip(sizes, x.shape[x.ndim - len(sizes):])]
  return jnp.pad(x, widths)


def _heads_first(x, st: _Static, width):
  """``[B, T, H, X] -> [B, H, T_pad, X_pad]``."""
  t_pad = common.round_up(x.shape[1], st.chunk)
  return _pad_to(x.transpose(0, 2, 1, 3), (t_pad, width))


def _tokens_last(x, st: _Static, width):
  """``[B, H, T_pad, X_pad] -> [B, T, H, width]``."""
  return x[:, :, :st.spec.seq_len, :width].transpose(0, 2, 1, 3)


def _features_first(x, st: _Static, width):
  """``[B, T, H, X] -> [B, H, X_pad, T_pad]`` (the GPU backward kernels' layout of q and k)."""
  t_pad = common.round_up(x.shape[1], st.chunk)
  return _pad_to(x.transpose(0, 2, 3, 1), (width, t_pad))


def _features_last(x, st: _Static, width):
  """``[B, H, X_pad, T_pad] -> [B, T, H, width]``."""
  return x[:, :, :width, :st.spec.seq_len].transpose(0, 3, 1, 2)


def _factors(st: _Static, log_decay, segment_ids, batch, feature_major=False):
  """Keyword arguments of the kernels: per-token factors in the kernel's layout (or nothing).

  ``feature_major``: per-channel factors as ``[B, Hs, K_pad, T_pad]`` (the GPU backward kernels).
  """
  s = st.spec
  has_decay = s.decay != common.NONE
  if not (has_decay or s.has_segments):
    return {}
  c = st.chunk
  tp = common.round_up(s.seq_len, c)
  n = tp // c
  f = xla.chunk_factors(log_decay, segment_ids, spec=s, batch=batch, chunk=c)
  if s.decay == common.CHANNEL:
    return _channel_factors(st, f, segment_ids, batch, feature_major)
  shape = (batch, s.num_state_heads, n, c)
  qf = jnp.broadcast_to(f.q_factor, shape).reshape(batch, s.num_state_heads, tp)
  kf = jnp.broadcast_to(f.k_factor, shape).reshape(batch, s.num_state_heads, tp)
  local = f.local.reshape(batch, s.num_state_heads, tp) if has_decay else None
  runs = None
  if s.has_segments:
    runs = common.pad_axis(common.reset_index(segment_ids), 1, tp, mode="edge")
  if st.platform == "gpu":
    return dict(b=local, r=runs, qf=qf, kf=kf)
  out = dict(qf=qf[..., None], kf=kf[..., None])
  if has_decay:
    out.update(b_col=local[..., None], b_row=local.reshape(batch, s.num_state_heads, n, 1, c))
  if s.has_segments:
    out.update(r_col=runs[..., None], r_row=runs.reshape(batch, n, 1, c))
  return out


def _channel_factors(st: _Static, f: xla.ChunkFactors, segment_ids, batch, feature_major=False):
  """Per-channel decays: ``[B, Hs, T, K_pad]`` decay and factors and the per-chunk carry columns.

  The padded feature columns get zeros (their q, k, state rows are zero, so any finite value
  would do).
  """
  s = st.spec
  hs, tp = s.num_state_heads, common.round_up(s.seq_len, st.chunk)
  n = tp // st.chunk

  def tokens(x):  # [B or 1, Hs or 1, N, C, K] -> [B, Hs, T, K_pad] (or [B, Hs, K_pad, T])
    x = jnp.broadcast_to(x, (batch, hs, n, st.chunk, s.key_dim)).reshape(batch, hs, tp, s.key_dim)
    if feature_major:
      return _pad_to(x.transpose(0, 1, 3, 2), (st.key_pad, None))
    return _pad_to(x, (st.key_pad,))

  carry = _pad_to(jnp.broadcast_to(f.carry, (batch, hs, n, s.key_dim)), (st.key_pad,))
  out = dict(b=tokens(f.local), qf=tokens(f.q_factor), kf=tokens(f.k_factor))
  runs = None
  if s.has_segments:
    runs = common.pad_axis(common.reset_index(segment_ids), 1, tp, mode="edge")
  if st.platform == "gpu":  # carry [B, Hs, K_pad, N]
    return dict(out, r=runs, carry=carry.transpose(0, 1, 3, 2))
  out.update(carry=carry[..., None])
  if s.has_segments:
    out.update(r_col=runs[..., None], r_row=runs.reshape(batch, n, 1, st.chunk))
  return out


def _launch_options(st: _Static, backward=False):
  opts = dict(chunk=st.chunk, interpret=st.interpret)
  if st.platform == "gpu":
    opts.update(num_warps=st.num_warps, num_stages=st.num_stages, block_v=st.block_v,
                block_k=st.block_k[1 if backward else 0])
  return opts


def _kernels(st: _Static):
  return linear_tpu if st.platform == "tpu" else linear_gpu


def _initial_state(st: _Static, s0, batch):
  s = st.spec
  if s0 is None:
    return jnp.zeros((batch, s.num_state_heads, st.key_pad, st.value_pad), jnp.float32)
  return _pad_to(s0.astype(jnp.float32), (st.key_pad, st.value_pad))


def _forward(st: _Static, q, k, v, log_decay, s0, segment_ids):
  s = st.spec
  b = q.shape[0]
  o, state = _kernels(st).forward(
      _heads_first(q, st, st.key_pad), _heads_first(k, st, st.key_pad), _heads_first(v, st, st.value_pad),
      _initial_state(st, s0, b), **_factors(st, log_decay, segment_ids, b), out_dtype=s.out_dtype,
      **_launch_options(st))
  # Every query head of a group computed the same state; keep the first head's copy.
  state = state[:, ::s.group_size, :s.key_dim, :s.value_dim]
  return _tokens_last(o, st, s.value_dim), state


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear(st: _Static, q, k, v, log_decay, s0, segment_ids):
  return _forward(st, q, k, v, log_decay, s0, segment_ids)


def _linear_fwd(st, q, k, v, log_decay, s0, segment_ids):
  o, state = _forward(st, q, k, v, log_decay, s0, segment_ids)
  return (o, state), (q, k, v, log_decay, s0, segment_ids, state)


def _linear_bwd(st: _Static, residuals, cotangents):
  q, k, v, log_decay, s0, segment_ids, state = residuals
  d_out, d_state = cotangents
  s = st.spec
  b, t, hq, _ = q.shape
  hs, g = s.num_state_heads, s.group_size
  # The final-state gradient enters the backward sweep of one query head per group only.
  dst = _pad_to(d_state.astype(jnp.float32), (st.key_pad, st.value_pad))
  dst = jnp.zeros((b, hs, g) + dst.shape[2:], jnp.float32).at[:, :, 0].set(dst).reshape(b, hq, *dst.shape[2:])
  # The GPU backward kernels take q, k (and per-channel factors) feature-major and return dq, dk
  # the same way (see pallas_kernels.linear_gpu.backward).
  gpu = st.platform == "gpu"
  keys_in = _features_first if gpu else _heads_first
  keys_out = _features_last if gpu else _tokens_last
  dq, dk, dv, ds0 = _kernels(st).backward(
      keys_in(q, st, st.key_pad), keys_in(k, st, st.key_pad), _heads_first(v, st, st.value_pad),
      _initial_state(st, s0, b), _heads_first(d_out, st, st.value_pad), dst,
      **_factors(st, log_decay, segment_ids, b, feature_major=gpu), **_launch_options(st, backward=True))

  def group_sum(x):  # [B, Hq, ...] -> [B, Hs, ...]
    return x.reshape((b, hs, g) + x.shape[2:]).sum(axis=2)

  dq = keys_out(dq, st, s.key_dim).astype(jnp.float32)
  dk = keys_out(group_sum(dk), st, s.key_dim)
  dv = _tokens_last(group_sum(dv), st, s.value_dim)
  ds0 = group_sum(ds0)[:, :, :s.key_dim, :s.value_dim] if s0 is not None else None
  d_decay = None
  if log_decay is not None:
    d_decay = _decay_gradient(st, q, k, dq, dk, state, d_state, segment_ids)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_decay, ds0, None)


def _decay_gradient(st: _Static, q, k, dq, dk, state, d_state, segment_ids):
  """Gradient of the ``[B, T, Hs]`` (or per-channel ``[B, T, Hs, K]``) log decay from the q / k
  gradients (see the module doc); a per-channel decay keeps the feature axis instead of summing it."""
  s = st.spec
  b, t, hq, kd = q.shape
  hs, g = s.num_state_heads, s.group_size
  qdq = q.astype(jnp.float32) * dq  # [B, T, Hq, K] (features unpadded)
  kdk = k.astype(jnp.float32) * dk
  dsds = d_state.astype(jnp.float32) * state  # [B, Hs, K, V]
  if s.decay == common.CHANNEL:
    # A query head group reads one state: sum its heads, keep the features.
    d_cum = qdq.reshape(b, t, hs, g, kd).sum(3) - kdk  # dL/db_t, [B, T, Hs, K]
    d_cum = d_cum.at[:, t - 1].add(dsds.sum(3))
  else:
    d_cum = qdq.sum(-1).reshape(b, t, hs, g).sum(-1) - kdk.sum(-1)  # dL/db_t, [B, T, Hs]
    d_cum = d_cum.at[:, t - 1].add(dsds.sum((2, 3)))
  if segment_ids is None:
    return jnp.flip(jnp.cumsum(jnp.flip(d_cum, 1), axis=1), 1)
  starts = common.run_starts(segment_ids).reshape((b, t) + (1,) * (d_cum.ndim - 2))
  return jnp.where(starts, 0.0, common.segment_reverse_cumsum(d_cum, starts, axis=1))


_linear.defvjp(_linear_fwd, _linear_bwd)


def _sharded(st: _Static, sharding, q, k, v, log_decay, s0, segment_ids):
  """Runs the kernels under ``shard_map`` over the batch and head mesh axes of ``sharding``.

  XLA cannot partition a Pallas call, so each shard runs the kernels on its own batch rows and
  heads; a shard's query heads and their state heads stay together because both are split into
  the same number of contiguous blocks.
  """
  sh = sharding_lib.kernel_shards(sharding, q.shape[0], "linear-attention kernels")
  s = st.spec
  if s.num_state_heads % sh.num_heads:
    raise ValueError(f"state heads {s.num_state_heads} (q heads {s.num_q_heads}) are not divisible by the "
                     f"{sh.num_heads} shards of mesh axes {sh.head_axes}")
  local = dataclasses.replace(st, spec=dataclasses.replace(
      s, num_q_heads=s.num_q_heads // sh.num_heads, num_state_heads=s.num_state_heads // sh.num_heads))
  b, h = sh.batch, sh.heads
  tokens = PartitionSpec(b, None, h, None)
  state = PartitionSpec(b, h, None, None)
  decay = None
  if log_decay is not None:
    decay = PartitionSpec(b, None, h, None) if log_decay.ndim == 4 else PartitionSpec(b, None, h)
  in_specs = (tokens, tokens, tokens, decay,
              None if s0 is None else state, None if segment_ids is None else PartitionSpec(b, None))
  args = [x if x is None else sharding_lib.place_for_shard_map(x, sh.mesh, p)
          for x, p in zip((q, k, v, log_decay, s0, segment_ids), in_specs)]
  fn = jax.shard_map(functools.partial(_linear, local), mesh=sh.mesh, in_specs=in_specs,
                     out_specs=(tokens, state), check_vma=False)
  return fn(*args)
