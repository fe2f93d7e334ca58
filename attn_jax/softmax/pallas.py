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
import os
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
from attn_jax.softmax import schedule as schedule_lib
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
    block_q, block_kv: tile sizes of the BlockMask (one DMA each); on TPU hardware multiples of
      128 (the lane width). ``None`` picks them from the generation's table (:data:`TPU_BLOCKS`),
      capped by the padded lengths. In interpret mode any multiple of 8 is accepted, so tests
      can use many small tiles.
    block_kv_compute: keys per inner compute sub-block (divides ``block_kv``); bounds the live
      logits of a step. ``None``: the table's, capped by ``block_kv``.
    block_q_compute: query rows per compute sub-block (divides ``block_q``; without stacked
      heads only). Sub-blocks along both axes let a diagonal PARTIAL tile skip its empty quarter.
      ``None``: the table's, capped by ``block_q``.
    stack: query heads of a GQA group stacked into one operand per step (so K/V are fetched once
      per stack); must divide the group size; 1 for head-dependent masks. ``None``: as many as
      keep ``stack * block_q`` within the table's rows per step.
    generation: TPU generation for the default blocks ("v4", "v5e", "v5p", "v6e"); ``None``
      detects it on a TPU; elsewhere (compiling for a TPU topology without one) it reads
      ``$ATTN_JAX_TPU_GENERATION`` (set per target by the compile check), else assumes "v5e".
    vmem_limit_bytes: scoped VMEM limit of the kernels; ``None``: the table's.
    max_schedule_bytes: scalar memory for one band of a step schedule; longer schedules run as
      several kernel calls over bands of query (or key) blocks. ``None``: 256 KiB.
    fused_backward: one backward kernel computes dK, dV and dQ (dQ accumulated in float32 HBM)
      instead of a dQ kernel and a dK/dV kernel; ``None``: the generation's table.
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
  block_kv_compute: int | None = None
  block_q_compute: int | None = None
  stack: int | None = None
  generation: str | None = None
  vmem_limit_bytes: int | None = None
  max_schedule_bytes: int | None = None
  fused_backward: bool | None = None
  interpret: bool | None = None
  sharding: NamedSharding | None = None
  record_visits: Callable[..., None] | None = None

  backend: ClassVar[str] = "pallas_tpu"

  def __post_init__(self):
    for name in ("block_q", "block_kv", "block_kv_compute", "block_q_compute"):
      dispatch.check_config_int("PallasTpuConfig", name, getattr(self, name), "a positive multiple of 8",
                                lambda b: b > 0 and b % 8 == 0)
    for name in ("stack", "vmem_limit_bytes", "max_schedule_bytes"):
      dispatch.check_config_int("PallasTpuConfig", name, getattr(self, name), "a positive int", lambda b: b > 0)
    if self.generation is not None and self.generation not in TPU_BLOCKS:
      raise ValueError(f"PallasTpuConfig.generation must be one of {sorted(TPU_BLOCKS)} or None, "
                       f"got {self.generation!r}")


@dataclasses.dataclass(frozen=True)
class TpuBlockDefaults:
  """Default tiling of one TPU generation: query rows per step (``block_q * stack``), keys per
  step, keys per compute sub-block and the scoped VMEM limit."""

  rows: int
  block_kv: int
  block_kv_compute: int
  vmem_limit_bytes: int
  block_q_compute: int = 512
  fused_backward: bool = True
  # Keys per step when a row of q / K / V exceeds 512 bytes (head dim 256 in float32), or None
  # for block_kv: v4's VMEM cannot double-buffer 1024-key windows of such rows with the rest.
  wide_block_kv: int | None = None


