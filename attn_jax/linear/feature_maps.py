"""Feature maps ``phi`` of linear attention, applied to queries and keys along the last axis.

Each map takes ``[..., D]`` and returns ``[..., F]``; it is computed in float32 and returned in
the input dtype.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp


def identity(x):
  """``phi(x) = x`` (Lightning attention, RetNet, GLA)."""
  return x


def elu_plus_one(x):
  """``phi(x) = elu(x) + 1`` (Katharopoulos et al., "Transformers are RNNs"); always positive."""
  return (jax.nn.elu(x.astype(jnp.float32)) + 1.0).astype(x.dtype)


def relu(x):
  """``phi(x) = max(x, 0)``."""
  return jax.nn.relu(x)


def taylor(x):
  """Based's second-order Taylor map: ``[1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]``.

  ``phi(q) . phi(k) = 1 + s + s^2 / 2`` with ``s = q . k / sqrt(d)``: the second-order Taylor
  expansion of ``exp(s)``, which is positive for every ``s``, so normalised attention never
  divides by zero. ``[..., d] -> [..., 1 + d + d^2]`` (273 features for ``d = 16``).
  """
  d = x.shape[-1]
  xf = x.astype(jnp.float32)
  ones = jnp.ones(xf.shape[:-1] + (1,), jnp.float32)
  first = xf / d ** 0.25
  second = (xf[..., :, None] * xf[..., None, :]).reshape(xf.shape[:-1] + (d * d,))
  second = second / (math.sqrt(2.0) * math.sqrt(d))
  return jnp.concatenate([ones, first, second], axis=-1).astype(x.dtype)


NAMED: dict[str, Callable] = {
    "identity": identity,
    "elu_plus_one": elu_plus_one,
    "elu+1": elu_plus_one,
    "relu": relu,
    "taylor": taylor,
}


def is_named(feature_map) -> bool:
  """True for None and the names of :data:`NAMED`: maps the library owns (pure, hashable)."""
  return feature_map is None or (isinstance(feature_map, str) and feature_map in NAMED)


def num_features(feature_map, d: int) -> int:
  """Output size ``F`` of a named map (see :func:`is_named`) for inputs of size ``d``."""
  return 1 + d + d * d if resolve(feature_map) is taylor else d


def resolve(feature_map) -> Callable:
  """``None`` / a name in :data:`NAMED` / a callable -> the callable."""
  if feature_map is None:
    return identity
  if isinstance(feature_map, str):
    if feature_map not in NAMED:
      raise ValueError(f"feature_map must be one of {sorted(NAMED)} or a callable, got {feature_map!r}")
    return NAMED[feature_map]
  if callable(feature_map):
    return feature_map
  raise ValueError(f"feature_map must be None, a name in {sorted(NAMED)} or a callable, "
                   f"got {type(feature_map).__name__}")
