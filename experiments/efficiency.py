"""Speed and compiled memory of attention mechanisms vs sequence length, in CAB's four patterns.

A *mechanism* is a named way of computing attention (a primitive, a backend, a mask); new
mechanisms join by appending to :data:`MECHANISMS`. Each measurement compiles the mechanism for
one (pattern, length, mode) and records:

* ``time_ms``: median wall time of the compiled call over ``repeats`` runs (after one warm-up;
  on a CPU, one run when the warm-up took over a second);
* ``temp_mib``: XLA's compiled temporary memory (``memory_analysis().temp_size_in_bytes``),
  the scratch a call needs beyond its inputs and outputs: the quantity that grows as
  ``seq^2`` for materialised attention.

CAB's *efficiency length* of a mechanism is the shortest measured length from which it is
faster (resp. smaller) than the dense baseline at that and every longer measured length.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp

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


@dataclasses.dataclass(frozen=True)
class Mechanism:
  """A benchmarked attention variant.

  Attributes:
    name: row label in the report.
    fn: ``fn(q, k, v, causal) -> out`` in the ``[B, T, H, D]`` layout.
    baseline: True for the dense reference that efficiency lengths are measured against.
    patterns: the CAB patterns the mechanism has a form for (None: all four); the benchmark
      skips the others.
  """

  name: str
  fn: Callable[..., jax.Array]
  baseline: bool = False
  patterns: tuple[str, ...] | None = None

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


MECHANISMS = [
    Mechanism("dense (reference)", _softmax("reference"), baseline=True),
    Mechanism("flash (xla)", _softmax("xla")),
    Mechanism("window256+4sinks (xla)", _softmax("xla", window=256, sinks=4)),
    Mechanism("linear elu+1 (xla)", _linear("xla"), patterns=("noncausal_self", "causal_self", "noncausal_cross")),
    Mechanism("lightning (xla)", _linear("xla", lightning=True), patterns=("causal_self",)),
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


def measure(mech: Mechanism, pattern: str, seq_len: int, mode: str, shape: Shape, repeats: int) -> dict:
  """One measurement; returns a JSON-ready record (``error`` set if the mechanism failed)."""
  p = PATTERNS[pattern]
  kv_len = max(1, seq_len // 2) if p["cross"] else seq_len
  q, k, v = _inputs(shape, seq_len, kv_len)
  record = dict(mechanism=mech.name, pattern=pattern, seq_len=seq_len, kv_len=kv_len, mode=mode)

  def fwd(q, k, v):
    return mech.fn(q, k, v, p["causal"])

  if mode == "fwd":
    fn = fwd
  else:
    fn = jax.grad(lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  try:
    compiled = jax.jit(fn).lower(q, k, v).compile()
    mem = compiled.memory_analysis()
    record["temp_mib"] = mem.temp_size_in_bytes / 2**20 if mem is not None else math.nan
    start = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    # On a CPU a call that takes over a second varies little between runs: one timed run is
    # enough, which keeps the embedded default's long dense cases affordable. Accelerators keep
    # every repeat (a first call there can include one-time autotuning).
    if q.devices().pop().platform == "cpu" and time.perf_counter() - start > 1.0:
      repeats = 1
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(q, k, v))
      times.append(time.perf_counter() - start)
    record["time_ms"] = 1e3 * statistics.median(times)
  except Exception as e:  # A mechanism that cannot run a case is reported, not fatal.
    record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return record


def efficiency_lengths(records: list[dict]) -> list[dict]:
  """CAB efficiency lengths per (mechanism, pattern, mode) against the baseline mechanism."""
  baseline = next(m.name for m in MECHANISMS if m.baseline)
  index = {(r["mechanism"], r["pattern"], r["mode"], r["seq_len"]): r for r in records}
  out = []
  keys = sorted({(r["mechanism"], r["pattern"], r["mode"]) for r in records if r["mechanism"] != baseline})
  for mech, pattern, mode in keys:
    lens = sorted(r["seq_len"] for r in records if (r["mechanism"], r["pattern"], r["mode"]) == (mech, pattern, mode))
    row = dict(mechanism=mech, pattern=pattern, mode=mode)
    for metric, field in (("time", "time_ms"), ("memory", "temp_mib")):
      wins = []
      for n in lens:
        a, b = index.get((mech, pattern, mode, n)), index.get((baseline, pattern, mode, n))
        wins.append(a is not None and b is not None and field in a and field in b and a[field] < b[field])
      # The shortest length from which the mechanism wins at every longer measured length.
      first = None
      for n, win in zip(reversed(lens), reversed(wins)):
        if not win:
          break
        first = n
      row[f"{metric}_efficiency_length"] = first
    out.append(row)
  return out