# Why these numbers (static cycle counts of the kernels on each generation, see
# experiments/tpu_static.py and benchmarks/tpu_static/):
# * A step costs a fixed overhead (pipeline bookkeeping, DMA issue; ~0.35 us measured by others
#   on hardware) plus its tile, so steps must carry enough work: 1024 x 1024 tiles (8.6 GFLOP
#   at head dim 128 over the forward's two matmuls... per head) amortise it on every generation.
# * Arithmetic intensity of a forward step is about block_q FLOP per byte of K/V fetched; the
#   chips need ~240 (v5e: 197 TF/s over 819 GB/s), ~230 (v4), ~170 (v5p) and ~570 (v6e), so 1024
#   query rows keep every generation compute-bound.
# * Logits of a compute sub-block live in VMEM/vregs: 1024 x 512 float32 is 2 MiB; larger
#   sub-blocks only add spills. The MXU is 128 wide on v4/v5e/v5p and 256 wide on v6e, so 512
#   is a multiple of both.
# * VMEM: v4 has 32 MiB per core (16 MiB scoped by default), v5e/v6e 128 MiB, v5p 95 MiB. A
#   1024 x 1024 step needs ~10 MiB double-buffered plus the sub-block's logits and
#   probabilities; v4 gets 512-row steps to stay well inside its memory, and 512-key steps for
#   rows wider than 512 bytes (head dim 256 in float32: libtpu caps v4's scoped VMEM at 16 MiB
#   in a deviceless compile, and the tile-reading masks' dK/dV needed 18.8 MiB at 1024 keys).
TPU_BLOCKS = {
    "v4": TpuBlockDefaults(rows=512, block_kv=1024, block_kv_compute=512, vmem_limit_bytes=24 << 20,
                           wide_block_kv=512),
    "v5e": TpuBlockDefaults(rows=1024, block_kv=1024, block_kv_compute=512, vmem_limit_bytes=64 << 20),
    "v5p": TpuBlockDefaults(rows=1024, block_kv=1024, block_kv_compute=512, vmem_limit_bytes=64 << 20),
    "v6e": TpuBlockDefaults(rows=1024, block_kv=1024, block_kv_compute=512, vmem_limit_bytes=64 << 20),
}


# Off a TPU (a deviceless compile for a TPU topology), the generation whose default tiling to use;
# the compile check sets it per target. On a TPU the device's own generation wins.
TPU_GENERATION_ENV = "ATTN_JAX_TPU_GENERATION"


def _tpu_generation(config: PallasTpuConfig) -> str:
  if config.generation is not None:
    return config.generation
  if dispatch.current_platform() != "tpu" and os.environ.get(TPU_GENERATION_ENV):
    name = os.environ[TPU_GENERATION_ENV]
    if name not in TPU_BLOCKS:
      raise ValueError(f"${TPU_GENERATION_ENV} must be one of {sorted(TPU_BLOCKS)}, got {name!r}")
    return name
  if dispatch.current_platform() == "tpu":
    kind = jax.devices()[0].device_kind.lower()
    for name, keys in (("v6e", ("v6",)), ("v5p", ("v5p",)), ("v5e", ("v5 lite", "v5e", "v5lite")),
                       ("v4", ("v4",))):
      if any(k in kind for k in keys):
        return name
  return "v5e"


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
  record: Callable[..., None] | None
  # TPU only.
  tpu_blocks: flash_tpu.Blocks | None = None
  schedule_bytes: int = schedule_lib.DEFAULT_SCHEDULE_BYTES
  # GPU only: launch parameters of the forward kernel (whose blocks are the fields above) and
  # (block_q, block_kv, num_warps, num_stages) of the dQ and dK/dV kernels.
  num_warps: int | None = None
  num_stages: int | None = None
  gpu_bwd: tuple[tuple[int, int, int, int], tuple[int, int, int, int]] | None = None

  @property
  def block_mask(self) -> block_mask_lib.BlockMask:
    s = self.spec
    return block_mask_lib.make_block_mask(s.mask, s.q_len, s.kv_len, self.block_q, self.block_kv,
                                          s.num_q_heads)


def _largest_divisor(n: int, limit: int) -> int:
  return max(d for d in range(1, n + 1) if n % d == 0 and d <= max(1, limit))


