"""Softmax attention with the sequence sharded over a mesh axis (ring or all-gather K/V).

Every device holds ``T / n`` query and key tokens (one chunk, or two zig-zag chunks). The work
is a set of *calls*: an ordinary :func:`attn_jax.attention` call on a local query piece against
a piece of the keys the device holds at that moment, with the mask moved to absolute positions
(:func:`attn_jax.context_parallel.shifted.shift`), returning ``(out, lse)``. Partial results are
merged by their log-sum-exp; learned sinks enter once, as the initial value of the merge.

The schedule is static and decided on the host from the mask's analytic block bounds:

* the global ``(query chunk, key chunk)`` pairs are classified EMPTY / FULL / PARTIAL (bounds
  first; undecided pairs through the local BlockMask of their shifted mask, memoised per
  canonical mask, so all diagonal causal chunks cost one BlockMask);
* for every ring step and device, its non-empty pairs become calls (FULL pairs with the plain
  ``full()`` mask); an empty set is a *skipped* step: that device does no attention in that
  step (it still forwards K/V). Steps that are empty on every device are not run, and K/V
  stop travelling after the last useful step (a causal sliding window needs one or two steps
  whatever the device count);
* distinct call sets are compiled once each and picked per (step, device) by ``lax.switch``
  from a table; with the masks in canonical form, a causal ring has three: the diagonal, a
  full tile, nothing.

Gradients: a custom VJP whose forward saves only the local q, k, v, the merged output and the
merged LSE (no per-step residuals, so memory stays ``O(T / n)`` per device, whatever the
number of steps). The backward pass walks the ring again: K/V travel with their dK/dV
accumulators (which return to their owner at the end), and each call's gradients come from the
backend's own VJP, fed with the cotangents that the LSE merge implies. With ``w_c = exp(lse_c -
LSE)`` the weight of call ``c`` in row ``i``:

    dO_c = w_c dO,     dlse_c = w_c (rowsum(dO * O_c) - delta),     delta = rowsum(dO * O) - dLSE

so the backend computes ``p = exp(s - lse_c) w_c = exp(s - LSE)`` and ``dS = p (dP - delta)``,
exactly the unsharded flash backward. The backend VJP needs its call's forward residuals, so
each call's forward is recomputed in the backward pass: about one extra forward (roughly +30%
FLOPs over a fused flash backward) bought for ``O(T / n)`` memory. Backends that accepted an
external LSE in their backward would remove it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attn_jax import block_mask as block_mask_lib
from attn_jax import masks as masks_lib
from attn_jax.context_parallel import config as config_lib
from attn_jax.context_parallel import shifted
from attn_jax.softmax import api as softmax_api
from attn_jax.softmax import common

EMPTY, PARTIAL, FULL = block_mask_lib.EMPTY, block_mask_lib.PARTIAL, block_mask_lib.FULL

# Block size of the BlockMasks that decide whether an undecided chunk pair is empty or full.
_CLASSIFY_BLOCK = 512
# "auto" load balancing picks zig-zag when it lowers the largest per-device work by this much.
_ZIGZAG_GAIN = 1.1
# Estimated cost of a PARTIAL chunk pair relative to a FULL one, for the load-balance choice.
_PARTIAL_WORK = 0.5


@dataclasses.dataclass(frozen=True)
class Call:
  """One attention call: local query rows ``[q_lo, q_hi)`` against rows ``[k_lo, k_hi)`` of the
  K/V buffer the device holds in that step, with ``mask`` on local indices."""

  q_lo: int
  q_hi: int
  k_lo: int
  k_hi: int
  mask: masks_lib.Mask


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """The static schedule of one context-parallel attention call.

  Attributes:
    spec: the global call description.
    cp: the ContextParallel setting.
    strategy: ``"ring"`` or ``"all_gather"``.
    q_layout, kv_layout: chunks per device (zig-zag or contiguous).
    num_steps: ring steps actually run (1 for all-gather).
    branches: distinct call sets; ``()`` is "no work".
    table: ``[num_steps, n, head_shards]`` int32, the branch of each (step, device, head shard).
    device_steps: (step, device, head shard) triples of a full ring (``n * n * head_shards``;
      ``n * head_shards`` for all-gather).
    skipped: how many of them do no attention (including those of steps not run).
    implementation, config: passed to every call.
  """

  spec: common.Spec
  cp: config_lib.ContextParallel
  strategy: str
  q_layout: config_lib.Layout
  kv_layout: config_lib.Layout
  num_steps: int
  branches: tuple[tuple[Call, ...], ...]
  table: np.ndarray
  device_steps: int
  skipped: int
  implementation: str | None
  config: object

  @property
  def computed(self) -> int:
    return self.device_steps - self.skipped

  @property
  def num_calls(self) -> int:
    """Attention calls run over all devices and steps (forward)."""
    sizes = np.asarray([len(b) for b in self.branches])
    return int(sizes[self.table].sum())


def _head_shard_count(spec: common.Spec, cp: config_lib.ContextParallel) -> int:
  # A head-independent mask is the same for every head shard: one table column serves them all.
  return cp.head_shards if spec.mask.depends_on_head else 1


def _classify(spec: common.Spec, cp: config_lib.ContextParallel, q_chunk: int, kv_chunk: int):
  """``[head_shards, Tq / q_chunk, Tk / kv_chunk]`` kinds of the global chunk pairs."""
  ctx = spec.mask_context
  nq, nk = spec.q_len // q_chunk, spec.kv_len // kv_chunk
  q_starts, kv_starts = np.arange(nq) * q_chunk, np.arange(nk) * kv_chunk
  may, must = shifted.rectangle_bounds(spec.mask, ctx, q_starts, q_chunk, kv_starts, kv_chunk)
  hs = _head_shard_count(spec, cp)
  local_heads = spec.num_q_heads // cp.head_shards
  kinds = np.where(must, FULL, np.where(may, PARTIAL, EMPTY)).astype(np.int32)
  kinds = np.repeat(kinds[None], hs, axis=0)
  for a, b in zip(*np.nonzero(may & ~must)):
    for h in range(hs):
      local = shifted.shift(spec.mask, q_starts[a], kv_starts[b], h * local_heads, ctx, q_chunk, kv_chunk)
      bm = block_mask_lib.make_block_mask(local, q_chunk, kv_chunk, min(q_chunk, _CLASSIFY_BLOCK),
                                          min(kv_chunk, _CLASSIFY_BLOCK),
                                          local_heads if local.depends_on_head else None)
      if bm.num_nonempty == 0:
        kinds[h, a, b] = EMPTY
      elif bm.num_full == bm.num_tiles:
        kinds[h, a, b] = FULL
  return kinds


def _work(kinds: np.ndarray, q_layout: config_lib.Layout, per_device_chunks) -> float:
  """Largest per-device work (FULL = 1, PARTIAL = 0.5 per chunk pair) of a chunk assignment."""
  weight = np.where(kinds == FULL, 1.0, np.where(kinds == PARTIAL, _PARTIAL_WORK, 0.0)).max(0)
  return max(weight[list(per_device_chunks(d))].sum() for d in range(q_layout.devices))


def _choose_pieces(spec: common.Spec, cp: config_lib.ContextParallel) -> int:
  n = cp.size
  if cp.load_balance == "zigzag":
    return 2
  if cp.load_balance == "contiguous" or n == 1:
    return 1
  if spec.q_len % (2 * n) or spec.kv_len % (2 * n):
    return 1
  kinds = _classify(spec, cp, spec.q_len // (2 * n), spec.kv_len // (2 * n))
  zig = config_lib.Layout(spec.q_len, n, 2)
  contiguous = _work(kinds, zig, lambda d: (2 * d, 2 * d + 1))
  zigzag = _work(kinds, zig, zig.chunks)
  return 2 if contiguous > _ZIGZAG_GAIN * zigzag else 1


def _ring_calls(spec, kinds_h, q_layout, kv_layout, i, j, head_offset):
  """Calls of device ``i`` holding the K/V chunks of device ``j``."""
  ctx = spec.mask_context
  cq, ck = q_layout.chunk, kv_layout.chunk
  qc, kc = q_layout.chunks(i), kv_layout.chunks(j)
  sub = kinds_h[np.ix_(qc, kc)]
  full = masks_lib.full()
  if (sub == FULL).all():
    return (Call(0, len(qc) * cq, 0, len(kc) * ck, full),)
  calls = []
  for a, row in enumerate(sub):
    if (row == EMPTY).all():
      continue
    if (row == FULL).all():
      calls.append(Call(a * cq, (a + 1) * cq, 0, len(kc) * ck, full))
      continue
    for b, kind in enumerate(row):
      if kind == EMPTY:
        continue
      mask = full if kind == FULL else shifted.shift(spec.mask, qc[a] * cq, kc[b] * ck, head_offset, ctx, cq, ck)
      calls.append(Call(a * cq, (a + 1) * cq, b * ck, (b + 1) * ck, mask))
  return tuple(calls)


def _gather_calls(spec, kinds_h, q_layout, kv_layout, i, head_offset):
  """Calls of device ``i`` against the gathered K/V in natural order: one per query piece,
  over the range of key chunks it sees."""
  ctx = spec.mask_context
  cq, ck = q_layout.chunk, kv_layout.chunk
  calls = []
  for a, chunk in enumerate(q_layout.chunks(i)):
    row = kinds_h[chunk]
    seen = np.nonzero(row != EMPTY)[0]
    if not seen.size:
      continue
    lo, hi = int(seen[0]), int(seen[-1]) + 1
    if (row[lo:hi] == FULL).all():
      mask = masks_lib.full()
    else:
      mask = shifted.shift(spec.mask, chunk * cq, lo * ck, head_offset, ctx, cq, (hi - lo) * ck)
    calls.append(Call(a * cq, (a + 1) * cq, lo * ck, hi * ck, mask))
  return tuple(calls)


def _config_blocks(config):
  return getattr(config, "block_q", None), getattr(config, "block_kv", None)


def make_plan(spec: common.Spec, cp: config_lib.ContextParallel, implementation=None, config=None) -> Plan:
  """The static schedule (memoised). Raises ValueError for lengths that do not split."""
  key = (spec, cp, implementation, config)
  try:
    return _PLANS[key]
  except KeyError:
    pass
  except TypeError:  # an unhashable config: plan without memoising
    key = None
  n = cp.size
  for name, length in (("q_len", spec.q_len), ("kv_len", spec.kv_len)):
    config_lib.check_length(cp, name, length, 1)
  pieces = _choose_pieces(spec, cp)
  bq, bk = _config_blocks(config)
  config_lib.check_length(cp, "q_len", spec.q_len, pieces, bq, "block_q")
  config_lib.check_length(cp, "kv_len", spec.kv_len, pieces, bk, "block_kv")
  q_layout = config_lib.Layout(spec.q_len, n, pieces)
  kv_layout = config_lib.Layout(spec.kv_len, n, pieces)
  kinds = _classify(spec, cp, q_layout.chunk, kv_layout.chunk)
  hs = kinds.shape[0]
  local_heads = spec.num_q_heads // cp.head_shards

  ids: dict[tuple[Call, ...], int] = {}
  def branch_id(calls):
    return ids.setdefault(calls, len(ids))

  if cp.strategy == "ring":
    full_table = np.zeros((n, n, hs), np.int32)
    for s in range(n):
      for i in range(n):
        for h in range(hs):
          calls = _ring_calls(spec, kinds[h], q_layout, kv_layout, i, (i - s) % n, h * local_heads)
          full_table[s, i, h] = branch_id(calls)
    branches = tuple(ids)
    empty = np.asarray([len(b) == 0 for b in branches])
    busy = np.nonzero(~empty[full_table].all((1, 2)))[0]
    num_steps = int(busy[-1]) + 1 if busy.size else 1
    table = full_table[:num_steps]
    skipped = int(empty[full_table].sum())
  else:
    table = np.zeros((1, n, hs), np.int32)
    for i in range(n):
      for h in range(hs):
        table[0, i, h] = branch_id(_gather_calls(spec, kinds[h], q_layout, kv_layout, i, h * local_heads))
    branches = tuple(ids)
    num_steps = 1
    skipped = int(np.asarray([len(b) == 0 for b in branches])[table].sum())
  table.setflags(write=False)
  plan = Plan(spec, cp, cp.strategy, q_layout, kv_layout, num_steps, branches, table,
              table.shape[1] * table.shape[2] * (n if cp.strategy == "ring" else 1), skipped,
              implementation, config)
  if key is not None:
    if len(_PLANS) >= _MAX_PLANS:
      del _PLANS[next(iter(_PLANS))]  # the oldest
    _PLANS[key] = plan
  return plan


_PLANS: dict = {}
_MAX_PLANS = 256


def _check_shapes(plan: Plan, q, k):
  cp, s = plan.cp, plan.spec
  config_lib.check_divides(cp, "batch", q.shape[0], cp.batch_axes, cp.batch_shards)
  config_lib.check_divides(cp, "q heads", s.num_q_heads, cp.head_axes, cp.head_shards)
  config_lib.check_divides(cp, "k/v heads", s.num_kv_heads, cp.head_axes, cp.head_shards)


def attention(q, k, v, sinks, q_segment_ids, kv_segment_ids, *, spec: common.Spec,
              cp: config_lib.ContextParallel, implementation=None, config=None):
  """Context-parallel :func:`attn_jax.attention`; returns ``(out, lse)`` like a backend."""
  if getattr(config, "sharding", None) is not None:
    raise ValueError("config.sharding must be None with context_parallel: batch and head sharding come "
                     "from ContextParallel.batch_axes / head_axes")
  plan = make_plan(spec, cp, implementation, config)
  _check_shapes(plan, q, k)
  return _cp_attention(plan, q, k, v, sinks, q_segment_ids, kv_segment_ids)


def _specs(plan: Plan):
  cp = plan.cp
  x = cp.spec("batch", "seq", "heads", None)
  seg = cp.spec("batch", "seq")
  rows = cp.spec("batch", "seq", "heads")
  sink = cp.spec("heads")
  return x, seg, rows, sink


def _call_attention(plan: Plan, call: Call, q, q_seg, k, v, kv_seg):
  s = plan.spec
  qs = q[:, call.q_lo:call.q_hi]
  segs = {}
  if s.has_segments:
    segs = dict(q_segment_ids=q_seg[:, call.q_lo:call.q_hi], kv_segment_ids=kv_seg[:, call.k_lo:call.k_hi])

  def f(qs, ks, vs):
    return softmax_api.attention(qs, ks, vs, mask=call.mask, scale=s.scale,
                                 logits_soft_cap=s.logits_soft_cap, implementation=plan.implementation,
                                 config=plan.config, return_lse=True, **segs)
  return f, (qs, k[:, call.k_lo:call.k_hi], v[:, call.k_lo:call.k_hi])


def _merge(acc, lse, o, l):
  """Log-sum-exp merge of normalised partial outputs; rows with ``lse = -inf`` weigh nothing."""
  new = jnp.logaddexp(lse, l)
  safe = jnp.where(jnp.isfinite(new), new, 0.0)
  w_old = jnp.where(jnp.isfinite(lse), jnp.exp(lse - safe), 0.0)
  w_new = jnp.where(jnp.isfinite(l), jnp.exp(l - safe), 0.0)
  return acc * w_old[..., None] + o.astype(jnp.float32) * w_new[..., None], new


def _forward_branch(plan: Plan, calls, acc, lse, q, q_seg, k, v, kv_seg):
  for call in calls:
    f, args = _call_attention(plan, call, q, q_seg, k, v, kv_seg)
    o, l = f(*args)
    rows = slice(call.q_lo, call.q_hi)
    a, m = _merge(acc[:, rows], lse[:, rows], o, l)
    acc = acc.at[:, rows].set(a)
    lse = lse.at[:, rows].set(m)
  return acc, lse


def _backward_branch(plan: Plan, calls, dq, dk, dv, q, q_seg, k, v, kv_seg, d_out, lse, delta):
  for call in calls:
    f, args = _call_attention(plan, call, q, q_seg, k, v, kv_seg)
    (o, l), vjp = jax.vjp(f, *args)
    rows = slice(call.q_lo, call.q_hi)
    big = lse[:, rows]
    w = jnp.where(jnp.isfinite(l), jnp.exp(l - jnp.where(jnp.isfinite(big), big, 0.0)), 0.0)
    do = d_out[:, rows].astype(jnp.float32)
    do_c = (w[..., None] * do).astype(o.dtype)
    dl_c = w * (jnp.sum(do * o.astype(jnp.float32), axis=-1) - delta[:, rows])
    gq, gk, gv = vjp((do_c, dl_c))
    keys = slice(call.k_lo, call.k_hi)
    dq = dq.at[:, rows].add(gq.astype(jnp.float32))
    dk = dk.at[:, keys].add(gk.astype(jnp.float32))
    dv = dv.at[:, keys].add(gv.astype(jnp.float32))
  return dq, dk, dv


def _branch_index(plan: Plan, step):
  cp = plan.cp
  table = jnp.asarray(plan.table)
  head = cp.head_index() if plan.table.shape[2] > 1 else 0
  return table[step, lax.axis_index(cp.axis_name), head]


def _switch(plan: Plan, step, make, *operands):
  """Runs the branch of (step, this device); static when every entry is the same branch."""
  fns = [functools.partial(make, plan, calls) for calls in plan.branches]
  index = _branch_index(plan, step) if len(fns) > 1 else None
  return config_lib.switch(index, fns, *operands,
                           run_all=config_lib.kernels_synchronise(plan.implementation, plan.config))


def _gather_kv(plan: Plan, k, v, kv_seg):
  """All-gathered K/V (and key segment ids) in natural token order."""
  cp, lay = plan.cp, plan.kv_layout
  order = np.argsort(lay.gathered_order())  # natural chunk c sits at gathered position order[c]

  def gather(x):
    if x is None:
      return None
    g = lax.all_gather(x, cp.axis_name, axis=1, tiled=True)
    if lay.pieces == 1:
      return g
    g = g.reshape(g.shape[:1] + (lay.num_chunks, lay.chunk) + g.shape[2:])
    g = jnp.take(g, jnp.asarray(order), axis=1)
    return g.reshape(g.shape[:1] + (lay.length,) + g.shape[3:])

  return gather(k), gather(v), gather(kv_seg)


def _scatter_grad(plan: Plan, g):
  """Transpose of :func:`_gather_kv` for a gradient in natural order: back to each owner, summed."""
  cp, lay = plan.cp, plan.kv_layout
  if lay.pieces > 1:
    g = g.reshape(g.shape[:1] + (lay.num_chunks, lay.chunk) + g.shape[2:])
    g = jnp.take(g, jnp.asarray(lay.gathered_order()), axis=1)
    g = g.reshape(g.shape[:1] + (lay.length,) + g.shape[3:])
  return lax.psum_scatter(g, cp.axis_name, scatter_dimension=1, tiled=True)


def _local_forward(plan: Plan, q, k, v, sinks, q_seg, kv_seg):
  """Per device, internal layout: ``(acc [B, Lq, H, Dv] float32, lse [B, Lq, H])``."""
  s, cp = plan.spec, plan.cp
  rows = q.shape[:3]
  if sinks is None:
    lse = jnp.full(rows, -jnp.inf, jnp.float32)
  else:
    # The sink joins every row's denominator once: it is the merge's starting point.
    lse = jnp.broadcast_to(sinks.astype(jnp.float32)[None, None, :], rows)
  acc = jnp.zeros(rows + (s.v_head_dim,), jnp.float32)
  if plan.strategy == "all_gather":
    k, v, kv_seg = _gather_kv(plan, k, v, kv_seg)
    return _switch(plan, 0, _forward_branch, acc, lse, q, q_seg, k, v, kv_seg)

  def step(t, acc, lse, kv):
    return _switch(plan, t, _forward_branch, acc, lse, q, q_seg, *kv)

  kv = (k, v, kv_seg)
  if plan.num_steps > 1:
    def body(t, carry):
      acc, lse, kv = carry
      # Issued before the step's compute, which does not depend on it, so that XLA can overlap
      # the transfer of the next block with the attention on this one.
      nxt = jax.tree.map(lambda x: config_lib.ring_shift(x, cp.axis_name, cp.size), kv)
      acc, lse = step(t, acc, lse, kv)
      return acc, lse, nxt
    acc, lse, kv = lax.fori_loop(0, plan.num_steps - 1, body, (acc, lse, kv))
  return step(plan.num_steps - 1, acc, lse, kv)


def _local_backward(plan: Plan, q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse):
  cp = plan.cp
  # delta_i = dO_i . O_i - dLSE_i, the row term of the softmax Jacobian (see the xla backend).
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse
  dq = jnp.zeros(q.shape, jnp.float32)
  if plan.strategy == "all_gather":
    kg, vg, sg = _gather_kv(plan, k, v, kv_seg)
    dq, dk, dv = _switch(plan, 0, _backward_branch, dq, jnp.zeros(kg.shape, jnp.float32),
                         jnp.zeros(vg.shape, jnp.float32), q, q_seg, kg, vg, sg, d_out, lse, delta)
    return dq, _scatter_grad(plan, dk), _scatter_grad(plan, dv)

  def step(t, dq, dkv, kv):
    dq, dk, dv = _switch(plan, t, _backward_branch, dq, *dkv, q, q_seg, *kv, d_out, lse, delta)
    return dq, (dk, dv)

  kv = (k, v, kv_seg)
  dkv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  shift = functools.partial(config_lib.ring_shift, axis_name=cp.axis_name, devices=cp.size)
  if plan.num_steps > 1:
    def body(t, carry):
      dq, dkv, kv = carry
      nxt = jax.tree.map(shift, kv)
      dq, dkv = step(t, dq, dkv, kv)
      # The gradient of a K/V block travels with the block.
      return dq, jax.tree.map(shift, dkv), nxt
    dq, dkv, kv = lax.fori_loop(0, plan.num_steps - 1, body, (dq, dkv, kv))
  dq, dkv = step(plan.num_steps - 1, dq, dkv, kv)
  # After num_steps - 1 hops, each block's gradient goes back to the block's owner.
  dk, dv = jax.tree.map(lambda x: shift(x, shift=-(plan.num_steps - 1)), dkv)
  return dq, dk, dv


def _forward_mapped(plan: Plan, q, k, v, sinks, q_seg, kv_seg):
  """Global in/out: natural order in, natural ``(out, lse)`` out, plus the residuals (a dict of
  global arrays in the internal token order)."""
  cp = plan.cp
  x, seg, rows, sink = _specs(plan)
  ql, kl = plan.q_layout, plan.kv_layout

  def body(q, k, v, sinks, q_seg, kv_seg):
    res = dict(q=config_lib.to_internal(q, ql, cp.axis_name), k=config_lib.to_internal(k, kl, cp.axis_name),
               v=config_lib.to_internal(v, kl, cp.axis_name))
    if q_seg is not None:
      res.update(q_seg=config_lib.to_internal(q_seg, ql, cp.axis_name),
                 kv_seg=config_lib.to_internal(kv_seg, kl, cp.axis_name))
    acc, lse = _local_forward(plan, res["q"], res["k"], res["v"], sinks, res.get("q_seg"), res.get("kv_seg"))
    res.update(out=acc.astype(q.dtype), lse=lse)
    out = config_lib.to_natural(res["out"], ql, cp.axis_name)
    return out, config_lib.to_natural(lse, ql, cp.axis_name), res

  res_specs = dict(q=x, k=x, v=x, out=x, lse=rows)
  if q_seg is not None:
    res_specs.update(q_seg=seg, kv_seg=seg)
  return cp.shard_map(body, (x, x, x, sink, seg, seg), (x, rows, res_specs),
                      (q, k, v, sinks, q_seg, kv_seg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cp_attention(plan: Plan, q, k, v, sinks, q_seg, kv_seg):
  out, lse, _ = _forward_mapped(plan, q, k, v, sinks, q_seg, kv_seg)
  return out, lse


def _cp_fwd(plan, q, k, v, sinks, q_seg, kv_seg):
  out, lse, res = _forward_mapped(plan, q, k, v, sinks, q_seg, kv_seg)
  return (out, lse), (res, sinks)


def _cp_bwd(plan: Plan, residuals, cotangents):
  res, sinks = residuals
  d_out, d_lse = cotangents
  cp = plan.cp
  x, seg, rows, sink = _specs(plan)
  ql, kl = plan.q_layout, plan.kv_layout
  res_specs = {name: {"lse": rows, "q_seg": seg, "kv_seg": seg}.get(name, x) for name in res}

  def body(res, sinks, d_out, d_lse):
    do = config_lib.to_internal(d_out, ql, cp.axis_name)
    dl = config_lib.to_internal(d_lse, ql, cp.axis_name)
    dq, dk, dv = _local_backward(plan, res["q"], res["k"], res["v"], res.get("q_seg"), res.get("kv_seg"),
                                 res["out"], res["lse"], do, dl)
    grads = (config_lib.to_natural(dq.astype(res["q"].dtype), ql, cp.axis_name),
             config_lib.to_natural(dk.astype(res["k"].dtype), kl, cp.axis_name),
             config_lib.to_natural(dv.astype(res["v"].dtype), kl, cp.axis_name))
    if sinks is None:
      return grads
    # d sink_h = -sum_i p_sink_i delta_i over every row of head h: the local rows here, the
    # other sequence and batch shards through the psum.
    delta = jnp.sum(do.astype(jnp.float32) * res["out"].astype(jnp.float32), -1) - dl
    p_sink = jnp.exp(sinks.astype(jnp.float32)[None, None, :] - res["lse"])
    ds = lax.psum(-(p_sink * delta).sum((0, 1)), (cp.axis_name,) + cp.batch_axes)
    return grads + (ds.astype(sinks.dtype),)

  out_specs = (x, x, x) if sinks is None else (x, x, x, sink)
  grads = cp.shard_map(body, (res_specs, sink, x, rows), out_specs, (res, sinks, d_out, d_lse))
  d_sinks = None if sinks is None else grads[3]
  return grads[0], grads[1], grads[2], d_sinks, None, None


_cp_attention.defvjp(_cp_fwd, _cp_bwd)
