"""Routing Transformer attention (Roy et al., "Efficient Content-Based Sparse Attention with Routing
Transformers", TACL 2021).

Routing attention (Sec. 4.1): queries and keys are routed by their unit-normalised vectors to
``C`` centroids; a query attends to the keys routed to its cluster. Balanced clusters (Sec. 4.2,
"in practice"): each centroid takes the ``w`` queries and the ``w`` keys closest to it (top-k
per centroid), so every cluster is a dense ``w x w`` block: ``O(T w)`` work for ``C = T / w``.
The centroids are learned by online k-means with an exponential moving average
(:func:`routing_update_centroids`), not by gradients. Routing heads are mixed with local
(sliding-window) attention heads in the same layer (Sec. 5).

Our choices: a query routed to several clusters attends to the union of their keys with
multiplicity: the clusters' attentions are merged through their log-sum-exps, which is exactly
a softmax in which a key shared by two of the query's clusters counts twice (the materialised
pattern of :func:`routing_attention_reference`); a query routed to no cluster gets 0 from its
routing heads, as with the paper's top-k balancing. Inside a cluster the causal mask uses the
original positions. The centroid update uses the means of the vectors assigned to each centroid
(the paper writes sums, which scale with the sequence length), then renormalises.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attn_jax import masks as masks_lib
from attn_jax.mechanisms import dense
from attn_jax.mechanisms import sparse_common
from attn_jax.softmax import api as softmax_api

HIGHEST = jax.lax.Precision.HIGHEST


def _unit(x):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum((x * x).sum(-1, keepdims=True), 1e-12))


def _route_vectors(q, k):
  """Unit routing vectors per query head: ``[B, Hq, T, D]`` for queries and for keys (of each head's group)."""
  g = q.shape[2] // k.shape[2]
  rq = _unit(q).transpose(0, 2, 1, 3)
  rk = jnp.repeat(_unit(k).transpose(0, 2, 1, 3), g, axis=1)
  return jax.lax.stop_gradient(rq), jax.lax.stop_gradient(rk)


def routing_update_centroids(centroids, q, k, *, decay: float = 0.999):
  """One online k-means step: ``mu_c <- normalise(decay mu_c + (1 - decay) mean of the unit query and
  key vectors whose nearest centroid is c)``; centroids without members keep their value.

  Args:
    centroids: ``[Hq, C, D]``.
    q, k: ``[B, T, Hq, D]``, ``[B, Tk, Hkv, D]``.
    decay: EMA decay in ``[0, 1)``.

  Returns:
    The new ``[Hq, C, D]`` float32 centroids (no gradient).
  """
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"routing_update_centroids: decay must be in [0, 1), got {decay}")
  rq, rk = _route_vectors(q, k)
  vecs = jnp.concatenate([rq, rk], axis=2)                                        # [B, Hq, N, D]
  c = centroids.shape[1]
  assign = jax.nn.one_hot(jnp.argmax(jnp.einsum("bhnd,hcd->bhnc", vecs, centroids.astype(jnp.float32),
                                                   precision=HIGHEST), -1), c)   # [B, Hq, N, C]
  sums = jnp.einsum("bhnc,bhnd->hcd", assign, vecs, precision=HIGHEST)
  counts = assign.sum((0, 2))[..., None]
  means = sums / jnp.maximum(counts, 1.0)
  new = jnp.where(counts > 0, decay * centroids + (1.0 - decay) * means, centroids)
  return jax.lax.stop_gradient(_unit(new))


def _members(route, centroids, size):
  """Indices ``[B, Hq, C, w]`` (increasing) of the ``w`` vectors closest to each centroid."""
  scores = jnp.einsum("bhtd,hcd->bhct", route, centroids.astype(jnp.float32), precision=HIGHEST)
  _, idx = jax.lax.top_k(scores, size)
  return jnp.sort(idx, axis=-1)


def _check(q, k, v, centroids, cluster_size, causal, num_local_heads, local_window, fn):
  dense.check_qkv(q, k, v, fn)
  t, hq, d = q.shape[1], q.shape[2], q.shape[3]
  g = hq // k.shape[2]
  if k.shape[1] != t:
    raise ValueError(f"{fn}: routing attention is self-attention: q_len == kv_len, got {t} and {k.shape[1]}")
  if centroids.ndim != 3 or centroids.shape[0] != hq or centroids.shape[2] != d:
    raise ValueError(f"{fn}: centroids must have shape [q_heads={hq}, clusters, head_dim={d}], got "
                     f"{tuple(centroids.shape)}")
  cluster_size = sparse_common.check_int(fn, "cluster_size", cluster_size, 1, t, " (tokens per cluster)")
  num_local_heads = sparse_common.check_int(fn, "num_local_heads", num_local_heads, 0, hq)
  if num_local_heads % g:
    raise ValueError(f"{fn}: num_local_heads must be a multiple of the GQA group size {g}, got {num_local_heads}")
  if num_local_heads:
    local_window = sparse_common.check_int(fn, "local_window", local_window, 1, t)
  return cluster_size, num_local_heads, local_window


