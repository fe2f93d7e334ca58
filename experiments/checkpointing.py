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
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

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

  def restore(self, step: int, abstract_state):
    """``(state, meta)`` of ``step``, verified; raises :class:`CorruptCheckpointError`."""
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

    Returns ``(state, meta)``, or ``None`` when no usable checkpoint exists.
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

