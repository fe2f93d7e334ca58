"""Adapter from ``attn_jax.attention`` to the block-sparse Pallas flash kernels (TPU and GPU).

What the adapter owns (the kernels in ``pallas_kernels`` know none of it):

* block sizes: per-platform frozen configs with heuristic defaults and hardware constraints;
* padding: sequences to whole blocks; on GPU head dims to a power of two >= 16 (Triton tiles);
* the BlockMask -> kernel schedule translation, and the choice between evaluating the mask
  predicate in-kernel (masks whose ``in_kernel`` is True) and reading precomputed tiles;
* the custom VJP: the backward pass gets ``delta = rowsum(dO * O) - dLSE`` and an LSE in which
  rows that must not contribute are ``+inf``; the sinks' gradient is computed here from the LSE;
* sharding: with ``config.sharding`` (a NamedSharding of q) the call runs under ``shard_map``
  over the batch and head mesh axes, since XLA cannot partition a Pallas call.

On a platform other than the kernel's own (e.g. CPU), the kernels run in Pallas interpret mode:
slow, exact, and meant for tests and debugging.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from attn_jax import block_mask as block_mask_lib
from attn_jax import block_mask_traced
from attn_jax import dispatch
from attn_jax import sharding as sharding_lib
from attn_jax.softmax import common
from pallas_kernels import flash_common
from pallas_kernels import flash_gpu
from pallas_kernels import flash_tpu

# The kernels and the BlockMask must agree on what the tile kinds mean.
assert (flash_common.EMPTY, flash_common.PARTIAL, flash_common.FULL) == (
    block_mask_lib.EMPTY, block_mask_lib.PARTIAL, block_mask_lib.FULL)


@dataclasses.dataclass(frozen=True)
class PallasTpuConfig:
  """Tunables of the TPU (Mosaic) kernels.

  Attributes:
    block_q, block_kv: tile sizes; on TPU hardware multiples of 128 (the lane width). ``None``
      picks ``min(512, length rounded up to 128)``. In interpret mode any multiple of 8 is
      accepted, so tests can use many small tiles.
    interpret: run in Pallas interpret mode; ``None`` means "unless running on a TPU".
    sharding: a NamedSharding of ``q`` (``[B, T, H, D]``); the kernel then runs under
      ``shard_map`` over the mesh axes of the batch and head dimensions (sequence and head_dim
      must be unsharded).
    record_visits: debugging aid, interpret mode only: ``f(phase, batch, head, q_block,
      kv_block, evaluated_mask)`` called for every tile a kernel visits (phase "fwd", "dq" or
      "dkv").
  """

  block_q: int | None = None
  block_kv: int | None = None
  interpret: bool | None = None
  sharding: NamedSharding | None = None
  record_visits: Callable[..., None] | None = None

  backend: ClassVar[str] = "pallas_tpu"

  def __post_init__(self):
    for name in ("block_q", "block_kv"):
      dispatch.check_config_int("PallasTpuConfig", name, getattr(self, name), "a positive multiple of 8",
                                lambda b: b > 0 and b % 8 == 0)


@dataclasses.dataclass(frozen=True)
class PallasGpuLaunch:
  """Block sizes and Triton launch parameters of one GPU kernel (forward, dQ or dK/dV).

  Every field left None falls back to :class:`PallasGpuConfig`'s field of the same name, then to
  that kernel's heuristic default.
  """

  block_q: int | None = None
  block_kv: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    _check_gpu_launch("PallasGpuLaunch", self)


def _check_gpu_launch(owner, launch):
  for name in ("block_q", "block_kv"):
    dispatch.check_config_int(owner, name, getattr(launch, name), "a power of two >= 16",
                              lambda b: b >= 16 and b & (b - 1) == 0)
  for name in ("num_warps", "num_stages"):
    dispatch.check_config_int(owner, name, getattr(launch, name), "a positive int", lambda b: b > 0)


@dataclasses.dataclass(frozen=True)
class PallasGpuConfig:
  """Tunables of the GPU (Triton-dialect Pallas) kernels.

  Attributes:
    block_q, block_kv: tile sizes of all three kernels, powers of two >= 16 (``None``: each
      kernel's default by head dim and dtype, see :func:`gpu_launch_defaults`, capped by the
      power-of-two-rounded sequence lengths).
    num_warps, num_stages: Triton launch parameters of all three kernels (``None``: each
      kernel's default).
    fwd, dq, dkv: :class:`PallasGpuLaunch` overrides for one kernel (the forward, the dQ and the
      dK/dV kernel); their None fields fall back to the fields above.
    interpret, sharding, record_visits: as in :class:`PallasTpuConfig`.
  """

  block_q: int | None = None
  block_kv: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  fwd: PallasGpuLaunch | None = None
  dq: PallasGpuLaunch | None = None
  dkv: PallasGpuLaunch | None = None
  interpret: bool | None = None
  sharding: NamedSharding | None = None
  record_visits: Callable[..., None] | None = None

  backend: ClassVar[str] = "pallas_gpu"

  def __post_init__(self):
    _check_gpu_launch("PallasGpuConfig", self)
    for name in _GPU_KERNELS:
      value = getattr(self, name)
      if value is not None and not isinstance(value, PallasGpuLaunch):
        raise ValueError(f"PallasGpuConfig.{name} must be a PallasGpuLaunch or None, got {value!r}")


@dataclasses.dataclass(frozen=True)
class _Static:
  platform: str  # "tpu" or "gpu"
  spec: common.Spec
  block_q: int
  block_kv: int
  interpret: bool
  num_warps: int | None
  num_stages: int | None
  record: Callable[..., None] | None
  # GPU only: (block_q, block_kv, num_warps, num_stages) of the dQ and dK/dV kernels; the fields
  # above are the forward kernel's.
  gpu_bwd: tuple[tuple[int, int, int, int], tuple[int, int, int, int]] | None = None

  @property
  def block_mask(self) -> block_mask_lib.BlockMask:
    s = self.spec
    return block_mask_lib.make_block_mask(s.mask, s.q_len, s.kv_len, self.block_q, self.block_kv,
                                          s.num_q_heads)


def _tpu_blocks(config: PallasTpuConfig, spec: common.Spec, interpret: bool):
  bq = config.block_q or min(512, dispatch.round_up(spec.q_len, 128))
  bk = config.block_kv or min(512, dispatch.round_up(spec.kv_len, 128))
  if not interpret and (bq % 128 or bk % 128):
    raise ValueError(f"PallasTpuConfig block sizes must be multiples of 128 on TPU hardware, "
                     f"got block_q={bq}, block_kv={bk}")
  return bq, bk


_GPU_KERNELS = ("fwd", "dq", "dkv")


# (block_q, block_kv, num_warps, num_stages) per kernel, by (head dim bucket, bytes per element).
# The dK/dV kernel holds a key block (block_kv rows) and walks query blocks of block_q rows. Read
# off ptxas and the A100 shared-memory limit with `python -m attn_jax.compile_check` (worst case:
# tiles read from the BlockMask, soft-cap, segment ids): every entry up to head dim 128 spills no
# register on H100 or A100 and fits the A100's 163 KiB of shared memory.
_GPU_LAUNCH = {
    # 16-bit inputs (bfloat16, float16)
    (64, 2): {"fwd": (128, 64, 8, 2), "dq": (128, 64, 8, 2), "dkv": (32, 64, 8, 2)},
    (128, 2): {"fwd": (128, 32, 8, 2), "dq": (128, 32, 8, 2), "dkv": (32, 32, 8, 2)},
    (256, 2): {"fwd": (64, 32, 8, 2), "dq": (32, 32, 8, 2), "dkv": (32, 32, 8, 2)},
    # float32 inputs: operand tiles take twice the registers.
    (64, 4): {"fwd": (128, 32, 8, 2), "dq": (32, 32, 8, 2), "dkv": (32, 32, 4, 2)},
    (128, 4): {"fwd": (32, 32, 8, 2), "dq": (32, 32, 8, 2), "dkv": (32, 32, 8, 2)},
    (256, 4): {"fwd": (32, 32, 8, 2), "dq": (32, 16, 8, 2), "dkv": (16, 32, 8, 2)},
}


def gpu_launch_defaults(kernel: str, head_dim: int, itemsize: int) -> tuple[int, int, int, int]:
  """Default ``(block_q, block_kv, num_warps, num_stages)`` of a GPU kernel.

  Args:
    kernel: ``"fwd"``, ``"dq"`` or ``"dkv"``.
    head_dim: the larger of the (power-of-two padded) QK and V head dims, at most 256.
    itemsize: bytes per element of q / k / v (2 for bfloat16 / float16, 4 for float32).

  One set of parameters serves A100 and H100 (the same register file; the A100's smaller shared
  memory bounds the blocks), so the choice needs no device query at trace time.
  """
  bucket = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
  return _GPU_LAUNCH[(bucket, 4 if itemsize >= 4 else 2)][kernel]


def _gpu_launches(config: PallasGpuConfig, spec: common.Spec, itemsize: int):
  """``{kernel: (block_q, block_kv, num_warps, num_stages)}`` for the three GPU kernels."""
  head_dim = max(16, dispatch.next_pow2(max(spec.head_dim, spec.v_head_dim)))
  q_cap = max(16, dispatch.next_pow2(spec.q_len))
  kv_cap = max(16, dispatch.next_pow2(spec.kv_len))
  out = {}
  for kernel in _GPU_KERNELS:
    own = getattr(config, kernel) or PallasGpuLaunch()
    default = gpu_launch_defaults(kernel, head_dim, itemsize)
    bq, bk, warps, stages = (
        getattr(own, f) or getattr(config, f) or dflt
        for f, dflt in zip(("block_q", "block_kv", "num_warps", "num_stages"), default))
    if not (own.block_q or config.block_q):
      bq = min(bq, q_cap)
    if not (own.block_kv or config.block_kv):
      bk = min(bk, kv_cap)
    out[kernel] = (bq, bk, warps, stages)
  return out


def _gpu_pass(st: _Static, kernel: str) -> _Static:
  """The static description of the GPU backward kernel ``kernel`` ("dq" or "dkv")."""
  bq, bk, warps, stages = st.gpu_bwd[("dq", "dkv").index(kernel)]
  return dataclasses.replace(st, block_q=bq, block_kv=bk, num_warps=warps, num_stages=stages)


def _mask_spec(st: _Static) -> flash_common.MaskSpec:
  s = st.spec
  bm = st.block_mask
  has_partial = bm.num_partial > 0
  use_tiles = has_partial and not s.mask.in_kernel
  predicate = None
  if has_partial and not use_tiles:
    ctx = s.mask_context
    head_dep = s.mask.depends_on_head

    def predicate(q_idx, kv_idx, head):
      visible = s.mask.evaluate(q_idx, kv_idx, head if head_dep else None, ctx, jnp)
      return visible & (kv_idx < s.kv_len)
  return flash_common.MaskSpec(predicate=predicate, use_tiles=use_tiles, per_head=bm.num_heads > 1,
                               has_full=bm.num_full > 0, has_partial=has_partial)


def _schedule(st: _Static, mask: flash_common.MaskSpec, head_offset, local_heads: int):
  """Kernel schedule; per-head lists are cut to the heads of this shard."""
  bm = st.block_mask
  if mask.use_tiles:
    pt = block_mask_lib.partial_tiles(bm)
    tiles, kv_tid, q_tid = pt.tiles, pt.kv_tile_ids, pt.q_tile_ids
  else:
    tiles = np.zeros((1, 1, 1), np.int8)
    kv_tid, q_tid = np.zeros_like(bm.kv_indices), np.zeros_like(bm.q_indices)
  arrays = [bm.kv_indices, bm.kv_kinds, bm.kv_counts, kv_tid, bm.q_indices, bm.q_kinds,
            bm.q_counts, q_tid]
  arrays = [jnp.asarray(a, jnp.int32) for a in arrays]
  if mask.per_head and local_heads != bm.num_heads:
    arrays = [jax.lax.dynamic_slice_in_dim(a, head_offset[0], local_heads, axis=0) for a in arrays]
  return flash_common.Schedule(*arrays, jnp.asarray(tiles, jnp.int8))


def _traced_plan(st: _Static, lists):
  """MaskSpec and Schedule of a traced BlockMask: its device lists, rows = (batch, list head)."""
  s = st.spec
  static = s.traced_layout.static_block_mask
  has_partial = static.num_partial > 0
  predicate = None
  if has_partial:
    ctx = s.mask_context

    def predicate(q_idx, kv_idx, head):
      return s.mask.evaluate(q_idx, kv_idx, None, ctx, jnp) & (kv_idx < s.kv_len)
  kv_indices, kv_kinds, kv_counts, q_offsets, q_indices, q_kinds = lists
  bm, hm, nq, w = kv_indices.shape
  rows = bm * hm
  mask = flash_common.MaskSpec(predicate=predicate, use_tiles=False, per_head=hm > 1,
                               has_full=static.num_full > 0, has_partial=has_partial,
                               head_group=s.num_q_heads // hm, per_batch=bm > 1, list_heads=hm,
                               csr_transposed=True)
  unused = jnp.zeros((1, 1, 1), jnp.int32)
  sched = flash_common.Schedule(
      kv_indices.reshape(rows, nq, w), kv_kinds.reshape(rows, nq, w), kv_counts.reshape(rows, nq), unused,
      q_indices.reshape(rows, nq * w), q_kinds.reshape(rows, nq * w), q_offsets.reshape(rows, -1),
      unused[0], jnp.zeros((1, 1, 1), jnp.int8))
  return mask, sched


def _plan(st: _Static, lists, head_offset, local_heads: int):
  """The kernels' MaskSpec and Schedule: the static BlockMask's, or the traced lists'."""
  if lists is not None:
    return _traced_plan(st, lists)
  mask = _mask_spec(st)
  return mask, _schedule(st, mask, head_offset, local_heads)


def _pad_to(x, axis, size, value=0):
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _kernel_kwargs(st: _Static, mask):
  kw = dict(mask=mask, scale=st.spec.scale, soft_cap=st.spec.logits_soft_cap, block_q=st.block_q,
            block_kv=st.block_kv, interpret=st.interpret, record=st.record)
  if st.platform == "gpu":
    kw.update(num_warps=st.num_warps, num_stages=st.num_stages)
  return kw


def _head_dims(st: _Static):
  if st.platform == "gpu":
    return (max(16, dispatch.next_pow2(st.spec.head_dim)), max(16, dispatch.next_pow2(st.spec.v_head_dim)))
  return st.spec.head_dim, st.spec.v_head_dim


def _padded(st: _Static, q, k, v, q_seg, kv_seg):
  tq, tk = dispatch.round_up(q.shape[1], st.block_q), dispatch.round_up(k.shape[1], st.block_kv)
  d, dv = _head_dims(st)
  q = _pad_to(_pad_to(q, 1, tq), 3, d)
  k = _pad_to(_pad_to(k, 1, tk), 3, d)
  v = _pad_to(_pad_to(v, 1, tk), 3, dv)
  if q_seg is not None:
    q_seg = _pad_to(q_seg.astype(jnp.int32), 1, tq, -1)
    kv_seg = _pad_to(kv_seg.astype(jnp.int32), 1, tk, -2)
  return q, k, v, q_seg, kv_seg


def _kernels(st: _Static):
  return flash_tpu if st.platform == "tpu" else flash_gpu


def _forward(st: _Static, q, k, v, sinks, q_seg, kv_seg, head_offset, lists):
  mask, sched = _plan(st, lists, head_offset, q.shape[2])
  tq = q.shape[1]
  qp, kp, vp, qs, ks = _padded(st, q, k, v, q_seg, kv_seg)
  sinks32 = None if sinks is None else sinks.astype(jnp.float32)
  o, lse = _kernels(st).flash_fwd(qp, kp, vp, sinks32, qs, ks, head_offset, sched,
                                  **_kernel_kwargs(st, mask))
  return o[:, :tq, :, :v.shape[3]], lse[:, :tq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, sinks, q_seg, kv_seg, head_offset, lists):
  return _forward(st, q, k, v, sinks, q_seg, kv_seg, head_offset, lists)


def _flash_fwd(st, q, k, v, sinks, q_seg, kv_seg, head_offset, lists):
  out, lse = _forward(st, q, k, v, sinks, q_seg, kv_seg, head_offset, lists)
  return (out, lse), (q, k, v, sinks, q_seg, kv_seg, head_offset, lists, out, lse)


def _bwd_pass(st: _Static, kernel, q, k, v, q_seg, kv_seg, head_offset, lists, lse, d_out, delta):
  """Pads the inputs of a backward kernel to the blocks of ``st`` and runs it."""
  mask, sched = _plan(st, lists, head_offset, q.shape[2])
  qp, kp, vp, qs, ks = _padded(st, q, k, v, q_seg, kv_seg)
  tq_pad = qp.shape[1]
  _, dv = _head_dims(st)
  # Rows that must contribute nothing get lse = +inf, so p = exp(s - lse) is exactly 0 there:
  # padded rows and rows that saw no key.
  lse_b = _pad_to(jnp.where(jnp.isfinite(lse), lse, jnp.inf), 1, tq_pad, jnp.inf)
  do = _pad_to(_pad_to(d_out, 1, tq_pad), 3, dv).astype(q.dtype)
  delta = _pad_to(delta, 1, tq_pad)
  return kernel(qp, kp, vp, qs, ks, head_offset, sched, lse_b, do, delta, **_kernel_kwargs(st, mask))


def _flash_bwd(st: _Static, residuals, cotangents):
  q, k, v, sinks, q_seg, kv_seg, head_offset, lists, out, lse = residuals
  d_out, d_lse = cotangents
  # delta_i = dO_i . O_i - dLSE_i (see the xla backend for the derivation).
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse
  d_sinks = None
  if sinks is not None:
    p_sink = jnp.exp(sinks.astype(jnp.float32)[None, None, :] - lse)
    d_sinks = (-(p_sink * delta).sum((0, 1))).astype(sinks.dtype)
  args = (q, k, v, q_seg, kv_seg, head_offset, lists, lse, d_out, delta)
  if st.platform == "gpu":
    # The GPU's dQ and dK/dV kernels run with their own blocks, each on its own BlockMask.
    dq = _bwd_pass(_gpu_pass(st, "dq"), flash_gpu.flash_dq, *args)
    dk, dv_ = _bwd_pass(_gpu_pass(st, "dkv"), flash_gpu.flash_dkv, *args)
  else:
    dq, dk, dv_ = _bwd_pass(st, flash_tpu.flash_bwd, *args)
  tq, tk = q.shape[1], k.shape[1]
  dq = dq[:, :tq, :, :q.shape[3]]
  dk = dk[:, :tk, :, :k.shape[3]]
  dv_ = dv_[:, :tk, :, :v.shape[3]]
  return dq, dk, dv_, d_sinks, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _sharded(st: _Static, sharding: NamedSharding, q, k, v, sinks, q_seg, kv_seg):
  """Runs the kernel under shard_map over the batch and head mesh axes of ``sharding``."""
  sh = sharding_lib.kernel_shards(sharding, q.shape[0], "flash kernels")
  s = st.spec
  if s.num_q_heads % sh.num_heads:
    raise ValueError(f"q heads {s.num_q_heads} are not divisible by the {sh.num_heads} shards of mesh "
                     f"axes {sh.head_axes}")
  local_q_heads = s.num_q_heads // sh.num_heads
  if s.num_kv_heads % sh.num_heads == 0:
    kv_head_spec, slice_kv = sh.heads, False
  elif s.group_size % local_q_heads == 0:
    # Fewer K/V heads than head shards (e.g. MQA): K/V stay replicated over the head axes and each
    # shard slices the one K/V head its query heads share.
    kv_head_spec, slice_kv = None, True
  else:
    raise ValueError(f"cannot shard {s.num_q_heads} q heads / {s.num_kv_heads} kv heads over "
                     f"{sh.num_heads} head shards")

  q_spec = PartitionSpec(sh.batch, None, sh.heads, None)
  kv_spec = PartitionSpec(sh.batch, None, kv_head_spec, None)
  seg_spec = PartitionSpec(sh.batch, None)
  sink_spec = PartitionSpec(sh.heads)

  def body(q, k, v, sinks, q_seg, kv_seg):
    shard = jax.lax.axis_index(sh.head_axes) if sh.head_axes else 0
    head_offset = jnp.reshape(shard * local_q_heads, (1,)).astype(jnp.int32)
    if slice_kv:
      kv_head = (shard * local_q_heads) // s.group_size
      k = jax.lax.dynamic_slice_in_dim(k, kv_head, 1, axis=2)
      v = jax.lax.dynamic_slice_in_dim(v, kv_head, 1, axis=2)
    return _flash(st, q, k, v, sinks, q_seg, kv_seg, head_offset, None)

  in_specs = (q_spec, kv_spec, kv_spec, None if sinks is None else sink_spec,
              None if q_seg is None else seg_spec, None if kv_seg is None else seg_spec)
  out_specs = (q_spec, PartitionSpec(sh.batch, None, sh.heads))
  args = [x if x is None else sharding_lib.place_for_shard_map(x, sh.mesh, p)
          for x, p in zip((q, k, v, sinks, q_seg, kv_seg), in_specs)]
  fn = jax.shard_map(body, mesh=sh.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  return fn(*args)


def _traced_blocks(config: PallasGpuConfig, spec: common.Spec, block_mask):
  """Tile sizes for a traced BlockMask: its own blocks, which Triton needs as powers of two >= 16."""
  lay = block_mask.layout
  for launch in [config] + [getattr(config, kernel) for kernel in _GPU_KERNELS if getattr(config, kernel)]:
    block_mask_traced.check_tile_config("PallasGpuConfig", launch, lay)
  for name, want in (("block_q", lay.block_q), ("block_kv", lay.block_kv)):
    if want < 16 or want & (want - 1):
      raise NotImplementedError(f"traced block_mask {name}={want} (Triton tiles are powers of two >= 16)")
  if lay.static_block_mask.num_partial and not spec.mask.in_kernel:
    raise NotImplementedError(f"a traced block_mask over the mask {spec.mask!r}, which kernels cannot "
                              f"evaluate in-kernel")
  return lay.block_q, lay.block_kv


def _attention(platform: str, config_type):
  def attention(q, k, v, sinks, q_segment_ids, kv_segment_ids, block_mask=None, *, spec: common.Spec,
                config=None):
    config = config if config is not None else config_type()
    if not isinstance(config, config_type):
      raise ValueError(f"config must be a {config_type.__name__} for implementation="
                       f"'pallas_{platform}', got {type(config).__name__}")
    if block_mask is not None and platform == "tpu":
      # The TPU kernels' schedule format is being rewritten (issue 11); traced lists join it then.
      raise NotImplementedError("a traced block_mask on the TPU kernel (issue 14, stage 2)")
    interpret = dispatch.pallas_interpret(config.interpret, platform)
    if config.record_visits is not None and not interpret:
      raise ValueError("record_visits is a debugging aid for interpret mode only")
    if platform == "tpu" and q.dtype == jnp.float16:
      # Mosaic rejects float16 vectors on TPU v4 ("Invalid vector type for load"); TPUs have no
      # float16 arithmetic anyway, so the kernels run on float32 copies.
      f32 = [x.astype(jnp.float32) for x in (q, k, v)]
      out, lse = attention(*f32, sinks, q_segment_ids, kv_segment_ids, spec=spec, config=config,
                           block_mask=block_mask)
      return out.astype(q.dtype), lse
    gpu_bwd = None
    if platform == "tpu":
      bq, bk = _tpu_blocks(config, spec, interpret)
      warps = stages = None
    else:
      if max(spec.head_dim, spec.v_head_dim) > 256:
        raise NotImplementedError(f"head dims above 256 (got {spec.head_dim}, {spec.v_head_dim})")
      launches = _gpu_launches(config, spec, jnp.dtype(q.dtype).itemsize)
      bq, bk, warps, stages = launches["fwd"]
      gpu_bwd = (launches["dq"], launches["dkv"])
    lists = None
    if block_mask is not None:
      # The lists index the mask's blocks: every kernel tiles with them (launch parameters stay).
      bq, bk = _traced_blocks(config, spec, block_mask)
      gpu_bwd = tuple((bq, bk) + launch[2:] for launch in gpu_bwd)
      lists = (block_mask.kv_indices, block_mask.kv_kinds, block_mask.kv_counts, block_mask.q_offsets,
               block_mask.q_indices, block_mask.q_kinds)
    st = _Static(platform, spec, bq, bk, bool(interpret), warps, stages, config.record_visits, gpu_bwd)
    if block_mask is None:
      dispatch.note("block_mask", st.block_mask)
    else:
      dispatch.note("traced_block_mask", block_mask)
    if config.sharding is not None:
      if block_mask is not None:
        raise NotImplementedError("a traced block_mask under config.sharding (its lists are not sharded yet)")
      return _sharded(st, config.sharding, q, k, v, sinks, q_segment_ids, kv_segment_ids)
    return _flash(st, q, k, v, sinks, q_segment_ids, kv_segment_ids, jnp.zeros((1,), jnp.int32), lists)
  return attention


attention_tpu = _attention("tpu", PallasTpuConfig)
attention_gpu = _attention("gpu", PallasGpuConfig)
