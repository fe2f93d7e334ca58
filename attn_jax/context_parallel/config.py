"""``ContextParallel``: which mesh axis splits the sequence, and how attention crosses the split.

Also the pieces every family shares: the token layout of a shard (contiguous, or zig-zag for
causal load balancing), the exchange between the natural and the zig-zag layout inside
``shard_map``, the partition specs, and the setting that model layers derive from the active
logical-axis rules.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from attn_jax import dispatch
from attn_jax import sharding as sharding_lib

STRATEGIES = ("ring", "all_gather")
LOAD_BALANCE = ("auto", "zigzag", "contiguous")


def _axes_tuple(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  if isinstance(axes, str):
    return (axes,)
  return tuple(axes)


@dataclasses.dataclass(frozen=True)
class ContextParallel:
  """Context parallelism: the sequence axis of q, k, v sharded over one mesh axis.

  The arrays passed to the primitives stay global ``[B, T, H, D]`` arrays in natural token
  order; inside, each device holds ``T / n`` tokens of the sequence (``n`` the size of
  ``axis_name``) and the collectives of the chosen strategy move K/V (or linear-attention
  states, or neighborhood halos) between devices.

  Attributes:
    mesh: the device mesh.
    axis_name: the mesh axis that splits the sequence (``"sequence"`` in
      :func:`attn_jax.sharding.default_rules`).
    strategy: how softmax attention reaches the keys of other shards.

      * ``"ring"`` (default): K/V blocks travel around the ring with ``ppermute`` while each
        device computes on the block it holds; partial results are merged by their
        log-sum-exp. Memory per device stays ``O(T / n)``; steps whose tiles are empty for
        every device are not run at all (a sliding window needs one or two steps).
      * ``"all_gather"``: K/V of the whole sequence are gathered on every device, then one
        attention call per local query piece. Fewer, larger collectives; best when K/V are
        small (short contexts, GQA / MQA with few K/V heads). Memory ``O(T)`` for K/V.

      Linear attention passes states and neighborhood attention exchanges halos whatever the
      strategy.
    load_balance: token order of the shards for softmax attention.

      * ``"auto"`` (default): zig-zag when it lowers the largest per-device work by more than
        10% (causal-type masks), else contiguous;
      * ``"zigzag"``: device ``i`` holds chunks ``i`` and ``2n - 1 - i`` of ``2n`` chunks, so
        under a causal mask every device does the same work;
      * ``"contiguous"``: device ``i`` holds chunk ``i`` of ``n``.

      The permutation is internal: callers pass and receive natural order.
    batch_axes, head_axes: mesh axes that split the batch and the heads inside the same
      ``shard_map`` (e.g. ``("data", "fsdp")`` and ``"tensor"``); None keeps that dimension
      whole on every device.
  """

  mesh: Mesh
  axis_name: str = "sequence"
  strategy: str = "ring"
  load_balance: str = "auto"
  batch_axes: str | tuple[str, ...] | None = None
  head_axes: str | tuple[str, ...] | None = None

  def __post_init__(self):
    if not isinstance(self.mesh, Mesh):
      raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}")
    names = tuple(self.mesh.axis_names)
    if not isinstance(self.axis_name, str) or self.axis_name not in names:
      raise ValueError(f"axis_name {self.axis_name!r} is not an axis of the mesh, whose axes are "
                       f"{dict(self.mesh.shape)}")
    if self.strategy not in STRATEGIES:
      raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
    if self.load_balance not in LOAD_BALANCE:
      raise ValueError(f"load_balance must be one of {LOAD_BALANCE}, got {self.load_balance!r}")
    used = {self.axis_name}
    for field in ("batch_axes", "head_axes"):
      axes = _axes_tuple(getattr(self, field))
      for a in axes:
        if not isinstance(a, str) or a not in names:
          raise ValueError(f"{field} names {a!r}, which is not an axis of the mesh {dict(self.mesh.shape)}")
        if a in used:
          raise ValueError(f"{field} uses mesh axis {a!r} twice or together with axis_name "
                           f"{self.axis_name!r}")
        used.add(a)
      # Normalised to a tuple so that equal settings hash equally.
      object.__setattr__(self, field, axes)

  @property
  def size(self) -> int:
    """Devices along the sequence axis."""
    return int(self.mesh.shape[self.axis_name])

  @property
  def batch_shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.batch_axes)

  @property
  def head_shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.head_axes)

  def spec(self, *dims: str | None) -> PartitionSpec:
    """PartitionSpec from dimension roles: ``"batch"``, ``"seq"``, ``"heads"`` or None."""
    table = {"batch": self.batch_axes or None, "seq": self.axis_name, "heads": self.head_axes or None,
             None: None}
    return PartitionSpec(*(table[d] for d in dims))

  def head_index(self):
    """This device's index along the head axes (0 without head sharding); inside shard_map."""
    if not self.head_axes:
      return jnp.int32(0)
    return lax.axis_index(self.head_axes)

  def shard_map(self, fn, in_specs, out_specs, args):
    """``jax.shard_map(fn)`` over ``mesh`` with ``args`` placed as ``in_specs`` say (None kept)."""
    return sharding_lib.shard_map_optional(fn, self.mesh, in_specs, out_specs, args, place=True)