def _tpu_blocks(config: PallasTpuConfig, spec: common.Spec, interpret: bool, group: int,
                itemsize: int = 2) -> flash_tpu.Blocks:
  """Tiling of one call; ``group`` is the number of query heads per K/V head (local to a shard),
  ``itemsize`` the bytes per element the kernels load."""
  table = TPU_BLOCKS[_tpu_generation(config)]
  table_kv = table.block_kv
  if table.wide_block_kv is not None and max(spec.head_dim, spec.v_head_dim) * itemsize > 512:
    table_kv = table.wide_block_kv
  if config.block_q is not None:
    bq = config.block_q
  else:
    # Stacked GQA heads share the table's rows per step.
    per_head = table.rows if spec.mask.depends_on_head else max(128, table.rows // group)
    bq = min(per_head, dispatch.round_up(spec.q_len, 128))
  bk = config.block_kv or min(table_kv, dispatch.round_up(spec.kv_len, 128))
  if not interpret and (bq % 128 or bk % 128):
    raise ValueError(f"PallasTpuConfig block sizes must be multiples of 128 on TPU hardware, "
                     f"got block_q={bq}, block_kv={bk}")
  bkc = config.block_kv_compute or min(table.block_kv_compute, bk)
  if bk % bkc or (not interpret and bkc % 128):
    raise ValueError(f"PallasTpuConfig.block_kv_compute must divide block_kv={bk}"
                     f"{' and be a multiple of 128 on TPU hardware' if not interpret else ''}, got {bkc}")
  if config.stack is not None:
    if group % config.stack:
      raise ValueError(f"PallasTpuConfig.stack must divide the {group} query heads per K/V head, "
                       f"got {config.stack}")
    if config.stack > 1 and spec.mask.depends_on_head:
      raise ValueError(f"PallasTpuConfig.stack must be 1 for the head-dependent mask {spec.mask!r}, "
                       f"got {config.stack}")
    stack = config.stack
  elif spec.mask.depends_on_head or config.block_q_compute not in (None, bq):
    # Row chunks are per head: an explicit chunk smaller than the block means no stacking.
    stack = 1
  else:
    stack = _largest_divisor(group, max(table.rows, bq) // bq)
  if stack > 1:
    bqc = bq
    if config.block_q_compute not in (None, bq):
      raise ValueError(f"PallasTpuConfig.block_q_compute must be None or block_q={bq} with {stack} "
                       f"stacked heads, got {config.block_q_compute}")
  else:
    bqc = config.block_q_compute or min(table.block_q_compute, bq)
    if bq % bqc or (not interpret and bqc % 128):
      raise ValueError(f"PallasTpuConfig.block_q_compute must divide block_q={bq}"
                       f"{' and be a multiple of 128 on TPU hardware' if not interpret else ''}, got {bqc}")
  vmem = None if interpret else (config.vmem_limit_bytes or table.vmem_limit_bytes)
  fused = table.fused_backward if config.fused_backward is None else bool(config.fused_backward)
  return flash_tpu.Blocks(bq, bk, bkc, stack, bqc, vmem, fused)


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

    padded = s.kv_len % st.block_kv != 0

    def predicate(q_idx, kv_idx, head):
      visible = s.mask.evaluate(q_idx, kv_idx, head if head_dep else None, ctx, jnp)
      # Key padding exists only in the last block; without it the extra test is wasted work.
      return visible & (kv_idx < s.kv_len) if padded else visible
  return flash_common.MaskSpec(predicate=predicate, use_tiles=use_tiles, per_head=s.mask.depends_on_head,
                               has_full=bm.num_full > 0, has_partial=has_partial)


def _tile_ids(st: _Static, mask: flash_common.MaskSpec):
  """``(tiles, kv_tile_ids, q_tile_ids)`` host arrays; ``(placeholder, None, None)`` without tiles."""
  if not mask.use_tiles:
    return np.zeros((1, 1, 1), np.int8), None, None
  pt = block_mask_lib.partial_tiles(st.block_mask)
  return pt.tiles, pt.kv_tile_ids, pt.q_tile_ids


def _local_map(table: np.ndarray, offset, count: int, uniform: bool):
  """Rows ``[offset, offset + count)`` of a per-unit map (``offset`` may be traced)."""
  if uniform:
    return jnp.zeros((count,), jnp.int32)
  table = jnp.asarray(table, jnp.int32)
  if len(table) == count:
    return table
  return jax.lax.dynamic_slice_in_dim(table, offset, count)


def _tpu_schedules(st: _Static, mask, head_offset, local_q_heads: int, local_kv_heads: int):
  """Row and column step schedules (host-built once per call signature, memoised on the
  BlockMask) as device arrays, with the unit maps cut to this shard's units."""
  bm, blocks = st.block_mask, st.tpu_blocks
  group = local_q_heads // local_kv_heads
  # Partial tiles carry the kinds of their compute sub-blocks (skipped when empty, unmasked when
  # full); tiles with a single sub-block have nothing to carry.
  subs = blocks.sub_grid if mask.has_partial else (1, 1)
  key = ("tpu_steps", blocks.stack, group, st.schedule_bytes, mask.use_tiles, subs)
  if key not in bm._cache:
    _, kv_ids, q_ids = _tile_ids(st, mask)
    hq = st.spec.num_q_heads
    bm._cache[key] = (schedule_lib.row_steps(bm, kv_ids, hq, blocks.stack, st.schedule_bytes, subs),
                      schedule_lib.col_steps(bm, q_ids, hq, group, blocks.stack, st.schedule_bytes, subs))
  rows, cols = bm._cache[key]
  uniform = bm.num_masks == 1
  off = head_offset[0]
  row_map = _local_map(rows.unit_map, off // blocks.stack, local_q_heads // blocks.stack, uniform)
  col_map = _local_map(cols.unit_map, off // group, local_kv_heads, uniform)
  as_steps = lambda sl, m: flash_common.Steps(tuple(jnp.asarray(w) for w in sl.words), m)
  return rows, cols, as_steps(rows, row_map), as_steps(cols, col_map)


def _gpu_schedules(st: _Static, mask, head_offset, local_q_heads: int, which=(False, True)):
  """The BlockMask's row lists (``False`` in ``which``) and / or column lists (``True``), as
  :class:`flash_common.Lists` with the head map cut to this shard's heads."""
  bm = st.block_mask
  _, kv_ids, q_ids = _tile_ids(st, mask)
  out = []
  for transposed in which:
    head_map, *rest = schedule_lib.gpu_lists(bm, q_ids if transposed else kv_ids, transposed)
    head_map = _local_map(head_map, head_offset[0], local_q_heads, bm.num_masks == 1)
    out.append(flash_common.Lists(head_map, *(jnp.asarray(a) for a in rest)))
  return out


def _traced_plan(st: _Static, lists):
  """``(MaskSpec, row Lists, column Lists)`` of a traced BlockMask: its device lists, one row per
  (batch, list head) (see ``flash_gpu._walk`` for their layout)."""
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
  unused = jnp.zeros((1,), jnp.int32)
  # One list row per (batch, list head); the kernels read them through MaskSpec.list_row.
  rows_lists = flash_common.Lists(unused, kv_counts.reshape(rows, nq), kv_indices.reshape(rows, nq, w),
                                  kv_kinds.reshape(rows, nq, w), unused)
  cols_lists = flash_common.Lists(unused, q_offsets.reshape(rows, -1), q_indices.reshape(rows, nq * w),
                                  q_kinds.reshape(rows, nq * w), unused)
  return mask, rows_lists, cols_lists


def _pad_to(x, axis, size, value=0):
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _kernel_kwargs(st: _Static, mask):
  kw = dict(mask=mask, scale=st.spec.scale, soft_cap=st.spec.logits_soft_cap, interpret=st.interpret,
            record=st.record)
  if st.platform == "gpu":
    kw.update(block_q=st.block_q, block_kv=st.block_kv, num_warps=st.num_warps, num_stages=st.num_stages)
  else:
    kw.update(blocks=st.tpu_blocks)
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


def _forward(st: _Static, q, k, v, sinks, q_seg, kv_seg, head_offset, lists):
  mask = _mask_spec(st) if lists is None else _traced_plan(st, lists)[0]
  tq = q.shape[1]
  qp, kp, vp, qs, ks = _padded(st, q, k, v, q_seg, kv_seg)
  sinks32 = None if sinks is None else sinks.astype(jnp.float32)
  tiles = jnp.asarray(_tile_ids(st, mask)[0])
  if st.platform == "tpu":
    rows, _, row_sched, _ = _tpu_schedules(st, mask, head_offset, q.shape[2], k.shape[2])
    o, lse = flash_tpu.flash_fwd(qp, kp, vp, sinks32, qs, ks, head_offset, row_sched, tiles,
                                 layout=rows.layout, capacity=rows.capacity, **_kernel_kwargs(st, mask))
  else:
    if lists is None:
      (row_lists,) = _gpu_schedules(st, mask, head_offset, q.shape[2], (False,))
    else:
      row_lists = _traced_plan(st, lists)[1]
    o, lse = flash_gpu.flash_fwd(qp, kp, vp, sinks32, qs, ks, head_offset, row_lists, tiles,
                                 **_kernel_kwargs(st, mask))
  return o[:, :tq, :, :v.shape[3]], lse[:, :tq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, sinks, q_seg, kv_seg, head_offset, lists):
  return _forward(st, q, k, v, sinks, q_seg, kv_seg, head_offset, lists)


def _flash_fwd(st, q, k, v, sinks, q_seg, kv_seg, head_offset, lists):
  out, lse = _forward(st, q, k, v, sinks, q_seg, kv_seg, head_offset, lists)
  return (out, lse), (q, k, v, sinks, q_seg, kv_seg, head_offset, lists, out, lse)


def _bwd_inputs(st: _Static, q, k, v, q_seg, kv_seg, head_offset, lists, lse, d_out, delta):
  """The backward kernels' inputs padded to the blocks of ``st``: ``(q, k, v, q_seg, kv_seg, lse,
  do, delta)``."""
  del head_offset, lists
  qp, kp, vp, qs, ks = _padded(st, q, k, v, q_seg, kv_seg)
  tq_pad = qp.shape[1]
  _, dv = _head_dims(st)
  # Rows that must contribute nothing get lse = +inf, so p = exp(s - lse) is exactly 0 there:
  # padded rows and rows that saw no key.
  lse_b = _pad_to(jnp.where(jnp.isfinite(lse), lse, jnp.inf), 1, tq_pad, jnp.inf)
  do = _pad_to(_pad_to(d_out, 1, tq_pad), 3, dv).astype(q.dtype)
  delta = _pad_to(delta, 1, tq_pad)
  return qp, kp, vp, qs, ks, lse_b, do, delta


def _gpu_bwd_pass(st: _Static, kernel: str, q, k, v, q_seg, kv_seg, head_offset, lists, lse, d_out,
                  delta):
  """Runs the GPU backward kernel ``kernel`` ("dq" or "dkv") on its own blocks and BlockMask (or
  on the traced BlockMask's ``lists``)."""
  qp, kp, vp, qs, ks, lse_b, do, delta = _bwd_inputs(st, q, k, v, q_seg, kv_seg, head_offset, lists,
                                                     lse, d_out, delta)
  if lists is None:
    mask = _mask_spec(st)
    (lists,) = _gpu_schedules(st, mask, head_offset, q.shape[2], (kernel == "dkv",))
  else:
    mask, rows_lists, cols_lists = _traced_plan(st, lists)
    lists = cols_lists if kernel == "dkv" else rows_lists
  tiles = jnp.asarray(_tile_ids(st, mask)[0])
  fn = flash_gpu.flash_dq if kernel == "dq" else flash_gpu.flash_dkv
  return fn(qp, kp, vp, qs, ks, head_offset, lists, tiles, lse_b, do, delta, **_kernel_kwargs(st, mask))


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
    dq = _gpu_bwd_pass(_gpu_pass(st, "dq"), "dq", *args)
    dk, dv_ = _gpu_bwd_pass(_gpu_pass(st, "dkv"), "dkv", *args)
  else:
    mask = _mask_spec(st)
    qp, kp, vp, qs, ks, lse_b, do, delta_p = _bwd_inputs(st, *args)
    tiles = jnp.asarray(_tile_ids(st, mask)[0])
    rows, cols, row_sched, col_sched = _tpu_schedules(st, mask, head_offset, q.shape[2], k.shape[2])
    dq, dk, dv_ = flash_tpu.flash_bwd(
        qp, kp, vp, qs, ks, head_offset, row_sched, col_sched, tiles, lse_b, do, delta_p,
        row_layout=rows.layout, row_capacity=rows.capacity, col_layout=cols.layout,
        col_capacity=cols.capacity, **_kernel_kwargs(st, mask))
  tq, tk = q.shape[1], k.shape[1]
  dq = dq[:, :tq, :, :q.shape[3]]
  dk = dk[:, :tk, :, :k.shape[3]]
  dv_ = dv_[:, :tk, :, :v.shape[3]]
  return dq, dk, dv_, d_sinks, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@dataclasses.dataclass(frozen=True)
class _ShardLayout:
  shards: sharding_lib.KernelShards
  local_q_heads: int
  local_kv_heads: int
  kv_head_spec: object
  slice_kv: bool


def _shard_layout(sharding: NamedSharding, spec: common.Spec, batch: int) -> _ShardLayout:
  sh = sharding_lib.kernel_shards(sharding, batch, "flash kernels")
  s = spec
  if s.num_q_heads % sh.num_heads:
    raise ValueError(f"q heads {s.num_q_heads} are not divisible by the {sh.num_heads} shards of mesh "
                     f"axes {sh.head_axes}")
  local_q_heads = s.num_q_heads // sh.num_heads
  if s.num_kv_heads % sh.num_heads == 0:
    return _ShardLayout(sh, local_q_heads, s.num_kv_heads // sh.num_heads, sh.heads, False)
  if s.group_size % local_q_heads == 0:
    # Fewer K/V heads than head shards (e.g. MQA): K/V stay replicated over the head axes and each
    # shard slices the one K/V head its query heads share.
    return _ShardLayout(sh, local_q_heads, 1, None, True)
  raise ValueError(f"cannot shard {s.num_q_heads} q heads / {s.num_kv_heads} kv heads over "
                   f"{sh.num_heads} head shards")


def _sharded(st: _Static, lay: _ShardLayout, q, k, v, sinks, q_seg, kv_seg):
  """Runs the kernel under shard_map over the batch and head mesh axes."""
  sh, s = lay.shards, st.spec
  q_spec = PartitionSpec(sh.batch, None, sh.heads, None)
  kv_spec = PartitionSpec(sh.batch, None, lay.kv_head_spec, None)
  seg_spec = PartitionSpec(sh.batch, None)
  sink_spec = PartitionSpec(sh.heads)

  def body(q, k, v, sinks, q_seg, kv_seg):
    shard = jax.lax.axis_index(sh.head_axes) if sh.head_axes else 0
    head_offset = jnp.reshape(shard * lay.local_q_heads, (1,)).astype(jnp.int32)
    if lay.slice_kv:
      kv_head = (shard * lay.local_q_heads) // s.group_size
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
      # The TPU kernels read a host-built packed step schedule; device-built lists are not wired
      # into it yet. Dispatch falls through to the next backend (xla).
      raise NotImplementedError("a traced block_mask is not supported by the Pallas TPU kernel yet; "
                                "use implementation='xla' (or 'pallas_gpu' on a GPU)")
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
    lay = None if config.sharding is None else _shard_layout(config.sharding, spec, q.shape[0])
    if platform == "tpu":
      group = spec.group_size if lay is None else lay.local_q_heads // lay.local_kv_heads
      blocks = _tpu_blocks(config, spec, interpret, group, jnp.dtype(q.dtype).itemsize)
      st = _Static(platform, spec, blocks.block_q, blocks.block_kv, bool(interpret), config.record_visits,
                   tpu_blocks=blocks,
                   schedule_bytes=config.max_schedule_bytes or schedule_lib.DEFAULT_SCHEDULE_BYTES)
    else:
      if max(spec.head_dim, spec.v_head_dim) > 256:
        raise NotImplementedError(f"head dims above 256 (got {spec.head_dim}, {spec.v_head_dim})")
      launches = _gpu_launches(config, spec, jnp.dtype(q.dtype).itemsize)
      bq, bk, warps, stages = launches["fwd"]
      st = _Static(platform, spec, bq, bk, bool(interpret), config.record_visits, num_warps=warps,
                   num_stages=stages, gpu_bwd=(launches["dq"], launches["dkv"]))
    lists = None
    if block_mask is not None:
      # The lists index the mask's blocks: every kernel tiles with them (launch parameters stay).
      bq, bk = _traced_blocks(config, spec, block_mask)
      st = dataclasses.replace(st, block_q=bq, block_kv=bk,
                               gpu_bwd=tuple((bq, bk) + launch[2:] for launch in st.gpu_bwd))
      lists = (block_mask.kv_indices, block_mask.kv_kinds, block_mask.kv_counts, block_mask.q_offsets,
               block_mask.q_indices, block_mask.q_kinds)
    if block_mask is None:
      dispatch.note("block_mask", st.block_mask)
    else:
      dispatch.note("traced_block_mask", block_mask)
    if lay is not None:
      if block_mask is not None:
        raise NotImplementedError("a traced block_mask under config.sharding (its lists are not sharded yet)")
      return _sharded(st, lay, q, k, v, sinks, q_segment_ids, kv_segment_ids)
    return _flash(st, q, k, v, sinks, q_segment_ids, kv_segment_ids, jnp.zeros((1,), jnp.int32), lists)
  return attention


attention_tpu = _attention("tpu", PallasTpuConfig)
attention_gpu = _attention("gpu", PallasGpuConfig)
