"""Speed and compiled memory of token mixers vs sequence length, in CAB's four patterns.

The mechanisms are the efficiency presets of the mixer registry
(:func:`attn_jax.layers.registry.efficiency_presets`): each names a mixer and its fields, so a
new mechanism joins by declaring a preset in its own module. Each measurement builds the mixer's
layer (heads and head dim from :class:`Shape`, no RoPE) and compiles it for one (pattern,
length, mode): self patterns call the layer on ``x [B, L, heads * head_dim]`` (``causal=False``
for the non-causal one), cross patterns the entry's cross layer on ``x`` and a memory of
``L // 2`` tokens; ``fwd_bwd`` differentiates with respect to the input(s) and the parameters.
Recorded:

* ``time_ms``, ``time_min_ms``, ``time_max_ms``: median, minimum and maximum wall time of the
  compiled call over its timed runs (:func:`time_and_memory`: ``repeats`` runs after one warm-up,
  at least :data:`MIN_RUNS`; on a CPU, :data:`MIN_RUNS` when the warm-up took over a second);
* ``spread``: ``(max - min) / median``; above :data:`NOISY_SPREAD` the measurement is re-run once
  and, if still above, marked ``noisy`` (a busy machine, not the mechanism);
* ``temp_mib``: XLA's compiled temporary memory (``memory_analysis().temp_size_in_bytes``),
  the scratch a call needs beyond its inputs and outputs: the quantity that grows as
  ``seq^2`` for materialised attention (deterministic: no spread);
* ``cost_s``: what the cell cost the benchmark (compile + every run), for budgeting.

The dense baseline (:data:`BASELINE`) is ``jax.nn.dot_product_attention`` with its default
implementation (what a user would otherwise call; ``xla`` on a CPU), between the softmax mixer's
own projections. The naive reference oracle is not timed: every mechanism whose mixer has a
primitive family is checked against the same layer with ``implementation="reference"`` and the
same parameters (:func:`check_against_reference`).

Timing the layer rather than the bare primitive includes its projections (the same work for
every mechanism of a width, linear in the length), as a model pays them.

CAB's *efficiency length* of a mechanism is the shortest measured length from which it is
faster (resp. smaller) than the dense baseline at that and every longer measured length; for
time, lengths where either measurement is noisy are left out of the comparison (and listed).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn_jax import dispatch
from attn_jax.layers import registry
from attn_jax.layers.mixers import common

# CAB's four attention patterns. Cross patterns attend from q_len = L queries to kv_len = L // 2
# memory tokens; causal cross sees memory positions j <= i.
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
  """A benchmarked mechanism: an efficiency preset of the registry, or the dense baseline.

  Attributes:
    name: row label in the report (the preset's name).
    mixer: the registry entry.
    fields: the entry's fields, ``((name, value), ...)``.
    patterns: the CAB patterns it has a form for; the suite skips the others.
    baseline: the dense ``jax.nn.dot_product_attention`` layer (:data:`BASELINE`) that efficiency
      lengths are measured against, instead of the entry's layer.
    default: part of the suite's default list.
    quality: the quality preset whose MQAR accuracy stands for this mechanism in the report's
      recommendation; None: its quality is not measured.
  """

  name: str
  mixer: str
  fields: tuple = ()
  patterns: tuple[str, ...] = ()
  baseline: bool = False
  default: bool = True
  quality: str | None = None

  def supports(self, pattern: str) -> bool:
    return pattern in self.patterns

  @property
  def has_reference(self) -> bool:
    """Whether the mixer's primitive family has the naive ``reference`` backend to check against."""
    family = registry.get(self.mixer).family
    return family is not None and "reference" in dispatch.backends(family)


BASELINE = Mechanism("dense (jax.nn)", "softmax", (), tuple(PATTERNS), baseline=True, quality="softmax")


def mechanisms() -> list[Mechanism]:
  """The dense baseline, then every efficiency preset of the registry whose mixer can run here,
  in registry order."""
  out = [BASELINE]
  for name, (entry, preset) in registry.efficiency_presets().items():
    if not entry.is_available:
      continue
    patterns = tuple(p for p in preset.patterns if not PATTERNS[p]["cross"] or entry.cross_layer is not None)
    out.append(Mechanism(name, entry.name, tuple(preset.fields), patterns, default=preset.default,
                         quality=preset.quality))
  return out


def baseline_name() -> str:
  return BASELINE.name


class DenseBaseline(nnx.Module):
  """``jax.nn.dot_product_attention`` (default implementation) between the softmax mixer's
  projections: the layer a user would write without this library, in CAB's four patterns.

  Causal attention uses jax's ``is_causal``, whose mask is top-left aligned: query ``i`` sees key
  ``j <= i``, which is the softmax mixer's causal self attention and its causal cross attention
  (``masks.causal(offset=0)``) alike. The parameters have the softmax layers' structure, so
  :func:`check_against_reference` runs the reference layer on them.
  """

  def __init__(self, config, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.causal = config.causal
    self.proj = common.Projections(config, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, memory=None, *, positions=None):
    """``x [B, T, C]`` (and ``memory [B, M, C]`` for cross attention) -> ``[B, T, C]``."""
    del positions  # no RoPE in the benchmark
    if memory is None:
      q, k, v = self.proj.qkv(x)
    else:
      q, k, v = self.proj.q_proj(x), self.proj.k_proj(memory), self.proj.v_proj(memory)
    return self.proj.o_proj(jax.nn.dot_product_attention(q, k, v, is_causal=self.causal))


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int = 1
  heads: int = 4
  kv_heads: int = 4
  head_dim: int = 64
  dtype: str = "float32"


def _layer(mech: Mechanism, pattern: str, shape: Shape, *, reference: bool = False):
  """``(graphdef, params, call)``: the mechanism's layer for ``pattern`` (with
  ``implementation="reference"`` if ``reference``); ``call(layer, x, memory)``."""
  p = PATTERNS[pattern]
  kv_heads = None if shape.kv_heads == shape.heads else shape.kv_heads
  fields = dict(mech.fields)
  if reference:
    fields["implementation"] = "reference"
  config = registry.mixer_config(mech.mixer, num_heads=shape.heads, num_kv_heads=kv_heads,
                                 head_dim=shape.head_dim, causal=p["causal"], rope=0, **fields)
  dim, dt = shape.heads * shape.head_dim, jnp.dtype(shape.dtype)
  kw = dict(rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt)
  if mech.baseline and not reference:
    layer = DenseBaseline(config, dim, **kw)
    call = lambda layer, x, memory: layer(x, memory)
  elif p["cross"]:
    layer = registry.build_cross(config, dim, **kw)
    call = lambda layer, x, memory: layer(x, memory)
  else:
    layer = registry.build(config, dim, **kw)
    call = lambda layer, x, memory: layer(x, positions=jnp.arange(x.shape[1])[None])
  graphdef, params = nnx.split(layer)
  return graphdef, params, call


def _inputs(pattern: str, seq_len: int, shape: Shape):
  """``(kv_len, x [B, L, C], memory [B, kv_len, C] or None)`` for ``pattern``."""
  cross = PATTERNS[pattern]["cross"]
  kv_len = max(1, seq_len // 2) if cross else seq_len
  dim, dt = shape.heads * shape.head_dim, jnp.dtype(shape.dtype)
  kx, km = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (shape.batch, seq_len, dim), dt)
  memory = jax.random.normal(km, (shape.batch, kv_len, dim), dt) if cross else None
  return kv_len, x, memory


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


def measure(mech: Mechanism, pattern: str, seq_len: int, mode: str, shape: Shape, repeats: int) -> dict:
  """One measurement; returns a JSON-ready record (``error`` set if the mechanism failed)."""
  cross = PATTERNS[pattern]["cross"]
  kv_len, x, memory = _inputs(pattern, seq_len, shape)
  record = dict(mechanism=mech.name, mixer=mech.mixer, pattern=pattern, seq_len=seq_len, kv_len=kv_len,
                mode=mode)
  try:
    graphdef, params, call = _layer(mech, pattern, shape)

    def fwd(params, x, memory):
      return call(nnx.merge(graphdef, params), x, memory)

    if mode == "fwd":
      fn = fwd
    else:
      fn = jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2) if cross else (0, 1))
    record.update(time_and_memory(fn, (params, x, memory), repeats))
  except Exception as e:  # A mechanism that cannot run a case is reported, not fatal.
    record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return record