def check_length(cp: ContextParallel, name: str, length: int, pieces: int, block: int | None = None,
                 block_name: str = "block"):
  """ValueError unless ``length`` splits into ``cp.size * pieces`` chunks of whole blocks."""
  need = cp.size * pieces * (block or 1)
  if length % need:
    parts = f"size {cp.size} of mesh axis {cp.axis_name!r}"
    if pieces > 1:
      parts += f" times {pieces} zig-zag pieces"
    if block:
      parts += f" times {block_name} {block}"
    raise ValueError(f"{name} {length} must be divisible by the {parts} (= {need})")


def check_divides(cp: ContextParallel, what: str, size: int, axes: tuple[str, ...], shards: int):
  if axes and size % shards:
    raise ValueError(f"{what} {size} is not divisible by the {shards} shards of mesh axes {axes}")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which chunks of a sequence each device holds.

  The sequence of ``length`` tokens is cut into ``devices * pieces`` chunks of ``chunk``
  tokens. With one piece, device ``i`` holds chunk ``i``; with two (zig-zag), chunks ``i`` and
  ``2 * devices - 1 - i``, in that order, so that a device holding an early (cheap, under a
  causal mask) chunk also holds a late (expensive) one.
  """

  length: int
  devices: int
  pieces: int

  @property
  def chunk(self) -> int:
    return self.length // (self.devices * self.pieces)

  @property
  def num_chunks(self) -> int:
    return self.devices * self.pieces

  def chunks(self, device: int) -> tuple[int, ...]:
    if self.pieces == 1:
      return (device,)
    return (device, 2 * self.devices - 1 - device)

  def gathered_order(self) -> np.ndarray:
    """Natural chunk index of each chunk of an ``all_gather`` over the devices, in gather order."""
    return np.asarray([c for d in range(self.devices) for c in self.chunks(d)])


def _zigzag_owner(chunk: int, n: int) -> int:
  return chunk if chunk < n else 2 * n - 1 - chunk


def to_internal(x, layout: Layout, axis_name: str, axis: int = 1):
  """Inside shard_map: the natural local shard (chunks ``2i, 2i + 1``) -> zig-zag (``i, 2n-1-i``).

  Two ``ppermute``s, each a bijection of the devices: every device sends its first chunk by one
  and its second by the other. Identity for a contiguous layout.
  """
  if layout.pieces == 1 or layout.devices == 1:
    return x
  n, c = layout.devices, x.shape[axis] // 2
  first, second = lax.split(x, (c, c), axis=axis)
  perm_a = [(i, _zigzag_owner(2 * i, n)) for i in range(n)]
  perm_b = [(i, _zigzag_owner(2 * i + 1, n)) for i in range(n)]
  got_a = lax.ppermute(first, axis_name, perm_a)
  got_b = lax.ppermute(second, axis_name, perm_b)
  # Device d receives chunk d and chunk 2n-1-d; the even one of the two came through perm_a.
  even = lax.axis_index(axis_name) % 2 == 0
  slot0 = jnp.where(even, got_a, got_b)
  slot1 = jnp.where(even, got_b, got_a)
  return jnp.concatenate([slot0, slot1], axis=axis)


def to_natural(x, layout: Layout, axis_name: str, axis: int = 1):
  """Inverse of :func:`to_internal`."""
  if layout.pieces == 1 or layout.devices == 1:
    return x
  n, c = layout.devices, x.shape[axis] // 2
  slot0, slot1 = lax.split(x, (c, c), axis=axis)
  even = lax.axis_index(axis_name) % 2 == 0
  back_a = jnp.where(even, slot0, slot1)
  back_b = jnp.where(even, slot1, slot0)
  first = lax.ppermute(back_a, axis_name, [(_zigzag_owner(2 * i, n), i) for i in range(n)])
  second = lax.ppermute(back_b, axis_name, [(_zigzag_owner(2 * i + 1, n), i) for i in range(n)])
  return jnp.concatenate([first, second], axis=axis)


def ring_shift(x, axis_name: str, devices: int, shift: int = 1):
  """``ppermute`` that sends device ``i``'s value to device ``(i + shift) mod devices``."""
  shift %= devices
  if shift == 0:
    return x
  return lax.ppermute(x, axis_name, [(i, (i + shift) % devices) for i in range(devices)])


