"""``attn_jax.neighborhood_attention``: NATTEN's neighborhood attention on the block-sparse engine."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from attn_jax import _jit_cache
from attn_jax import dispatch
from attn_jax.context_parallel import config as cp_config
from attn_jax.context_parallel import neighborhood as cp_neighborhood
from attn_jax.neighborhood import mask as mask_lib
from attn_jax.neighborhood import tiling
from attn_jax.softmax import api as softmax_api
from attn_jax.softmax import pallas
from attn_jax.softmax import xla


def _per_axis(name, value, n, kind):
  """Expands an int/bool to ``n`` axes and checks a per-axis tuple's length and element types."""
  if kind is bool:
    ok = lambda x: isinstance(x, (bool, np.bool_))
    what = "a bool or a tuple of bools"
  else:
    ok = lambda x: isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))
    what = "an int or a tuple of ints"
  if ok(value):
    return (kind(value),) * n
  if isinstance(value, (tuple, list)):
    if len(value) != n:
      raise ValueError(f"{name} must have one entry per spatial axis ({n} for a {n}-D grid), "
                       f"got {value!r}")
    if all(ok(x) for x in value):
      return tuple(kind(x) for x in value)
  raise ValueError(f"{name} must be {what}, got {value!r}")


def check_arguments(spatial_shape, kernel_size, stride, dilation, is_causal):
  """Validates and normalises the per-axis arguments with NATTEN's rules.

  Returns:
    ``(kernel_size, stride, dilation, is_causal)`` as tuples of length ``len(spatial_shape)``.

  Raises:
    ValueError: ``kernel_size < 2``, ``stride < 1``, ``dilation < 1``, ``stride >
      kernel_size`` or ``kernel_size * dilation > spatial size`` on any axis.
  """
  n = len(spatial_shape)
  kernel_size = _per_axis("kernel_size", kernel_size, n, int)
  stride = _per_axis("stride", stride, n, int)
  dilation = _per_axis("dilation", dilation, n, int)
  is_causal = _per_axis("is_causal", is_causal, n, bool)
  if any(k < 2 for k in kernel_size):
    raise ValueError(f"kernel_size must be >= 2 on every axis (NATTEN's rule), got {kernel_size}")
  if any(s < 1 for s in stride):
    raise ValueError(f"stride must be >= 1 on every axis, got {stride}")
  if any(d < 1 for d in dilation):
    raise ValueError(f"dilation must be >= 1 on every axis, got {dilation}")
  if any(s > k for s, k in zip(stride, kernel_size)):
    raise ValueError(f"stride must be <= kernel_size on every axis, got stride={stride}, "
                     f"kernel_size={kernel_size}")
  if any(k * d > length for k, d, length in zip(kernel_size, dilation, spatial_shape)):
    raise ValueError(
        f"kernel_size * dilation must be <= the spatial size on every axis, got "
        f"kernel_size={kernel_size}, dilation={dilation} for spatial shape {tuple(spatial_shape)}")
  return kernel_size, stride, dilation, is_causal


def resolve_backend(implementation: str | None) -> str:
  """The softmax backend that will serve the call (the platform's first when None)."""
  if implementation is not None:
    return implementation
  # cuDNN (first on GPU) serves causal bands only, never a neighborhood mask: the first backend
  # that takes block-sparse masks serves the call.
  order = [n for n in dispatch.platform_order(softmax_api.FAMILY) if n != "cudnn"]
  return order[0] if order else "xla"


# Block sizes each kernel accepts; tiles are chosen among them so that one block is one tile. The
# TPU kernel takes multiples of 128 on the hardware (the lane width) and of 8 in interpret mode.
def _gpu_block_ok(n: int) -> bool:
  return n >= 16 and n & (n - 1) == 0


