"""Orbax checkpoints that a preemptible run can trust.

:class:`Checkpointer` wraps ``orbax.checkpoint.CheckpointManager``:

* saves are asynchronous (the train loop goes on while arrays are written) and periodic, and
  only the last ``keep`` checkpoints are kept;
* a checkpoint holds two items: ``state`` (a pytree of arrays: parameters, optimizer state, RNG
  key; sharded arrays are written and read per shard) and ``meta`` (JSON: step, data position,
  a checksum of the state, anything else the trainer adds);
* Orbax writes a checkpoint into a temporary directory and renames it when complete, so a save
  cut short by SIGKILL leaves no step directory; :meth:`Checkpointer.restore_latest` also
  *verifies* what it restores (every item present, the step recorded in ``meta`` equal to the
  directory's, the state's checksum equal to the one computed at save time) and, when a step
  fails, moves it aside to ``<directory>.corrupt/`` and falls back to the previous one.

The checksum is the sum, modulo 2^32, of every array's elements reinterpreted as unsigned
integers: integer addition is exact and order-independent, so it is the same however the
arrays are sharded, and any single flipped bit changes it.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath


class CorruptCheckpointError(RuntimeError):
  """A checkpoint directory that cannot be restored or fails verification."""


class IncompatibleCheckpointError(RuntimeError):
  """An intact checkpoint of a different state (another model, mixer or optimizer): it is left in
  place, not moved aside, and the run stops rather than start over."""


def _key_name(key) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes(tree) -> dict:
  """``{path: shape}`` with paths as tuples of names, the same for a live state (nnx variables,
  optax tuples) and for the metadata Orbax saved of it (nested dicts)."""
  return {tuple(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def structure_difference(saved, expected, limit: int = 6) -> str | None:
  """What differs between a saved state's structure and the one expected, or None."""
  a, b = _shapes(saved), _shapes(expected)
  show = lambda paths: ", ".join("/".join(p) for p in sorted(paths)[:limit]) + (" ..." if len(paths) > limit else "")
  parts = []
  missing, unexpected = set(b) - set(a), set(a) - set(b)
  if missing:
    parts.append(f"{len(missing)} array(s) the model has but the checkpoint lacks ({show(missing)})")
  if unexpected:
    parts.append(f"{len(unexpected)} array(s) the checkpoint has but the model lacks ({show(unexpected)})")
  reshaped = [p for p in set(a) & set(b) if a[p] != b[p]]
  if reshaped:
    parts.append("different shapes: " + ", ".join(f"{'/'.join(p)} {a[p]} vs {b[p]}" for p in sorted(reshaped)[:limit]))
  return "; ".join(parts) or None


def _as_uint32(x):
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = x.dtype.itemsize * 8
  if bits == 64:
    # Only reachable with jax_enable_x64; fold both halves.
    u = jax.lax.bitcast_convert_type(x, jnp.uint64)
    return (u & 0xFFFFFFFF).astype(jnp.uint32) + (u >> 32).astype(jnp.uint32)
  unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _checksum(tree):
  total = jnp.uint32(0)
  for leaf in jax.tree.leaves(tree):
    total = total + jnp.sum(_as_uint32(leaf), dtype=jnp.uint32)
  return total


def checksum(tree) -> int:
  """The order-independent uint32 checksum of a pytree of arrays (see the module docstring)."""
  return int(jax.device_get(_checksum(tree)))


def abstract_like(tree):
  """``ShapeDtypeStruct``s (with shardings) of ``tree``: the restore target of a state."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                      tree)


class Checkpointer:
  """Periodic asynchronous checkpoints in ``directory``, keeping the last ``keep``.

  Args:
    directory: where step directories (``<directory>/<step>``) live.
    every: save when ``step % every == 0`` (:meth:`save` with ``force=True`` saves anyway).
    keep: how many recent checkpoints to keep.
    async_save: write in a background thread.
  """

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    if every < 1 or keep < 1:
      raise ValueError(f"checkpoint every and keep must be >= 1, got every={every}, keep={keep}")
    self.directory = str(directory) if "://" in str(directory) else os.path.abspath(directory)
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=async_save,
        create=True, cleanup_tmp_directories=True)
    # Handlers given up front (not inferred at the first save) let a fresh manager read the
    # metadata of existing checkpoints, which check_compatible compares before restoring.
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self.every == 0

  def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
    """Starts saving ``state`` and ``meta`` (plus ``step`` and the checksum) at ``step``."""
    meta = dict(meta, step=int(step), checksum=checksum(state))
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self.manager.wait_until_finished()

  def check_compatible(self, step: int, abstract_state) -> None:
    """Raises :class:`IncompatibleCheckpointError` if checkpoint ``step`` holds arrays of another
    structure than ``abstract_state`` (unreadable metadata is left to :meth:`restore`)."""
    try:
      saved = self.manager.item_metadata(step)["state"]
    except Exception:  # Damaged metadata: restore() reports and quarantines it.
      return
    if saved is None:
      return
    diff = structure_difference(saved, abstract_state)
    if diff:
      raise IncompatibleCheckpointError(
          f"checkpoint {step} in {self.directory} was written for another model or optimizer: {diff}. "
          "Resume with the configuration that wrote it, or use another --workdir")

  def restore(self, step: int, abstract_state):
    """``(state, meta)`` of ``step``, verified; raises :class:`CorruptCheckpointError`."""
    self.check_compatible(step, abstract_state)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax and TensorStore raise many types for damaged files.
      raise CorruptCheckpointError(f"checkpoint {step} cannot be read: {type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:300]}") from e
    meta = restored.meta
    if not isinstance(meta, dict) or meta.get("step") != step:
      raise CorruptCheckpointError(f"checkpoint {step}: meta records step "
                                   f"{meta.get('step') if isinstance(meta, dict) else meta!r}")
    found = checksum(restored.state)
    if found != meta.get("checksum"):
      raise CorruptCheckpointError(f"checkpoint {step}: state checksum {found} differs from the "
                                   f"{meta.get('checksum')} recorded when it was saved")
    return restored.state, meta

  def restore_latest(self, abstract_state, log=None):
    """Restores the newest checkpoint that verifies, moving damaged newer ones aside.

    Returns ``(state, meta)``, or ``None`` when no usable checkpoint exists. Raises
    :class:`IncompatibleCheckpointError` (moving nothing) when the newest intact checkpoint holds
    another state structure.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    for step in reversed(self.all_steps()):
      try:
        return self.restore(step, abstract_state)
      except CorruptCheckpointError as e:
        log(f"WARNING: {e}; moving it aside and trying the previous checkpoint")
        self._quarantine(step)
    return None

  def _quarantine(self, step: int) -> None:
    path = epath.Path(self.directory) / str(step)
    if jax.process_index() == 0 and path.exists():
      target = epath.Path(self.directory + ".corrupt") / f"{step}-{int(time.time())}"
      target.parent.mkdir(parents=True, exist_ok=True)
      path.rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"attn_jax_quarantine_{step}")
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

