"""Dense neighborhood masks and attention written from NATTEN's per-axis definitions.

Independent of the implementation under test: no tiling, no permutation, no clamping formulas.
Each axis is handled by listing its residue class, locating the stride-group leader and sliding
a window of ``kernel_size`` positions inward until it fits, exactly as the definitions read.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np


def axis_neighbors(i, length, kernel, stride, dilation, causal):
  """Set of key positions that query ``i`` sees along one axis."""
  members = list(range(i % dilation, length, dilation))  # i's residue class, in order
  n = len(members)
  p = members.index(i)
  group_start = (p // stride) * stride
  if causal:
    leader = min(group_start + stride - 1, n - 1)
    keys = [j for j in range(n) if j <= p and leader - j < kernel]
  else:
    leader = min(group_start + stride // 2, n - 1)
    start = leader - kernel // 2
    if start < 0:
      start = 0
    if start + kernel > n:
      start = n - kernel
    keys = list(range(start, start + kernel))
  return {members[j] for j in keys}


def axis_matrix(length, kernel, stride, dilation, causal):
  m = np.zeros((length, length), bool)
  for i in range(length):
    for j in axis_neighbors(i, length, kernel, stride, dilation, causal):
      m[i, j] = True
  return m


def dense_mask(shape, kernel_size, stride, dilation, is_causal):
  """``[N, N]`` boolean mask over row-major grid tokens: the AND of the per-axis matrices."""
  n = len(shape)
  mats = [axis_matrix(shape[a], kernel_size[a], stride[a], dilation[a], is_causal[a]) for a in range(n)]
  total = int(np.prod(shape))
  out = np.zeros((total, total), bool)
  coords = list(itertools.product(*[range(s) for s in shape]))
  for qi, qc in enumerate(coords):
    row = np.ones(shape, bool)
    for a in range(n):
      sl = [None] * n
      sl[a] = slice(None)
      row = row & mats[a][qc[a]][tuple(sl)]
    out[qi] = row.reshape(-1)
  return out


def dense_attention(q, k, v, mask, *, sinks=None, additional_keys=None, additional_values=None,
                    scale=None):
  """Float32 softmax attention over flattened grid tokens with an explicit boolean mask.

  Returns ``(out [B, *spatial, Hq, Dv], lse [B, *spatial, Hq])``.
  """
  b = q.shape[0]
  spatial = q.shape[1:-2]
  hq, d = q.shape[-2:]
  hkv = k.shape[-2]
  g = hq // hkv
  hi = jax.lax.Precision.HIGHEST
  qf = q.reshape(b, -1, hkv, g, d).astype(jnp.float32)
  kf = k.reshape(b, -1, hkv, d).astype(jnp.float32)
  vf = v.reshape(b, -1, hkv, v.shape[-1]).astype(jnp.float32)
  mask = jnp.asarray(mask)
  if additional_keys is not None:
    kf = jnp.concatenate([kf, additional_keys.astype(jnp.float32)], 1)
    vf = jnp.concatenate([vf, additional_values.astype(jnp.float32)], 1)
    mask = jnp.concatenate([mask, jnp.ones((mask.shape[0], additional_keys.shape[1]), bool)], 1)
  scale = d ** -0.5 if scale is None else scale
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, kf, precision=hi) * scale
  s = jnp.where(mask, s, -jnp.inf)
  if sinks is not None:
    sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(hkv, g)[None, :, :, None, None],
                            s.shape[:-1] + (1,))
    s = jnp.concatenate([s, sink], -1)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - lse[..., None])
  if sinks is not None:
    p = p[..., :-1]
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p, vf, precision=hi)
  o = o.reshape((b,) + tuple(spatial) + (hq, v.shape[-1])).astype(q.dtype)
  lse = lse.transpose(0, 3, 1, 2).reshape((b,) + tuple(spatial) + (hq,))
  return o, lse