def tile_volume_rule(name: str, interpret: bool | None = None):
  """Predicate on tile token counts that the backend ``name`` can use as its block size.

  ``interpret`` is the Pallas config's flag (None: interpret unless on the kernel's platform).
  None for backends that take any block size.
  """
  if name == "pallas_gpu":
    return _gpu_block_ok
  if name == "pallas_tpu":
    if dispatch.interpret_mode(interpret, "tpu"):
      return lambda n: n % 8 == 0
    return lambda n: n % 128 == 0
  return None


_CONFIGS = {"xla": xla.XlaConfig, "pallas_tpu": pallas.PallasTpuConfig, "pallas_gpu": pallas.PallasGpuConfig}


def backend_config(name: str, block_size: int, base=None):
  """The softmax backend config whose blocks coincide with the grid tiles.

  ``block_size`` is the tile's token count, so each attention block is one tile of queries
  against one tile of keys; GPU kernels keep their own register-bound blocks. For a kernel that
  cannot take that block size (e.g. a 7x7 tile on a GPU, whose blocks are powers of two) the
  kernel keeps its own block sizes: still exact, but its BlockMask is built element-wise and has
  fewer full blocks. ``base`` is the caller's config of
  that backend (``NeighborhoodConfig.attention_config``): its other fields are kept, and block
  sizes it sets are not overridden. None for the reference backend (or a kernel that keeps its
  default config).
  """
  cls = _CONFIGS.get(name)
  if cls is None:
    return base
  config = base if base is not None else cls()
  if config.block_q is not None or config.block_kv is not None:
    return config
  rule = tile_volume_rule(name, getattr(config, "interpret", None))
  if rule is not None and not rule(block_size):
    return base
  if name == "pallas_gpu":
    # The GPU kernels keep their own blocks: tile-sized blocks (up to 128 x 128) spill registers
    # or exceed an A100's shared memory at large head dims (the compile check). Tiles and blocks
    # are both powers of two, so one divides the other and most blocks are still exact boxes.
    return base
  return dataclasses.replace(config, block_q=block_size, block_kv=block_size)


@dataclasses.dataclass(frozen=True)
class NeighborhoodConfig:
  """Tunables of :func:`neighborhood_attention`.

  Attributes:
    tile_shape: tokens per tile along each axis (per dilation class) for the token permutation;
      the attention block size is ``prod(tile_shape)``. None picks it with
      :func:`attn_jax.neighborhood.tiling.choose_tile_shape`.
    target_tile_size: the largest tile (in tokens) the heuristic considers; tiles below it are
      costed as if they had this size (kernel steps cost about the same below it).
    attention_config: the config of the softmax backend that runs the permuted attention
      (:class:`attn_jax.XlaConfig`, :class:`attn_jax.PallasTpuConfig` or
      :class:`attn_jax.PallasGpuConfig`); it selects that backend, as ``config=`` does for
      :func:`attn_jax.attention`. Its block sizes, when None, become the tile size (when the
      kernel accepts it); its other fields apply as given, e.g.
      ``PallasGpuConfig(interpret=False)`` lowers the real GPU kernel on any machine and
      ``PallasTpuConfig(interpret=True)`` interprets the TPU kernel even on a TPU.
  """

  tile_shape: tuple[int, ...] | None = None
  target_tile_size: int = 128
  attention_config: object | None = None

  def __post_init__(self):
    if self.tile_shape is not None:
      if (not isinstance(self.tile_shape, tuple) or not self.tile_shape
          or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in self.tile_shape)):
        raise ValueError(f"NeighborhoodConfig.tile_shape must be a tuple of positive ints or None, "
                         f"got {self.tile_shape!r}")
    t = self.target_tile_size
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
      raise ValueError(f"NeighborhoodConfig.target_tile_size must be a positive int, got {t!r}")
    a = self.attention_config
    if a is not None and not isinstance(a, tuple(_CONFIGS.values())):
      raise ValueError(f"NeighborhoodConfig.attention_config must be an XlaConfig, PallasTpuConfig or "
                       f"PallasGpuConfig, got {type(a).__name__}")


