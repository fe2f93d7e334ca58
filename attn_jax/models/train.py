"""Sharded initialisation and training steps for any model with a ``loss(batch)`` method.

Everything runs as ``jax.jit`` with explicit in/out ``NamedSharding``s derived from the logical
axis names of the parameters (:mod:`attn_jax.layers.partitioning`) and the rules of
:mod:`attn_jax.sharding`:

* parameters are created sharded (``jit`` of the constructor with ``out_shardings``), so no host
  or device ever holds a full replica of a model that does not fit;
* the optimizer state takes the sharding of the parameter each moment belongs to;
* batches are split over the ``batch`` logical axis (data x fsdp), and activations are
  constrained inside the model while the step is traced under :func:`attn_jax.sharding.use_rules`.

The same code runs single-process, multi-process (``jax.distributed``, one global mesh) and
without a mesh (``mesh=None``: plain ``jit``, the unsharded reference of the tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from attn_jax import sharding
from attn_jax.layers import partitioning


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """What :func:`init` returns: the model graph, its state, and the shardings used."""

  graphdef: Any
  params: Any
  opt_state: Any
  param_shardings: Any
  opt_shardings: Any
  mesh: Any
  rules: sharding.AxisRules | None


def _rules_ctx(mesh, rules):
  return sharding.use_rules(mesh, rules) if mesh is not None else contextlib.nullcontext()


def init(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, *, mesh=None,
         rules: sharding.AxisRules | None = None) -> TrainSetup:
  """Builds the model and optimizer state, sharded on ``mesh`` when given.

  Args:
    make_model: ``() -> nnx.Module`` (e.g. ``lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))``); called
      under ``jit`` so parameters are created where they live.
    tx: an optax optimizer.
    mesh, rules: a mesh from :func:`attn_jax.sharding.make_mesh` and logical-axis rules
      (default :func:`attn_jax.sharding.default_rules`); ``mesh=None`` for one device.
  """
  if mesh is not None and rules is None:
    rules = sharding.default_rules()
  graphdef, abstract = nnx.split(nnx.eval_shape(make_model))

  def create():
    params = nnx.split(make_model())[1]
    return params, tx.init(params)

  if mesh is None:
    params, opt_state = jax.jit(create)()
    return TrainSetup(graphdef, params, opt_state, None, None, None, None)
  param_sh = partitioning.named_shardings(abstract, mesh, rules)
  opt_sh = partitioning.named_shardings(jax.eval_shape(tx.init, abstract), mesh, rules)
  params, opt_state = jax.jit(create, out_shardings=(param_sh, opt_sh))()
  return TrainSetup(graphdef, params, opt_state, param_sh, opt_sh, mesh, rules)


def batch_shardings(batch, mesh, rules=None):
  """Splits every array of ``batch`` along its first (``batch``) axis."""
  rules = rules or sharding.default_rules()
  return jax.tree.map(
      lambda x: sharding.named_sharding(mesh, rules, ("batch",) + (None,) * (np.ndim(x) - 1), np.shape(x)),
      batch)


def put_batch(batch, mesh, rules=None):
  """Places a host batch (the same global numpy batch on every process) on the mesh.

  Each process contributes the shards its own devices hold, so this is also the multi-process
  path (every process passes the global batch; only the local slices are transferred).
  """
  shardings = batch_shardings(batch, mesh, rules)
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx, x=x: np.asarray(x)[idx]),
      batch, shardings)


def _example_batch_shardings(example_batch, mesh, rules):
  if example_batch is None:
    raise ValueError("example_batch (a batch with the training shapes) is required with a mesh: "
                     "it fixes the batch's in_shardings")
  return batch_shardings(example_batch, mesh, rules)


def make_train_step(setup: TrainSetup, tx: optax.GradientTransformation, example_batch=None, *,
                    donate: bool = False, return_grads: bool = False):
  """Jitted ``(params, opt_state, batch) -> (params, opt_state, loss[, grads])``.

  With ``donate=True`` the old parameters and optimizer state are donated (updated in place);
  ``return_grads=True`` also returns the gradients (sharded like the parameters).
  """
  graphdef, mesh, rules = setup.graphdef, setup.mesh, setup.rules

  def step(params, opt_state, batch):
    with _rules_ctx(mesh, rules):
      loss, grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p).loss(batch))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    out = (optax.apply_updates(params, updates), opt_state, loss)
    return out + (grads,) if return_grads else out

  donate_argnums = (0, 1) if donate else ()
  if mesh is None:
    return jax.jit(step, donate_argnums=donate_argnums)
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sh = _example_batch_shardings(example_batch, mesh, rules)
  out_sh = (setup.param_shardings, setup.opt_shardings, replicated)
  if return_grads:
    out_sh += (setup.param_shardings,)
  return jax.jit(step, in_shardings=(setup.param_shardings, setup.opt_shardings, batch_sh),
                 out_shardings=out_sh, donate_argnums=donate_argnums)
