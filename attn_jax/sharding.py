"""Device meshes, logical-axis rules and multi-process start-up.

Model code names the axes of its parameters and activations with *logical* names ("embed",
"heads", "batch", ...) and never with mesh axes. A :class:`AxisRules` maps each logical name to
zero or more mesh axes of the four-axis mesh ``("data", "fsdp", "sequence", "tensor")``:

* ``data``: pure data parallelism (batch split, parameters replicated);
* ``fsdp``: batch split and parameters sharded (ZeRO-3 / fully-sharded data parallelism);
* ``sequence``: the sequence axis of activations split (long contexts);
* ``tensor``: heads, MLP hidden units and the vocabulary split (Megatron-style).

The rules are data, so one model runs unchanged on one CPU, a GPU node or a TPU pod: only the
mesh shape and the rules change. Parameters, optimizer state and inputs are placed through
``jax.jit`` in/out shardings built by :func:`named_shardings`; activations are constrained inside
the model by :func:`constrain`, which is a no-op unless :func:`use_rules` is active while the
function is traced.

Pallas kernels cannot be partitioned by XLA: :func:`shard_map_attention` wraps an attention call
in ``jax.shard_map`` over batch and heads under the active rules, and :func:`current` exposes the
active mesh and rules to kernel adapters that wrap themselves.

This module imports jax and numpy only (no flax), so it belongs to the primitives' layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
import os
import typing
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "MESH_AXES",
    "AxisRules",
    "default_rules",
    "make_mesh",
    "logical_to_spec",
    "named_sharding",
    "named_shardings",
    "use_rules",
    "current",
    "local_arrays",
    "constrain",
    "shard_map_attention",
    "shard_map_optional",
    "detect_cluster",
    "initialize_distributed",
]

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

_log = logging.getLogger(__name__)

MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class AxisRules:
  """Mapping from logical axis names to mesh axes.

  Attributes:
    rules: ``(logical_name, mesh_axes)`` pairs; ``mesh_axes`` is a mesh axis name, a tuple of
      them (the dimension is split over their product), or None (replicated). A logical name
      missing from the rules is replicated.
    context_parallel: how attention layers reach the keys of other sequence shards when ``seq``
      is split over a mesh axis of size > 1: ``"ring"`` or ``"all_gather"`` (see
      :class:`attn_jax.ContextParallel`).
  """

  rules: tuple[tuple[str, MeshAxes], ...]
  context_parallel: str = "ring"

  def __post_init__(self):
    seen = set()
    for pair in self.rules:
      if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
        raise ValueError(f"rules must be (logical_name, mesh_axes) pairs, got {pair!r}")
      name, axes = pair
      if name in seen:
        raise ValueError(f"rules name the logical axis {name!r} twice")
      seen.add(name)
      for a in _as_tuple(axes):
        if not isinstance(a, str):
          raise ValueError(f"mesh axes of {name!r} must be strings or None, got {axes!r}")
    if self.context_parallel not in ("ring", "all_gather"):
      raise ValueError(f"context_parallel must be 'ring' or 'all_gather', got {self.context_parallel!r}")

  def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
    if logical is None:
      return ()
    return _as_tuple(dict(self.rules).get(logical))

  def replace(self, **overrides: MeshAxes) -> "AxisRules":
    """A copy with some logical names remapped, e.g. ``rules.replace(seq="sequence")``."""
    table = dict(self.rules)
    table.update(overrides)
    return AxisRules(tuple(table.items()), self.context_parallel)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  if isinstance(axes, str):
    return (axes,)
  return tuple(axes)



class KernelShards(typing.NamedTuple):
  """How a Pallas kernel call is split by :func:`kernel_shards` (batch and heads only)."""

  mesh: Mesh
  batch: Any  # the PartitionSpec entry of the batch dim (mesh axis name(s) or None)
  heads: Any  # the PartitionSpec entry of the head dim
  head_axes: tuple[str, ...]
  num_batch: int  # shards along the batch dim
  num_heads: int  # shards along the head dim


def kernel_shards(sharding, batch_size: int, what: str) -> KernelShards:
  """Validates the NamedSharding ``sharding`` of ``q [B, T, H, D]`` for a Pallas kernel call.

  XLA cannot partition a Pallas call, so the kernels run under ``shard_map`` over the batch and
  head mesh axes; sequence or feature sharding is refused (``what`` names the kernels in the
  error). Raises ValueError for a non-NamedSharding, a spec of the wrong rank or a batch that
  does not divide.
  """
  if not isinstance(sharding, NamedSharding):
    raise ValueError(f"sharding must be a jax.sharding.NamedSharding of q, got {type(sharding).__name__}")
  spec = tuple(sharding.spec) + (None,) * (4 - len(sharding.spec))
  if len(spec) != 4:
    raise ValueError(f"sharding.spec must describe q's 4 dims [B, T, H, D], got {sharding.spec}")
  if spec[1] is not None or spec[3] is not None:
    raise NotImplementedError(f"sequence or feature sharding of q ({sharding.spec}) is not supported: the "
                              f"{what} shard batch and heads only")
  mesh = sharding.mesh
  batch_axes, head_axes = _as_tuple(spec[0]), _as_tuple(spec[2])
  n_batch = math.prod(mesh.shape[a] for a in batch_axes)
  n_head = math.prod(mesh.shape[a] for a in head_axes)
  if batch_size % n_batch:
    raise ValueError(f"batch {batch_size} is not divisible by the {n_batch} shards of mesh axes {batch_axes}")
  return KernelShards(mesh, spec[0], spec[2], head_axes, n_batch, n_head)


def place_for_shard_map(x, mesh: Mesh, spec: PartitionSpec):
  """Puts ``x`` in the layout ``shard_map`` expects.

  With Explicit mesh axes (the default of ``jax.make_mesh`` in recent JAX) shard_map requires
  its inputs to carry exactly ``in_specs``, so they are resharded; with Auto axes a sharding
  constraint lets XLA insert the collectives.
  """
  target = NamedSharding(mesh, spec)
  if getattr(mesh, "explicit_axes", ()):
    return jax.sharding.reshard(x, target)
  return jax.lax.with_sharding_constraint(x, target)

def default_rules() -> AxisRules:
  """The standard data x fsdp x sequence x tensor layout.

  Parameters: ``embed`` over fsdp; ``heads``, ``kv_heads``, ``mlp``, ``vocab`` over tensor.
  Activations (``act_*`` names and ``batch`` / ``seq``): batch over data and fsdp, sequence over
  sequence, heads / MLP units / vocabulary logits over tensor, the model dimension replicated.
  """
  return AxisRules((
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("mlp", "tensor"),
      ("vocab", "tensor"),
      ("head_dim", None),
      ("batch", ("data", "fsdp")),
      ("seq", "sequence"),
      ("act_embed", None),
      ("act_heads", "tensor"),
      ("act_kv_heads", "tensor"),
      ("act_mlp", "tensor"),
      ("act_vocab", "tensor"),
  ))


def make_mesh(data: int = 1, fsdp: int = 1, sequence: int = 1, tensor: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with axes ``("data", "fsdp", "sequence", "tensor")`` over all (global) devices.

  One size may be -1: it takes whatever the others leave of the device count. The axes are
  ``Auto`` (XLA/Shardy propagates shardings between the constraints we give it), which is what
  ``jax.jit`` with in/out shardings expects; jax >= 0.9's ``jax.make_mesh`` would otherwise make
  them ``Explicit``.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "sequence": sequence, "tensor": tensor}
  for name, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f"{name} must be a positive int or -1, got {size!r}")
  free = [n for n, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {free}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not split into axes {sizes}")
    sizes[free[0]] = len(devices) // known
  total = math.prod(sizes.values())
  if total != len(devices):
    raise ValueError(f"mesh axes {sizes} need {total} devices, got {len(devices)}")
  shape = tuple(sizes[a] for a in MESH_AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  except (ValueError, NotImplementedError):
    # make_mesh insists on physical topologies it knows; a plain reshape serves everything else
    # (e.g. a subset of devices).
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_to_spec(logical_axes: Sequence[str | None] | PartitionSpec, rules: AxisRules,
                    mesh: Mesh | None = None, shape: Sequence[int] | None = None) -> PartitionSpec:
  """The mesh ``PartitionSpec`` for an array whose dimensions have these logical names.

  A mesh axis is used at most once per array (the first dimension that asks for it gets it).
  Given ``mesh`` and ``shape``, a dimension whose size is not divisible by the product of its mesh
  axes is replicated instead (logged once), so that odd sizes (a 3-way head split of 4 heads, a
  vocabulary of 1000 over 16 devices) still run rather than fail deep inside XLA.
  """
  logical_axes = tuple(logical_axes)
  if shape is not None and len(shape) != len(logical_axes):
    raise ValueError(f"logical axes {logical_axes} do not match an array of shape {tuple(shape)}")
  used: set[str] = set()
  out = []
  for dim, name in enumerate(logical_axes):
    axes = tuple(a for a in rules.mesh_axes(name) if a not in used)
    if mesh is not None:
      missing = [a for a in axes if a not in mesh.shape]
      if missing:
        raise ValueError(f"rules map {name!r} to mesh axes {missing} absent from the mesh {dict(mesh.shape)}")
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if shape is not None and axes:
        size = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % size:
          _log.info("replicating dimension %d (%r, size %d): not divisible by mesh axes %s (%d)",
                    dim, name, shape[dim], axes, size)
          axes = ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


def named_sharding(mesh: Mesh, rules: AxisRules, logical_axes, shape=None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh, shape))


def named_shardings(logical_tree, mesh: Mesh, rules: AxisRules, shapes=None):
  """Maps a pytree whose leaves are logical ``PartitionSpec``s to ``NamedSharding``s.

  Args:
    logical_tree: pytree with ``PartitionSpec`` leaves naming logical axes (``P()`` for a
      replicated leaf such as an optimizer step count).
    mesh, rules: the mesh and the logical-to-mesh rules.
    shapes: optional pytree of the same structure whose leaves have ``.shape`` (arrays or
      ``jax.ShapeDtypeStruct``s), enabling the divisibility fallback of :func:`logical_to_spec`.
  """
  if shapes is None:
    return jax.tree.map(lambda p: named_sharding(mesh, rules, p), logical_tree)
  return jax.tree.map(lambda p, x: named_sharding(mesh, rules, p, x.shape), logical_tree, shapes)


@dataclasses.dataclass(frozen=True)
class _Active:
  mesh: Mesh
  rules: AxisRules


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("attn_jax_rules", default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: AxisRules | None = None):
  """Activates ``(mesh, rules)`` for :func:`constrain` and :func:`shard_map_attention`.

  Enter it *inside* the function that ``jax.jit`` traces: the constraints are recorded at trace
  time, and jit's cache does not key on this context.
  """
  token = _ACTIVE.set(_Active(mesh, rules or default_rules()))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


@contextlib.contextmanager
def local_arrays():
  """Deactivates the rules inside a ``shard_map`` body, whose arrays are per-device shards.

  Code traced there (attention backends, constraints) then treats its arrays as unsharded, as
  they are: e.g. the cuDNN backend, which refuses a sequence sharded by the active rules, serves
  the per-device calls of context-parallel attention.
  """
  token = _ACTIVE.set(None)
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def current() -> tuple[Mesh, AxisRules] | None:
  """The active ``(mesh, rules)``, or None. Kernel adapters read it to build their shard_map."""
  active = _ACTIVE.get()
  return None if active is None else (active.mesh, active.rules)


def constrain(x, logical_axes: Sequence[str | None]):
  """``with_sharding_constraint`` of an activation by logical names; identity without rules."""
  active = _ACTIVE.get()
  if active is None:
    return x
  spec = logical_to_spec(logical_axes, active.rules, active.mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(active.mesh, spec))


def shard_map_attention(fn: Callable[..., Any], q, k, v, *, sinks=None, q_segment_ids=None,
                        kv_segment_ids=None):
  """Runs ``fn(q, k, v, sinks, q_segment_ids, kv_segment_ids)`` per shard of batch and heads.

  The hook for attention backends that XLA cannot partition (Pallas kernels): under
  :func:`use_rules`, the call is wrapped in ``jax.shard_map`` with batch split as the logical
  ``batch`` axis and heads as ``act_heads`` / ``act_kv_heads``; the sequence and head_dim stay
  whole on every shard (attention needs every key of a row). Without active rules ``fn`` is
  called directly. ``fn`` must treat heads independently (no head-dependent mask: a shard sees
  local head indices).

  Args:
    fn: attention on local shards, returning ``out [B, Tq, Hq, Dv]``.
    q, k, v: ``[B, Tq, Hq, D]``, ``[B, Tk, Hkv, D]``, ``[B, Tk, Hkv, Dv]``.
    sinks: ``[Hq]`` or None; segment ids ``[B, Tq]`` / ``[B, Tk]`` or None.
  """
  active = _ACTIVE.get()
  if active is None:
    return fn(q, k, v, sinks, q_segment_ids, kv_segment_ids)
  mesh, rules = active.mesh, active.rules
  batch = _merged_axes(rules, mesh, "batch", q.shape[0])
  heads = _merged_axes(rules, mesh, "act_heads", q.shape[2], exclude=batch)
  kv_heads = _merged_axes(rules, mesh, "act_kv_heads", k.shape[2], exclude=batch)
  if heads != kv_heads:
    # GQA keeps each query head with its K/V head only when both are split the same way.
    heads = kv_heads = None
  qs, ks = PartitionSpec(batch, None, heads, None), PartitionSpec(batch, None, kv_heads, None)
  seg = PartitionSpec(batch, None)
  args = [q, k, v, sinks, q_segment_ids, kv_segment_ids]
  specs = [qs, ks, ks, PartitionSpec(heads), seg, seg]
  return shard_map_optional(fn, mesh, specs, qs, args)


def shard_map_optional(fn: Callable[..., Any], mesh: Mesh, in_specs, out_specs, args, place: bool = False):
  """``jax.shard_map(fn)(*args)`` where some of ``args`` may be None (passed to ``fn`` as None).

  ``in_specs`` has one entry per argument (a PartitionSpec, or a pytree of them for a pytree
  argument). With ``place``, the arguments are first put in the layout shard_map expects
  (:func:`place_for_shard_map`).
  """
  present = [i for i, a in enumerate(args) if a is not None]

  def local(*xs):
    full = [None] * len(args)
    for i, x in zip(present, xs):
      full[i] = x
    with local_arrays():
      return fn(*full)

  given = [args[i] for i in present]
  if place:
    is_spec = lambda s: isinstance(s, PartitionSpec)
    given = [jax.tree.map(lambda p, x: place_for_shard_map(x, mesh, p), in_specs[i], args[i], is_leaf=is_spec)
             for i in present]
  mapped = jax.shard_map(local, mesh=mesh, in_specs=tuple(in_specs[i] for i in present),
                         out_specs=out_specs, check_vma=False)
  return mapped(*given)


def _merged_axes(rules, mesh, logical, size, exclude=None):
  axes = tuple(a for a in rules.mesh_axes(logical) if mesh.shape.get(a, 1) > 1)
  excluded = set(_as_tuple(exclude))
  axes = tuple(a for a in axes if a not in excluded)
  if not axes or size % math.prod(mesh.shape[a] for a in axes):
    return None
  return axes[0] if len(axes) == 1 else axes


def detect_cluster(env: Mapping[str, str] | None = None) -> str:
  """How this process should join a multi-process run: ``"explicit"``, ``"slurm"``, ``"tpu"``
  or ``"single"``.

  ``explicit`` when ``JAX_COORDINATOR_ADDRESS`` (or ``ATTN_JAX_COORDINATOR``) is set; ``slurm``
  inside a SLURM job step with more than one task; ``tpu`` on a multi-host Cloud TPU slice
  (``TPU_WORKER_HOSTNAMES`` or ``MEGASCALE_COORDINATOR_ADDRESS`` lists other hosts); otherwise
  ``single``.
  """
  env = os.environ if env is None else env
  if env.get("JAX_COORDINATOR_ADDRESS") or env.get("ATTN_JAX_COORDINATOR"):
    return "explicit"
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
    return "slurm"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return "single"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
                           *, env: Mapping[str, str] | None = None, **kwargs) -> str:
  """Starts ``jax.distributed`` when this process is one of several; returns how it was started.

  Explicit arguments (the launcher's coordinator flags) win. Otherwise the environment decides
  (:func:`detect_cluster`): ``ATTN_JAX_COORDINATOR`` / ``ATTN_JAX_NUM_PROCESSES`` /
  ``ATTN_JAX_PROCESS_ID`` (or JAX's own ``JAX_COORDINATOR_ADDRESS`` ...) for hand-written
  launches, SLURM and Cloud TPU pods through JAX's cluster auto-detection, and nothing at all
  for a single process. Must run before any other JAX computation.

  Returns:
    ``"explicit"``, ``"slurm"``, ``"tpu"`` or ``"single"``.
  """
  env = os.environ if env is None else env
  if coordinator_address is None and env.get("ATTN_JAX_COORDINATOR"):
    coordinator_address = env["ATTN_JAX_COORDINATOR"]
    num_processes = num_processes if num_processes is not None else _env_int(env, "ATTN_JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int(env, "ATTN_JAX_PROCESS_ID")
  if coordinator_address is not None:
    if num_processes is None or process_id is None:
      raise ValueError(
          f"coordinator_address={coordinator_address!r} needs num_processes and process_id, got "
          f"num_processes={num_processes!r}, process_id={process_id!r}")
    if not (0 <= process_id < num_processes):
      raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids,
                               **kwargs)
    return "explicit"
  kind = detect_cluster(env)
  if kind == "single":
    return kind
  # JAX's own cluster classes read the coordinator, process count and id from SLURM's variables
  # or from the TPU metadata.
  jax.distributed.initialize(local_device_ids=local_device_ids, **kwargs)
  return kind


def _env_int(env, name):
  value = env.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None