def _check_array(name, x):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{name} must be an array, got {type(x).__name__}")


def neighborhood_attention(q: jax.Array, k: jax.Array, v: jax.Array, kernel_size: int | Sequence[int],
                           stride: int | Sequence[int] = 1, dilation: int | Sequence[int] = 1,
                           is_causal: bool | Sequence[bool] = False, *, sinks: ArrayLike | None = None,
                           additional_keys: jax.Array | None = None,
                           additional_values: jax.Array | None = None, scale: float | None = None,
                           implementation: str | None = None, return_lse: bool = False,
                           config: NeighborhoodConfig | None = None,
                           context_parallel: cp_config.ContextParallel | None = None,
                           ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Neighborhood attention over a 1-D, 2-D or 3-D token grid, with NATTEN's semantics.

  Each query attends to a window of ``kernel_size`` keys per axis around it (the product over
  axes), plus the optional additional keys. Per axis of length ``L``, window ``w``, stride ``s``,
  dilation ``d``:

  * The window is shifted inward at the borders, never clipped: every query sees exactly ``w``
    keys along the axis (non-causal). ``w == L`` is full attention along the axis.
  * Stride ``s`` groups consecutive queries by ``s``; all queries of a group share the window
    of its leader (the centre query, ``s // 2`` into the group, or the last real one at the end
    of the axis). ``s == w`` gives blocked (Swin-like, non-overlapping) attention.
  * Dilation ``d`` runs all of the above separately inside each residue class
    ``{r, r + d, r + 2d, ...}``: query ``x`` sees keys of its class only, ``d`` apart.
  * Causal (per axis) keeps the keys at or before the query along that axis, within ``w`` of
    the group leader, which is then the group's last query.

  Worked example (1-D, ``L = 8``; ``kernel_size=3`` has ``w // 2 = 1`` key on each side)::

    kernel_size=3:                    query 0 -> keys {0, 1, 2}   (shifted right at the border)
                                      query 3 -> keys {2, 3, 4}
                                      query 7 -> keys {5, 6, 7}   (shifted left)
    kernel_size=4 (even: 2 left, 1 right):  query 3 -> keys {1, 2, 3, 4}
    kernel_size=3, stride=2:          queries 0, 1 -> leader 1 -> keys {0, 1, 2}
                                      queries 2, 3 -> leader 3 -> keys {2, 3, 4}
                                      queries 6, 7 -> leader 7 -> keys {5, 6, 7}
    kernel_size=3, dilation=2:        query 0 -> keys {0, 2, 4}; query 5 -> keys {3, 5, 7}
                                      query 6 -> keys {2, 4, 6}   (class {0, 2, 4, 6})
    kernel_size=3, is_causal=True:    query 0 -> {0}; query 1 -> {0, 1}; query 5 -> {3, 4, 5}

  In 2-D, with ``kernel_size=(3, 3)`` on a 5x5 grid, query (0, 2) sees rows {0, 1, 2} x
  columns {1, 2, 3}: 9 keys. ``is_causal=(True, False)`` (video-style: causal in time only) keeps
  rows at or before the query's and the full non-causal column window.

  Implementation: the tokens are permuted so that tiles of the grid are contiguous (GNA's token
  permutation; dilation classes are separated by the same permutation), then
  :func:`attn_jax.attention` runs with a :class:`NeighborhoodMask` whose block size is the tile's
  token count, so that most visited blocks are full and the mask is evaluated only on the
  others; the output is permuted back. Any grid size works (the grid is padded to whole tiles
  and the padding masked out).

  Args:
    q: queries ``[B, *spatial, Hq, D]`` with 1 to 3 spatial axes.
    k: keys ``[B, *spatial, Hkv, D]``; ``Hq`` a multiple of ``Hkv`` (GQA / MQA).
    v: values ``[B, *spatial, Hkv, Dv]``.
    kernel_size: window size per axis (int or tuple), ``2 <= kernel_size * dilation <= size``.
    stride: per axis, ``1 <= stride <= kernel_size``.
    dilation: per axis, ``>= 1``.
    is_causal: per axis (bool or tuple of bools).
    sinks: ``[Hq]`` learned per-head logits in the softmax denominator only (gpt-oss).
    additional_keys, additional_values: ``[B, N_extra, Hkv, D]`` / ``[B, N_extra, Hkv, Dv]``,
      e.g. text tokens, visible to every query (both or neither).
    scale: logit scale, default ``D ** -0.5``.
    implementation: softmax backend (None: the backend of ``config.attention_config`` if given,
      else the platform's default; ``"xla"``, ``"pallas_tpu"``, ``"pallas_gpu"``,
      ``"reference"``).
    return_lse: also return the log-sum-exp ``[B, *spatial, Hq]`` (float32).
    config: a :class:`NeighborhoodConfig` (tile shape, softmax backend config); None uses the
      heuristic tile and the backend's defaults.
    context_parallel: an :class:`attn_jax.ContextParallel`: the leading spatial axis is split
      over its mesh axis; each device receives the halo rows of K/V its windows reach from its
      neighbours (``ppermute``, not an all-gather) and attends its own rows
      (:mod:`attn_jax.context_parallel.neighborhood`). The leading size must be divisible by the
      axis size; the strategy field is not used. None: no sharding of the grid.

  Returns:
    ``out [B, *spatial, Hq, Dv]`` in the dtype of ``q`` (and ``lse`` with ``return_lse``).
  """
  for name, x in (("q", q), ("k", k), ("v", v)):
    _check_array(name, x)
    if x.ndim not in (4, 5, 6):
      raise ValueError(f"{name} must have shape [batch, *spatial, heads, head_dim] with 1 to 3 "
                       f"spatial axes (rank 4 to 6), got shape {tuple(x.shape)}")
  if not q.ndim == k.ndim == v.ndim:
    raise ValueError(f"q, k, v must have the same rank, got shapes {tuple(q.shape)}, "
                     f"{tuple(k.shape)}, {tuple(v.shape)}")
  n = q.ndim - 3
  spatial = tuple(q.shape[1:1 + n])
  if tuple(k.shape[:1 + n]) != tuple(q.shape[:1 + n]) or tuple(v.shape[:1 + n]) != tuple(q.shape[:1 + n]):
    raise ValueError(f"q, k, v must share batch and spatial shape, got {tuple(q.shape)}, "
                     f"{tuple(k.shape)}, {tuple(v.shape)}")
  kernel_size, stride, dilation, is_causal = check_arguments(
      spatial, kernel_size, stride, dilation, is_causal)

  b = q.shape[0]
  hq, d = q.shape[-2:]
  hkv = k.shape[-2]
  if (additional_keys is None) != (additional_values is None):
    raise ValueError("additional_keys and additional_values must be given together, got "
                     f"additional_keys={'None' if additional_keys is None else 'an array'}, "
                     f"additional_values={'None' if additional_values is None else 'an array'}")
  if additional_keys is not None:
    _check_array("additional_keys", additional_keys)
    _check_array("additional_values", additional_values)
    ak, av = additional_keys, additional_values
    if ak.ndim != 4 or ak.shape[0] != b or ak.shape[2:] != k.shape[-2:]:
      raise ValueError(f"additional_keys must have shape [batch, N_extra, Hkv, D] = "
                       f"[{b}, N_extra, {hkv}, {d}], got {tuple(ak.shape)}")
    if av.ndim != 4 or av.shape[:3] != ak.shape[:3] or av.shape[3] != v.shape[-1]:
      raise ValueError(f"additional_values must have shape [batch, N_extra, Hkv, Dv] = "
                       f"[{b}, {ak.shape[1]}, {hkv}, {v.shape[-1]}], got {tuple(av.shape)}")
    if ak.dtype != k.dtype or av.dtype != v.dtype:
      raise ValueError(f"additional_keys/values must have the dtype of k/v ({k.dtype}), got "
                       f"{ak.dtype}, {av.dtype}")
  if scale is None:
    scale = 1.0 / math.sqrt(d)

  if config is None:
    config = NeighborhoodConfig()
  elif not isinstance(config, NeighborhoodConfig):
    raise ValueError(f"config must be a NeighborhoodConfig or None, got {type(config).__name__}")
  attention_config = config.attention_config
  if attention_config is not None:
    if implementation is not None and implementation != attention_config.backend:
      raise ValueError(f"implementation={implementation!r} contradicts config.attention_config, a "
                       f"{type(attention_config).__name__} (backend {attention_config.backend!r})")
    implementation = attention_config.backend
  if config.tile_shape is not None and len(config.tile_shape) != n:
    raise ValueError(f"config.tile_shape must have one entry per spatial axis ({n}), got {config.tile_shape}")
  if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
    raise ValueError(f"scale must be a finite Python float (static) or None, got {scale!r}")
  if context_parallel is not None:
    if not isinstance(context_parallel, cp_config.ContextParallel):
      raise ValueError(f"context_parallel must be an attn_jax.ContextParallel or None, got "
                       f"{type(context_parallel).__name__}")
    return cp_neighborhood.neighborhood_attention(
        q, k, v, kernel_size, stride, dilation, is_causal, sinks=sinks, additional_keys=additional_keys,
        additional_values=additional_values, scale=float(scale), implementation=implementation,
        return_lse=return_lse, config=config, cp=context_parallel, attend=neighborhood_attention)
  static = _Static(spatial, kernel_size, stride, dilation, is_causal, float(scale),
                   resolve_backend(implementation), config, dispatch.state_key(softmax_api.FAMILY))
  out, lse = _run(static, q, k, v, sinks, additional_keys, additional_values)
  return (out, lse) if return_lse else out


@dataclasses.dataclass(frozen=True)
class _Static:
  """Static description of a :func:`neighborhood_attention` call after argument checking."""

  spatial: tuple[int, ...]
  kernel_size: tuple[int, ...]
  stride: tuple[int, ...]
  dilation: tuple[int, ...]
  is_causal: tuple[bool, ...]
  scale: float
  backend: str
  config: NeighborhoodConfig
  dispatch_state: tuple  # the platform decides the tile rules as well as the backend


@_jit_cache.cached
def _run(st: _Static, q, k, v, sinks, additional_keys, additional_values):
  """Permute, attend, unpermute: compiled once per :class:`_Static` and array shapes."""
  attention_config = st.config.attention_config
  tile_shape = st.config.tile_shape
  if tile_shape is None:
    tile_shape = tiling.choose_tile_shape(
        st.spatial, st.kernel_size, st.stride, st.dilation, st.is_causal, st.config.target_tile_size,
        tile_volume_rule(st.backend, getattr(attention_config, "interpret", None)))
  layout = tiling.TileLayout(st.spatial, st.dilation, tile_shape)
  mask = mask_lib.NeighborhoodMask(layout, st.kernel_size, st.stride, st.is_causal)

  qp, kp, vp = layout.permute(q), layout.permute(k), layout.permute(v)
  if additional_keys is not None:
    kp = jnp.concatenate([kp, additional_keys], axis=1)
    vp = jnp.concatenate([vp, additional_values], axis=1)
  out, lse = softmax_api.attention(qp, kp, vp, mask=mask, scale=st.scale, sinks=sinks,
                                   implementation=st.backend,
                                   config=backend_config(st.backend, layout.tile_size, attention_config),
                                   return_lse=True)
  return layout.unpermute(out), layout.unpermute(lse)
