"""Neighborhood attention with the leading spatial axis sharded: halo exchange.

Device ``i`` holds rows ``[i S, (i + 1) S)`` of the leading axis (``S = L / n``). Its queries
need the key rows their windows reach, a few rows past each edge of its slab: the *halo*.
Each device receives the halo rows of K and V from its neighbours by ``ppermute`` (more than
one hop only if a window is wider than a slab) and runs the ordinary
:func:`attn_jax.neighborhood_attention` on the extended slab ``[e0, e1)``; the outputs of its own
rows are kept.

The extended slab is chosen on the host so that this is exact: NATTEN's windows shift inward at
the borders of the grid, so a device runs on a slab whose borders are the grid's where the
grid's are near (the first and last devices), and elsewhere on a slab wide enough that no
window of its own rows touches a slab border. The slab starts on a multiple of ``dilation *
stride`` rows so that residue classes and stride groups line up with the global ones, and every
device's rows are checked on the host to see exactly their global windows. Devices with the
same halo widths (all interior ones) share one compiled branch, picked by ``lax.switch``.

Cost: the halo rows' queries are computed and discarded (their q rows are zeros, not
exchanged), ``(halo_left + halo_right) / S`` extra work; the halo is ``~kernel_size * dilation``
rows of K and V per device, not an all-gather. Gradients come from autodiff (the ``ppermute``
transposes send the halo's dK / dV back to their owners).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

from attn_jax.context_parallel import config as config_lib
from attn_jax.neighborhood import windows


def _rows_match(length, e0, e1, rows, kernel, stride, dilation, causal) -> bool:
  """Whether every query row in ``rows`` sees in the slab ``[e0, e1)`` its global window."""
  x = np.asarray(rows)
  r, c = x % dilation, x // dilation
  glen = windows.residue_length(length, dilation, r)
  g_start, g_end = windows.axis_window(c, glen, kernel, stride, causal, np)
  base = e0 // dilation
  llen = windows.residue_length(e1 - e0, dilation, r)
  l_start, l_end = windows.axis_window(c - base, llen, kernel, stride, causal, np)
  return bool(((l_start + base) == g_start).all() and ((l_end + base) == g_end).all())


@functools.lru_cache(maxsize=128)
def slabs(length: int, devices: int, kernel: int, stride: int, dilation: int, causal: bool):
  """``((e0, e1) per device)``: the smallest aligned extended slabs whose windows are exact."""
  size = length // devices
  align = dilation * stride
  out = []
  for i in range(devices):
    r0, r1 = i * size, (i + 1) * size
    rows = np.arange(r0, r1)
    # The keys the slab's queries need: a necessary extent, grown until the check passes.
    r, c = rows % dilation, rows // dilation
    start, end = windows.axis_window(c, windows.residue_length(length, dilation, r), kernel, stride,
                                     causal, np)
    e0 = min(r0, int((start * dilation + r).min()))
    e1 = max(r1, int((end * dilation + r).max()) + 1)
    e0 = max(0, e0 // align * align)
    e1 = min(length, e1)
    while (e0, e1) != (0, length) and not (
        e1 - e0 >= kernel * dilation and _rows_match(length, e0, e1, rows, kernel, stride, dilation, causal)):
      e0 = max(0, e0 - align)
      e1 = min(length, e1 + align)
    out.append((e0, e1))
  return tuple(out)


def _halo(x, left: int, right: int, cp: config_lib.ContextParallel):
  """``[B, S, ...] -> [B, left + S + right, ...]``: rows of the previous and next devices
  (zeros past the ends of the grid; those rows are never used)."""
  n, size = cp.size, x.shape[1]
  parts, need, hop = [], left, 1
  while need > 0:
    take = min(size, need)
    perm = [(j, j + hop) for j in range(n - hop)]
    parts.insert(0, lax.ppermute(x[:, size - take:], cp.axis_name, perm))
    need, hop = need - take, hop + 1
  parts.append(x)
  need, hop = right, 1
  while need > 0:
    take = min(size, need)
    perm = [(j + hop, j) for j in range(n - hop)]
    parts.append(lax.ppermute(x[:, :take], cp.axis_name, perm))
    need, hop = need - take, hop + 1
  return jnp.concatenate(parts, axis=1) if len(parts) > 1 else x


@dataclasses.dataclass(frozen=True)
class _Branch:
  start: int  # first row of the device's slab in the halo buffer
  rows: int  # rows of the slab
  own: int  # offset of the device's own rows inside the slab


def neighborhood_attention(q, k, v, kernel_size, stride, dilation, is_causal, *, sinks, additional_keys,
                           additional_values, scale, implementation, return_lse, config,
                           cp: config_lib.ContextParallel, attend):
  """Context-parallel neighborhood attention; arguments as :func:`attn_jax.neighborhood_attention`
  after its checks (per-axis tuples). ``attend`` is that function (run on each slab)."""
  length = q.shape[1]
  n = cp.size
  config_lib.check_length(cp, "the leading spatial size", length, 1)
  config_lib.check_divides(cp, "batch", q.shape[0], cp.batch_axes, cp.batch_shards)
  config_lib.check_divides(cp, "q heads", q.shape[-2], cp.head_axes, cp.head_shards)
  config_lib.check_divides(cp, "k/v heads", k.shape[-2], cp.head_axes, cp.head_shards)
  size = length // n
  ext = slabs(length, n, kernel_size[0], stride[0], dilation[0], is_causal[0])
  left = max(i * size - e0 for i, (e0, _) in enumerate(ext))
  right = max(e1 - (i + 1) * size for i, (_, e1) in enumerate(ext))
  branches, table = {}, []
  for i, (e0, e1) in enumerate(ext):
    b = _Branch(left - (i * size - e0), e1 - e0, i * size - e0)
    table.append(branches.setdefault(b, len(branches)))

  def run(branch, q, k, v, sinks, ak, av):
    sl = slice(branch.start, branch.start + branch.rows)
    out = attend(q[:, sl], k[:, sl], v[:, sl], kernel_size, stride, dilation, is_causal, sinks=sinks,
                 additional_keys=ak, additional_values=av, scale=scale, implementation=implementation,
                 return_lse=True, config=config)
    own = slice(branch.own, branch.own + size)
    return out[0][:, own], out[1][:, own]

  def body(q, k, v, sinks, ak, av):
    # Only K/V need the neighbours' rows; the halo's query rows are zeros whose outputs are dropped.
    qb = jnp.pad(q, [(0, 0), (left, right)] + [(0, 0)] * (q.ndim - 2))
    kb, vb = _halo(k, left, right, cp), _halo(v, left, right, cp)
    fns = [functools.partial(run, b) for b in branches]
    index = jnp.asarray(np.asarray(table, np.int32))[lax.axis_index(cp.axis_name)]
    return config_lib.switch(index, fns, qb, kb, vb, sinks, ak, av,
                             run_all=config_lib.kernels_synchronise(implementation, None))

  spatial = (None,) * (q.ndim - 4)
  x = cp.spec("batch", "seq", *spatial, "heads", None)
  rows = cp.spec("batch", "seq", *spatial, "heads")
  extra = cp.spec("batch", None, "heads", None)
  out, lse = cp.shard_map(body, (x, x, x, cp.spec("heads"), extra, extra), (x, rows),
                          (q, k, v, sinks, additional_keys, additional_values))
  return (out, lse) if return_lse else out
