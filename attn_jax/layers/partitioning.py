"""Logical partition specs of nnx state (parameters, optimizer state) for :mod:`attn_jax.sharding`.

Parameters carry their logical axis names as ``nnx.Param`` metadata (``logical_axes``). An
optimizer state built by optax over an ``nnx.State`` keeps those ``Param`` nodes (Adam's moments
are parameter-shaped), so one traversal serves both; leaves outside a variable (a step count)
are replicated.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from attn_jax import sharding


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _variable_spec(v):
  axes = v.get_metadata().get("logical_axes") if hasattr(v, "get_metadata") else getattr(v, "logical_axes", None)
  if axes is None:
    return v.replace(PartitionSpec())
  return v.replace(PartitionSpec(*axes))


def logical_specs(tree):
  """The same pytree with each variable's value replaced by its logical ``PartitionSpec``."""
  return jax.tree.map(lambda x: _variable_spec(x) if _is_variable(x) else PartitionSpec(), tree,
                      is_leaf=_is_variable)


def named_shardings(tree, mesh, rules=None):
  """``NamedSharding`` for every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s) on ``mesh``."""
  rules = rules or sharding.default_rules()
  return sharding.named_shardings(logical_specs(tree), mesh, rules, shapes=tree)