def kernels_synchronise(implementation, config) -> bool:
  """Whether the attention kernels run in Pallas TPU interpret mode.

  That interpreter simulates every device of the enclosing mesh together and meets all of them
  at a barrier in each kernel, so inside ``shard_map`` every device must run the same kernels in
  the same order; a per-device ``lax.switch`` would deadlock. Real TPU kernels have no such
  barrier.
  """
  name = implementation or getattr(config, "backend", None)
  if name != "pallas_tpu":
    return False
  interpret = getattr(config, "interpret", None)
  return bool(interpret) or (interpret is None and dispatch.current_platform() != "tpu")


def switch(index, branches, *operands, run_all: bool = False):
  """``lax.switch(index, branches, *operands)``; with ``run_all`` every branch runs and the
  result of ``index`` is selected (for :func:`kernels_synchronise`: testing only, it does the
  work of every branch)."""
  if len(branches) == 1:
    return branches[0](*operands)
  if not run_all:
    return lax.switch(index, branches, *operands)
  results = [b(*operands) for b in branches]
  return jax.tree.map(lambda *xs: lax.select_n(index, *xs), *results)


def from_active_rules(*lengths: int, num_heads: int | None = None, num_kv_heads: int | None = None,
                      batch: int | None = None) -> ContextParallel | None:
  """The ContextParallel setting of the active :func:`attn_jax.sharding.use_rules`, or None.

  For model layers: context parallelism applies when the rules map the logical ``seq`` axis to
  a mesh axis of size > 1 and every length in ``lengths`` splits over it (a decoding step of one
  token does not, and runs unsharded). The strategy comes from the rules'
  ``context_parallel`` field; batch and heads are split as the ``batch`` and ``act_heads`` /
  ``act_kv_heads`` rules say, when the sizes divide.
  """
  active = sharding_lib.current()
  if active is None:
    return None
  mesh, rules = active
  seq_axes = [a for a in rules.mesh_axes("seq") if mesh.shape.get(a, 1) > 1]
  if not seq_axes:
    return None
  if len(seq_axes) > 1:
    raise ValueError(f"context parallelism splits the sequence over one mesh axis, but the rules map "
                     f"'seq' to {seq_axes}")
  axis = seq_axes[0]
  if any(n % mesh.shape[axis] for n in lengths):
    return None

  def axes(logical, size, exclude=()):
    found = tuple(a for a in rules.mesh_axes(logical) if mesh.shape.get(a, 1) > 1 and a != axis
                  and a not in exclude)
    if not found or (size is not None and size % math.prod(mesh.shape[a] for a in found)):
      return ()
    return found

  batch_axes = axes("batch", batch)
  head_axes = axes("act_heads", num_heads, batch_axes)
  if num_kv_heads is not None and axes("act_kv_heads", num_kv_heads, batch_axes) != head_axes:
    head_axes = ()
  strategy = getattr(rules, "context_parallel", "ring")
  return ContextParallel(mesh, axis, strategy, batch_axes=batch_axes or None, head_axes=head_axes or None)