def _local_mask(causal, window):
  return masks_lib.sliding_window(window - 1) if causal else masks_lib.sliding_window(window // 2, window // 2)


def routing_attention(q, k, v, centroids, *, cluster_size: int, causal: bool = True, num_local_heads: int = 0,
                      local_window: int | None = None, scale=None, implementation=None):
  """Routing attention: balanced k-means clusters of queries and keys, dense inside each cluster.

  Args:
    q, k, v: ``[B, T, Hq, D]``, ``[B, T, Hkv, D]``, ``[B, T, Hkv, Dv]`` (self-attention).
    centroids: ``[Hq, C, D]`` unit centroids (e.g. from :func:`routing_update_centroids`).
    cluster_size: ``w``, queries and keys per cluster, in ``[1, T]``.
    causal: causal by original position inside each cluster.
    num_local_heads: the first heads use local attention instead of routing (a multiple of the
      GQA group size); ``local_window`` is their window (causal: the current token and
      ``window - 1`` before it).
    scale: logit scale (default ``D ** -0.5``). implementation: backend of the local heads.

  Returns:
    ``[B, T, Hq, Dv]`` in the dtype of ``q``. Gradients flow to q, k, v through the attention;
    the routing (top-k membership) is not differentiated.
  """
  cluster_size, nl, local_window = _check(q, k, v, centroids, cluster_size, causal, num_local_heads,
                                          local_window, "routing_attention")
  b, t, hq, d = q.shape
  g = hq // k.shape[2]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  rq, rk = _route_vectors(q, k)
  mq, mk = _members(rq, centroids, cluster_size), _members(rk, centroids, cluster_size)   # [B, Hq, C, w]
  head_kv = jnp.arange(hq) // g
  qh = q.transpose(0, 2, 1, 3)                                                            # [B, Hq, T, D]
  kh, vh = k.transpose(0, 2, 1, 3)[:, head_kv], v.transpose(0, 2, 1, 3)[:, head_kv]
  take = jax.vmap(jax.vmap(lambda x, i: x[i]))                                            # [T, X], [C, w]
  qc, kc, vc = take(qh, mq), take(kh, mk), take(vh, mk)                                   # [B, Hq, C, w, .]
  s = jnp.einsum("bhcqd,bhckd->bhcqk", qc, kc, preferred_element_type=jnp.float32) * scale
  if causal:
    s = jnp.where(mk[..., None, :] <= mq[..., :, None], s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s, -1))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m[..., None])
  l = p.sum(-1)
  safe = jnp.where(l > 0, l, 1.0)
  oc = jnp.einsum("bhcqk,bhckd->bhcqd", p, vc.astype(jnp.float32), precision=HIGHEST) / safe[..., None]
  lse = jnp.where(l > 0, m + jnp.log(safe), -jnp.inf)                                      # [B, Hq, C, w]
  # Merge every query's clusters through their LSEs (scatter-max, then scatter-add).
  flat_idx = mq.reshape(b, hq, -1)
  flat_lse = lse.reshape(b, hq, -1)
  scatter_max = jax.vmap(jax.vmap(lambda i, x: jnp.full((t,), -jnp.inf).at[i].max(x)))
  top = jax.lax.stop_gradient(scatter_max(flat_idx, flat_lse))                            # [B, Hq, T]
  top_safe = jnp.where(jnp.isfinite(top), top, 0.0)
  w = jnp.exp(flat_lse - jnp.take_along_axis(top_safe, flat_idx, axis=-1))                # 0 for empty
  scatter_add = jax.vmap(jax.vmap(lambda i, x: jnp.zeros((t,) + x.shape[1:], x.dtype).at[i].add(x)))
  num = scatter_add(flat_idx, w[..., None] * oc.reshape(b, hq, -1, oc.shape[-1]))
  den = scatter_add(flat_idx, w)
  out = num / jnp.where(den > 0, den, 1.0)[..., None]                                     # [B, Hq, T, Dv]
  out = out.transpose(0, 2, 1, 3)
  if nl:
    local = softmax_api.attention(q[:, :, :nl], k[:, :, :nl // g], v[:, :, :nl // g], mask=_local_mask(causal, local_window),
                                  scale=scale, implementation=implementation)
    out = jnp.concatenate([local.astype(jnp.float32), out[:, :, nl:]], axis=2)
  return out.astype(q.dtype)


def routing_attention_reference(q, k, v, centroids, *, cluster_size: int, causal: bool = True,
                                num_local_heads: int = 0, local_window: int | None = None, scale=None):
  """The oracle: membership by a stable sort, multiplicity ``sum_c [i in Q_c][j in K_c]`` as log-weights."""
  cluster_size, nl, local_window = _check(q, k, v, centroids, cluster_size, causal, num_local_heads,
                                          local_window, "routing_attention_reference")
  t = q.shape[1]
  rq, rk = _route_vectors(q, k)

  def membership(route):
    scores = jnp.einsum("bhtd,hcd->bhct", route, centroids.astype(jnp.float32), precision=HIGHEST)
    order = jnp.argsort(-scores, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    return (rank < cluster_size).astype(jnp.float32)                                     # [B, Hq, C, T]

  mult = jnp.einsum("bhci,bhcj->bhij", membership(rq), membership(rk), precision=HIGHEST)
  vis = mult > 0
  if causal:
    vis = vis & jnp.tril(jnp.ones((t, t), bool))
  logw = jnp.where(vis, jnp.log(jnp.where(vis, mult, 1.0)), -jnp.inf)
  if nl:
    local = dense.visibility(_local_mask(causal, local_window), t, t, 1)[0]
    logw = logw.at[:, :nl].set(jnp.where(local, 0.0, -jnp.inf))
  out = dense.attention(q, k, v, scale=scale, logits_fn=lambda s: s + logw)
  return out.astype(q.dtype)
