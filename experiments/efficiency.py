"""Speed and compiled memory of attention mechanisms vs sequence length, in CAB's four patterns.

A *mechanism* is a named way of computing attention (a primitive, a backend, a mask); new
mechanisms join by appending to :data:`MECHANISMS`. Each measurement compiles the mechanism for
one (pattern, length, mode) and records:

* ``time_ms``, ``time_min_ms``, ``time_max_ms``: median, minimum and maximum wall time of the
  compiled call over its timed runs (:func:`time_and_memory`: ``repeats`` runs after one warm-up,
  at least :data:`MIN_RUNS`; on a CPU, :data:`MIN_RUNS` when the warm-up took over a second);
* ``spread``: ``(max - min) / median``; above :data:`NOISY_SPREAD` the measurement is re-run once
  and, if still above, marked ``noisy`` (a busy machine, not the mechanism);
* ``temp_mib``: XLA's compiled temporary memory (``memory_analysis().temp_size_in_bytes``),
  the scratch a call needs beyond its inputs and outputs: the quantity that grows as
  ``seq^2`` for materialised attention (deterministic: no spread);
* ``cost_s``: what the cell cost the benchmark (compile + every run), for budgeting.

The dense baseline is ``jax.nn.dot_product_attention`` with its default implementation (what a
user would otherwise call; ``xla`` on a CPU). The naive reference oracle is not timed: every
mechanism declares its ``reference`` (the same computation with ``implementation="reference"``),
and :func:`check_against_reference` compares the two.

CAB's *efficiency length* of a mechanism is the shortest measured length from which it is
faster (resp. smaller) than the dense baseline at that and every longer measured length; for
time, lengths where either measurement is noisy are left out of the comparison (and listed).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import attn_jax
from attn_jax import masks
from attn_jax import mechanisms

# CAB's four attention patterns. Cross patterns attend from q_len = L queries to kv_len = L // 2
# keys; causal cross aligns the last query with the last key (bottom-right).
PATTERNS = {
    "noncausal_self": dict(cross=False, causal=False),
    "causal_self": dict(cross=False, causal=True),
    "noncausal_cross": dict(cross=True, causal=False),
    "causal_cross": dict(cross=True, causal=True),
}
MODES = ("fwd", "fwd_bwd")

# A timing whose (max - min) / median exceeds this is marked noisy.
NOISY_SPREAD = 0.25
# Timed runs of every measurement: a median and a spread need at least three.
MIN_RUNS = 3


@dataclasses.dataclass(frozen=True)
class Mechanism:
  """A benchmarked attention variant.

  Attributes:
    name: row label in the report.
    fn: ``fn(q, k, v, causal) -> out`` in the ``[B, T, H, D]`` layout.
    baseline: True for the dense attention that efficiency lengths are measured against.
    patterns: the CAB patterns the mechanism has a form for (None: all four); the benchmark
      skips the others.
    reference: the same computation by the naive oracle (same signature), for
      :func:`check_against_reference`; never timed.
    quality: the quality-suite mechanism (``experiments.mechanisms`` name) whose MQAR accuracy
      stands for this one in the report's recommendation; None: its quality is not measured.
  """

  name: str
  fn: Callable[..., jax.Array]
  baseline: bool = False
  patterns: tuple[str, ...] | None = None
  reference: Callable[..., jax.Array] | None = None
  quality: str | None = None

  def supports(self, pattern: str) -> bool:
    return self.patterns is None or pattern in self.patterns


def _softmax(implementation, window=None, sinks=0):
  def fn(q, k, v, causal):
    mask = masks.causal() if causal else None
    if window is not None:
      local = masks.sliding_window(window - 1) if causal else masks.sliding_window(window // 2, window // 2)
      if sinks:
        local = local | masks.sink_tokens(sinks, causal=causal)
      mask = local if mask is None else mask & local
    return attn_jax.attention(q, k, v, mask=mask, implementation=implementation)
  return fn


def _linear(implementation, lightning=False):
  """Linear attention: elu+1 features, normalised (Katharopoulos et al.), or Lightning's decays.

  Causal cross attention (q and k/v of different lengths) has no linear-attention form, and a
  decay orders the tokens, so Lightning has the causal self pattern only.
  """
  def fn(q, k, v, causal):
    if lightning:
      slopes = mechanisms.lightning_slopes(k.shape[2])
      return mechanisms.lightning_attention(q, k, v, slopes, implementation=implementation)
    return attn_jax.linear_attention(q, k, v, feature_map="elu_plus_one", normalize=True, causal=causal,
                                     implementation=implementation)
  return fn


def _dense(q, k, v, causal):
  """``jax.nn.dot_product_attention`` (default implementation) with this project's conventions.

  Causal attention here is bottom-right aligned (query ``i`` sees key ``j <= i + kv_len -
  q_len``) and a query that sees no key returns zeros; jax's ``is_causal`` is top-left aligned.
  For ``q_len >= kv_len`` the two agree on the last ``kv_len`` queries, which form a square
  causal problem; the earlier queries see nothing.
  """
  tq, tk = q.shape[1], k.shape[1]
  if not causal or tq == tk:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  if tq < tk:
    raise NotImplementedError(f"causal dense baseline needs q_len >= kv_len, got {tq} < {tk}")
  out = jax.nn.dot_product_attention(q[:, tq - tk:], k, v, is_causal=True)
  return jnp.pad(out, ((0, 0), (tq - tk, 0), (0, 0), (0, 0)))


_LINEAR_PATTERNS = ("noncausal_self", "causal_self", "noncausal_cross")

MECHANISMS = [
    Mechanism("dense (jax.nn)", _dense, baseline=True, reference=_softmax("reference"), quality="softmax"),
    Mechanism("flash (xla)", _softmax("xla"), reference=_softmax("reference"), quality="softmax"),
    # The quality suite's sliding window is a quarter of its 64-token task; no sinks.
    Mechanism("window256+4sinks (xla)", _softmax("xla", window=256, sinks=4),
              reference=_softmax("reference", window=256, sinks=4), quality="sliding_window"),
    Mechanism("linear elu+1 (xla)", _linear("xla"), patterns=_LINEAR_PATTERNS,
              reference=_linear("reference"), quality="linear"),
    Mechanism("lightning (xla)", _linear("xla", lightning=True), patterns=("causal_self",),
              reference=_linear("reference", lightning=True)),
]


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int = 1
  heads: int = 4
  kv_heads: int = 4
  head_dim: int = 64
  dtype: str = "float32"


def _inputs(shape: Shape, q_len: int, kv_len: int):
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  dt = jnp.dtype(shape.dtype)
  q = jax.random.normal(ks[0], (shape.batch, q_len, shape.heads, shape.head_dim), dt)
  k = jax.random.normal(ks[1], (shape.batch, kv_len, shape.kv_heads, shape.head_dim), dt)
  v = jax.random.normal(ks[2], (shape.batch, kv_len, shape.kv_heads, shape.head_dim), dt)
  return q, k, v


def summarize_times(times_s) -> dict:
  """Median, min, max (ms), relative spread and the noisy flag of timed runs (seconds)."""
  times = [1e3 * t for t in times_s]
  if not times:
    raise ValueError("times_s must hold at least one timed run, got none")
  median = statistics.median(times)
  spread = (max(times) - min(times)) / median if median > 0 else 0.0
  return dict(time_ms=median, time_min_ms=min(times), time_max_ms=max(times), runs=len(times),
              spread=spread, noisy=spread > NOISY_SPREAD)


def time_and_memory(fn, args, repeats: int) -> dict:
  """Compiles ``fn(*args)``; returns its compiled temporary memory and timing statistics.

  ``repeats`` timed runs follow one warm-up (at least :data:`MIN_RUNS`; exactly that many on a
  CPU when the warm-up took over a second, which keeps the long dense cases of the embedded
  default affordable). A noisy batch (spread above :data:`NOISY_SPREAD`) is timed once more and
  the batch with the smaller spread is kept: a transient load spike then costs one retry, a
  persistently busy machine leaves the measurement marked ``noisy``.
  """
  start_cell = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  out = {"temp_mib": mem.temp_size_in_bytes / 2**20 if mem is not None else math.nan}
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  runs = max(MIN_RUNS, repeats)
  if jax.devices()[0].platform == "cpu" and time.perf_counter() - start > 1.0:
    runs = MIN_RUNS

  def batch():
    times = []
    for _ in range(runs):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - t0)
    return summarize_times(times)

  stats = batch()
  if stats["noisy"]:
    again = batch()
    stats = min(stats, again, key=lambda s: s["spread"])
    stats["retried"] = True
  out.update(stats)
  out["cost_s"] = time.perf_counter() - start_cell
  return out


def _pattern_inputs(pattern: str, seq_len: int, shape: Shape):
  kv_len = max(1, seq_len // 2) if PATTERNS[pattern]["cross"] else seq_len
  return kv_len, _inputs(shape, seq_len, kv_len)


def measure(mech: Mechanism, pattern: str, seq_len: int, mode: str, shape: Shape, repeats: int) -> dict:
  """One measurement; returns a JSON-ready record (``error`` set if the mechanism failed)."""
  causal = PATTERNS[pattern]["causal"]
  kv_len, (q, k, v) = _pattern_inputs(pattern, seq_len, shape)
  record = dict(mechanism=mech.name, pattern=pattern, seq_len=seq_len, kv_len=kv_len, mode=mode)

  def fwd(q, k, v):
    return mech.fn(q, k, v, causal)

  if mode == "fwd":
    fn = fwd
  else:
    fn = jax.grad(lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  try:
    record.update(time_and_memory(fn, (q, k, v), repeats))
  except Exception as e:  # A mechanism that cannot run a case is reported, not fatal.
    record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return record


def check_against_reference(mech: Mechanism, pattern: str, seq_len: int, shape: Shape) -> dict:
  """Max |mechanism - its reference oracle| of the forward output, relative to max |reference|.

  Returns a JSON-ready record: ``max_abs_err`` and ``max_rel_err`` (None without a reference),
  or ``error``.
  """
  causal = PATTERNS[pattern]["causal"]
  _, (q, k, v) = _pattern_inputs(pattern, seq_len, shape)
  record = dict(mechanism=mech.name, pattern=pattern, seq_len=seq_len, max_abs_err=None, max_rel_err=None)
  if mech.reference is None:
    return record
  try:
    got = np.asarray(jax.jit(lambda q, k, v: mech.fn(q, k, v, causal))(q, k, v), np.float64)
    want = np.asarray(jax.jit(lambda q, k, v: mech.reference(q, k, v, causal))(q, k, v), np.float64)
    err = float(np.abs(got - want).max())
    record.update(max_abs_err=err, max_rel_err=err / max(float(np.abs(want).max()), 1e-30))
  except Exception as e:  # Reported in the report, not fatal.
    record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return record


def baseline_name() -> str:
  return next(m.name for m in MECHANISMS if m.baseline)


def efficiency_lengths(records: list[dict], baseline: str | None = None) -> list[dict]:
  """CAB efficiency lengths per (mechanism, pattern, mode) against the baseline mechanism.

  For time, a length where the mechanism's or the baseline's measurement is noisy decides
  nothing: it is skipped and listed in ``time_noisy_lengths``. Memory is deterministic.
  """
  baseline = baseline or baseline_name()
  index = {(r["mechanism"], r["pattern"], r["mode"], r["seq_len"]): r for r in records}
  out = []
  # In the records' order (the suite's pattern and mechanism order).
  keys = dict.fromkeys((r["mechanism"], r["pattern"], r["mode"]) for r in records if r["mechanism"] != baseline)
  for mech, pattern, mode in keys:
    lens = sorted(r["seq_len"] for r in records if (r["mechanism"], r["pattern"], r["mode"]) == (mech, pattern, mode))
    row = dict(mechanism=mech, pattern=pattern, mode=mode)
    for metric, field in (("time", "time_ms"), ("memory", "temp_mib")):
      decided = []  # (length, win)
      noisy = []
      for n in lens:
        a, b = index.get((mech, pattern, mode, n)), index.get((baseline, pattern, mode, n))
        if metric == "time" and a is not None and b is not None and (a.get("noisy") or b.get("noisy")):
          noisy.append(n)
          continue
        decided.append((n, a is not None and b is not None and field in a and field in b and a[field] < b[field]))
      # The shortest length from which the mechanism wins at every longer decided length.
      first = None
      for n, win in reversed(decided):
        if not win:
          break
        first = n
      row[f"{metric}_efficiency_length"] = first
      if metric == "time":
        row["time_noisy_lengths"] = noisy
    out.append(row)
  return out
