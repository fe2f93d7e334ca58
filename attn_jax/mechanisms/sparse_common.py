"""Pieces shared by the content-dependent sparse mechanisms.

* :func:`block_sparse_attention`: softmax attention over the tiles of a traced BlockMask with a
  data-dependent transform of each tile's logits (a key bias, a per-query threshold, a table
  lookup), which :func:`attn_jax.attention` has no argument for. It is the xla backend's gather
  form (same gathers, same visibility) with the transform inserted, differentiated by autodiff
  under ``jax.checkpoint`` per query block, so memory stays one query block's tiles.
* :func:`merge_lse`: combine partial attentions over disjoint key sets through their LSEs.
* :func:`check_int`: the range checks the mechanisms share.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attn_jax.mechanisms import dense
from attn_jax.softmax import common
from attn_jax.softmax import xla_sparse


def check_int(fn: str, name: str, value, lo: int, hi: int | None = None, hint: str = "") -> int:
  """ValueError naming ``name`` unless ``value`` is an int in ``[lo, hi]``."""
  ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
  if ok:
    ok = value >= lo and (hi is None or value <= hi)
  if not ok:
    rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
    raise ValueError(f"{fn}: {name} must be an int in {rng}{hint}, got {value!r}")
  return int(value)


def merge_lse(parts):
  """``[(out [..., Dv], lse [...]), ...]`` over disjoint key sets -> their joint softmax attention.

  A part with ``lse = -inf`` (no key) contributes nothing; if every part is empty the result is
  0 with ``lse = -inf``.
  """
  lses = jnp.stack([l for _, l in parts])
  m = jnp.max(lses, axis=0)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  weights = jnp.exp(lses - m_safe)                           # 0 for empty parts
  total = weights.sum(0)
  out = sum(w[..., None] * o.astype(jnp.float32) for w, (o, _) in zip(weights, parts))
  safe = jnp.where(total > 0, total, 1.0)
  return out / safe[..., None], jnp.where(total > 0, m_safe + jnp.log(safe), -jnp.inf)


def _spec(q, k, v, mask, scale):
  b, tq, hq, d = q.shape
  _, tk, hkv, _ = k.shape
  return common.Spec(mask=mask, scale=scale, logits_soft_cap=None, q_len=tq, kv_len=tk, num_q_heads=hq,
                     num_kv_heads=hkv, head_dim=d, v_head_dim=v.shape[3], has_sinks=False, has_segments=False)


def block_sparse_attention(q, k, v, block_mask, *, scale=None, transform: Callable[..., Any] | None = None,
                           query_aux=None, key_aux=None, return_lse: bool = False):
  """Attention over the tiles of ``block_mask`` with ``transform`` applied to each tile's logits.

  Args:
    q, k, v: ``[B, Tq, Hq, D]``, ``[B, Tk, Hkv, D]``, ``[B, Tk, Hkv, Dv]``.
    block_mask: a :class:`attn_jax.TracedBlockMask` for these shapes.
    scale: logit scale (default ``D ** -0.5``).
    transform: ``f(logits, q_aux, k_aux, q_pos, k_pos) -> (logits, visible)`` on a query block's
      tile: ``logits [B, Hkv, Gm, Gr, bq, K]`` (scaled, float32, ``K = W * block_kv`` gathered
      keys), ``q_aux`` the query block's slice of ``query_aux`` laid out ``[B, Hkv, Gm, Gr, bq,
      X]``, ``k_aux`` the gathered ``key_aux`` ``[B, Hkv, Gm, K, X]``, ``q_pos [bq]`` and
      ``k_pos [B, Hkv, Gm, K]`` token positions. ``visible`` (broadcastable bool or None) is
      ANDed with the block mask's visibility. Differentiable in the auxiliary arrays.
    query_aux: ``[B, Tq, Hq, X]`` or None. key_aux: ``[B, Tk, Hkv, X]`` or None.
    return_lse: also return ``lse [B, Tq, Hq]``.

  Returns:
    ``out [B, Tq, Hq, Dv]`` float32 (and the LSE); rows without a visible key are 0.
  """
  d = q.shape[3]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  spec = _spec(q, k, v, block_mask.mask, scale)
  st = xla_sparse._Static(spec, block_mask.layout, block_mask.num_batch, block_mask.num_heads, None)
  lay = st.layout
  bq = lay.block_q
  qi, kb_all, vb_all, _, _ = xla_sparse._inputs(st, q, k, v, None, None)
  rows = xla_sparse._rows_of_lists((block_mask.kv_indices, block_mask.kv_counts), st, q.shape[0])
  qa = None if query_aux is None else xla_sparse._internal_queries(query_aux, st)
  ka = None if key_aux is None else xla_sparse._internal_blocks(key_aux, st)

  @jax.checkpoint
  def q_block(i, idx, counts, qi, kb_all, vb_all, qa, ka):
    qb = lax.dynamic_slice_in_dim(qi, i * bq, bq, axis=4)
    kb, vb = xla_sparse._gather_blocks(kb_all, idx), xla_sparse._gather_blocks(vb_all, idx)
    logits, _ = xla_sparse._scores(qb, kb, st)
    vis = xla_sparse._visibility(st, i, idx, counts, None, None)
    if transform is not None:
      w = idx.shape[-1]
      kpos = (idx[..., None] * lay.block_kv + jnp.arange(lay.block_kv)).reshape(idx.shape[:3] + (w * lay.block_kv,))
      qat = None if qa is None else lax.dynamic_slice_in_dim(qa, i * bq, bq, axis=4)
      kat = None if ka is None else xla_sparse._gather_blocks(ka, idx)
      logits, extra = transform(logits, qat, kat, i * bq + jnp.arange(bq), kpos)
      if extra is not None:
        vis = vis & extra
    m = jnp.max(jnp.where(vis, logits, common.NEG_INF), axis=-1)
    m = lax.stop_gradient(m)
    # exp of a masked logit is never formed: its cotangent would be 0 * inf = NaN.
    p = jnp.exp(jnp.where(vis, logits - m[..., None], -jnp.inf))
    l = p.sum(-1)
    acc = jnp.einsum("bhmgqk,bhmkd->bhmgqd", p, vb.astype(jnp.float32), preferred_element_type=jnp.float32)
    positive = l > 0
    safe = jnp.where(positive, l, 1.0)
    return acc / safe[..., None], jnp.where(positive, m + jnp.log(safe), -jnp.inf)

  def body(args):
    i, idx, counts = args
    return q_block(i, idx, counts, qi, kb_all, vb_all, qa, ka)

  out, lse = lax.map(body, (jnp.arange(lay.num_q_blocks), *rows))
  out, lse = xla_sparse._public_queries(out, st), xla_sparse._public_queries(lse, st)
  return (out, lse) if return_lse else out


def gated_block_attention(q, k, v, gate_keys, *, block_size: int, top_k: int | None, own_gate: str, scale=None):
  """A mixture of per-block softmax attentions, gated by a softmax over block scores (causal, self).

  The keys are cut into aligned blocks of ``block_size``. Query ``i`` (in block ``I``) scores every
  earlier block ``b < I`` by ``gamma_ib = scale * q_i . gate_keys[b]``, keeps its ``top_k`` best
  (all if None; ties to the lower block), and outputs

  ``o_i = w_own o_own(i) + sum_{b kept} w_ib o_b(i)``, ``w = softmax(gamma_own, gamma_ib kept)``,

  where ``o_b(i)`` is softmax attention of ``q_i`` over block ``b`` alone and ``o_own`` over its own
  block up to ``i``. ``own_gate="lse"`` makes ``gamma_own`` the LSE of the own block's logits,
  which is the same as letting the own tokens enter the gate softmax one by one (Landmark
  Attention's grouped softmax); ``own_gate="self"`` uses ``scale * q_i . k_i`` (the own block's
  representative is the query's own key).

  Args:
    q, k, v: ``[B, T, Hq, D]``, ``[B, T, Hkv, D]``, ``[B, T, Hkv, Dv]``.
    gate_keys: ``[B, nb, Hkv, D]`` with ``nb >= ceil(T / block_size) - 1`` (one per earlier block).

  Returns:
    ``[B, T, Hq, Dv]`` float32. Differentiable in q, k, v and gate_keys; the choice of blocks is not.
  """
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  l = block_size
  nb = -(-t // l)
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  pad = nb * l - t
  qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).astype(jnp.float32)
  kp = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0))).astype(jnp.float32)
  vp = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0))).astype(jnp.float32)
  # Head-major blocks [B, Hq, nb, l, X]: a gathered block is one contiguous slice.
  kblk = kp.reshape(b, nb, l, hkv, d)[:, :, :, jnp.arange(hq) // g].transpose(0, 3, 1, 2, 4)
  vblk = vp.reshape(b, nb, l, hkv, -1)[:, :, :, jnp.arange(hq) // g].transpose(0, 3, 1, 2, 4)
  gk = jnp.pad(gate_keys.astype(jnp.float32), ((0, 0), (0, max(0, nb - gate_keys.shape[1])), (0, 0), (0, 0)))
  gk = gk[:, :nb, jnp.arange(hq) // g]                                                      # [B, nb, Hq, D]
  hi = jax.lax.Precision.HIGHEST

  def softmax_parts(s, vis):
    m = jax.lax.stop_gradient(jnp.max(jnp.where(vis, s, -jnp.inf), -1))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(jnp.where(vis, s - m[..., None], -jnp.inf))
    lsum = p.sum(-1)
    safe = jnp.where(lsum > 0, lsum, 1.0)
    return p / safe[..., None], jnp.where(lsum > 0, m + jnp.log(safe), -jnp.inf)

  @jax.checkpoint
  def q_block(i, qp, kblk, vblk, gk):
    qb = jax.lax.dynamic_slice_in_dim(qp, i * l, l, axis=1)                                 # [B, l, Hq, D]
    rows = i * l + jnp.arange(l)
    # Own block, causal, and key padding.
    s_own = jnp.einsum("bqhd,bhkd->bhqk", qb, kblk[:, :, i], precision=hi) * scale
    vis_own = (rows[None, :] <= rows[:, None]) & (rows[None, :] < t)
    p_own, lse_own = softmax_parts(s_own, vis_own)
    o_own = jnp.einsum("bhqk,bhkd->bhqd", p_own, vblk[:, :, i], precision=hi)
    gamma = jnp.einsum("bqhd,bnhd->bhqn", qb, gk, precision=hi) * scale                     # [B, Hq, l, nb]
    earlier = jnp.arange(nb) < i
    if top_k == 0:
      o_b = jnp.zeros(o_own.shape[:3] + (0, o_own.shape[3]), o_own.dtype)
      gamma_b = jnp.zeros(gamma.shape[:3] + (0,), gamma.dtype)
    elif top_k is None:
      s = jnp.einsum("bqhd,bhnkd->bhqnk", qb, kblk, precision=hi) * scale
      p, lse_b = softmax_parts(s, jnp.ones(s.shape, bool))
      o_b = jnp.einsum("bhqnk,bhnkd->bhqnd", p, vblk, precision=hi)
      gamma_b = jnp.where(earlier, gamma, -jnp.inf)
    else:
      vals, idx = jax.lax.top_k(jnp.where(earlier, jax.lax.stop_gradient(gamma), -jnp.inf), top_k)
      live = vals > -jnp.inf                                                                # [B, Hq, l, K]
      take = jax.vmap(jax.vmap(lambda x, ix: x[ix]))                                        # per (b, h)
      ks = take(kblk, idx)                                                                  # [B, Hq, l, K, l, D]
      vs = take(vblk, idx)
      s = jnp.einsum("bhqd,bhqnkd->bhqnk", qb.transpose(0, 2, 1, 3), ks, precision=hi) * scale
      p, lse_b = softmax_parts(s, jnp.ones(s.shape, bool))
      o_b = jnp.einsum("bhqnk,bhqnkd->bhqnd", p, vs, precision=hi)
      gamma_b = jnp.where(live, jnp.take_along_axis(gamma, idx, axis=-1), -jnp.inf)
    if own_gate == "lse":
      gamma_own = lse_own
    else:
      kself = jax.lax.dynamic_slice_in_dim(kp, i * l, l, axis=1)[:, :, jnp.arange(hq) // g]
      gamma_own = jnp.einsum("bqhd,bqhd->bhq", qb, kself, precision=hi) * scale
    gates = jax.nn.softmax(jnp.concatenate([gamma_own[..., None], gamma_b], -1), axis=-1)
    out = gates[..., :1] * o_own + jnp.einsum("bhqn,bhqnd->bhqd", gates[..., 1:], o_b, precision=hi)
    return out.transpose(0, 2, 1, 3)                                                        # [B, l, Hq, Dv]

  out = jax.lax.map(lambda i: q_block(i, qp, kblk, vblk, gk), jnp.arange(nb))               # [nb, B, l, Hq, Dv]
  return out.transpose(1, 0, 2, 3, 4).reshape(b, nb * l, hq, -1)[:, :t]


def gated_block_attention_reference(q, k, v, gate_keys, *, block_size: int, top_k: int | None, own_gate: str,
                                    scale=None):
  """The oracle of :func:`gated_block_attention`: the ``[T, T]`` weights written out densely.

  Weight of key ``j`` in block ``b`` for query ``i``: ``w_ib * exp(s_ij - lse_b(i))``, i.e. logits
  ``s_ij - lse_b(i) + log w_ib`` in one softmax.
  """
  b, t, hq, d = q.shape
  g = hq // k.shape[2]
  l = block_size
  nb = -(-t // l)
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  hi = jax.lax.Precision.HIGHEST
  qf = q.astype(jnp.float32).transpose(0, 2, 1, 3)
  kf = jnp.repeat(k.astype(jnp.float32), g, axis=2).transpose(0, 2, 1, 3)
  s = jnp.einsum("bhqd,bhkd->bhqk", qf, kf, precision=hi) * scale                         # [B, Hq, T, T]
  qi, kj = jnp.arange(t) // l, jnp.arange(t) // l
  own = qi[:, None] == kj[None, :]
  vis = (~own & (kj[None, :] < qi[:, None])) | (own & (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]))
  onehot = jax.nn.one_hot(kj, nb, dtype=bool)                                               # [T, nb]
  # lse_b(i) for every block b (own block: causal part only).
  masked = jnp.where(vis[..., None] & onehot[None, :, :], s[..., None], -jnp.inf)          # [B, Hq, T, T, nb]
  lse_b = jax.nn.logsumexp(masked, axis=-2)                                                 # [B, Hq, T, nb]
  gk = jnp.repeat(gate_keys.astype(jnp.float32), g, axis=2).transpose(0, 2, 1, 3)[:, :, :nb]
  gk = jnp.pad(gk, ((0, 0), (0, 0), (0, nb - gk.shape[2]), (0, 0)))
  gamma = jnp.einsum("bhqd,bhnd->bhqn", qf, gk, precision=hi) * scale                     # [B, Hq, T, nb]
  earlier = jnp.arange(nb)[None, :] < qi[:, None]
  if top_k is not None:
    order = jnp.argsort(jnp.where(earlier, -jax.lax.stop_gradient(gamma), jnp.inf), axis=-1, stable=True)
    earlier = earlier & (jnp.argsort(order, axis=-1) < top_k)
  own_b = jax.nn.one_hot(qi, nb, dtype=bool)                                                # [T, nb]
  if own_gate == "lse":
    gamma_own = jnp.sum(jnp.where(own_b, lse_b, 0.0), -1)
  else:
    gamma_own = jnp.einsum("bhqd,bhqd->bhq", qf, kf, precision=hi) * scale
  item_logit = jnp.where(own_b, gamma_own[..., None], jnp.where(earlier, gamma, -jnp.inf))
  log_w = jax.nn.log_softmax(item_logit, axis=-1)                                           # [B, Hq, T, nb]
  keep = vis & (earlier[..., kj] | own)
  logits = s - lse_b[..., kj] + log_w[..., kj]
  return dense.attention(q, k, v, scale=1.0, logits_fn=lambda _: jnp.where(keep, logits, -jnp.inf))