def check_against_reference(mech: Mechanism, pattern: str, seq_len: int, shape: Shape) -> dict:
  """Max |mechanism - its reference oracle| of the forward output, relative to max |reference|.

  The reference is the mechanism's layer with ``implementation="reference"`` (the softmax layer
  for the dense baseline), run on the timed layer's parameters.

  Returns a JSON-ready record: ``max_abs_err`` and ``max_rel_err`` (None when the mixer has no
  reference backend), or ``error``.
  """
  record = dict(mechanism=mech.name, pattern=pattern, seq_len=seq_len, max_abs_err=None, max_rel_err=None)
  if not mech.has_reference:
    return record
  try:
    _, x, memory = _inputs(pattern, seq_len, shape)
    graphdef, params, call = _layer(mech, pattern, shape)
    ref_graphdef, _, ref_call = _layer(mech, pattern, shape, reference=True)
    got = jax.jit(lambda p, x, m: call(nnx.merge(graphdef, p), x, m))(params, x, memory)
    want = jax.jit(lambda p, x, m: ref_call(nnx.merge(ref_graphdef, p), x, m))(params, x, memory)
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = float(np.abs(got - want).max())
    record.update(max_abs_err=err, max_rel_err=err / max(float(np.abs(want).max()), 1e-30))
  except Exception as e:  # Reported in the report, not fatal.
    record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return record


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
