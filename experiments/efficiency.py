"""Speed and compiled memory of token mixers vs sequence length, in CAB's four patterns.

The mechanisms are the efficiency presets of the mixer registry
(:func:`attn_jax.layers.registry.efficiency_presets`): each names a mixer and its fields, so a
new mechanism joins by declaring a preset in its own module. Each measurement builds the mixer's
layer (heads and head dim from :class:`Shape`, no RoPE) and compiles it for one (pattern,
length, mode): self patterns call the layer on ``x [B, L, heads * head_dim]`` (``causal=False``
for the non-causal one), cross patterns the entry's cross layer on ``x`` and a memory of
``L // 2`` tokens; ``fwd_bwd`` differentiates with respect to the input(s) and the parameters.
Recorded:

* ``time_ms``: median wall time of the compiled call over ``repeats`` runs (after one warm-up;
  on a CPU, one run when the warm-up took over a second);
* ``temp_mib``: XLA's compiled temporary memory (``memory_analysis().temp_size_in_bytes``),
  the scratch a call needs beyond its inputs and outputs: the quantity that grows as
  ``seq^2`` for materialised attention.

Timing the layer rather than the bare primitive includes its projections (the same work for
every mechanism of a width, linear in the length), as a model pays them.

CAB's *efficiency length* of a mechanism is the shortest measured length from which it is
faster (resp. smaller) than the dense baseline at that and every longer measured length.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.layers import registry

# CAB's four attention patterns. Cross patterns attend from q_len = L queries to kv_len = L // 2
# memory tokens; causal cross sees memory positions j <= i.
PATTERNS = {
    "noncausal_self": dict(cross=False, causal=False),
    "causal_self": dict(cross=False, causal=True),
    "noncausal_cross": dict(cross=True, causal=False),
    "causal_cross": dict(cross=True, causal=True),
}
MODES = ("fwd", "fwd_bwd")


@dataclasses.dataclass(frozen=True)
class Mechanism:
  """An efficiency preset of the registry, as the suite runs it.

  Attributes:
    name: row label in the report (the preset's name).
    mixer: the registry entry.
    fields: the entry's fields, ``((name, value), ...)``.
    patterns: the CAB patterns it has a form for; the suite skips the others.
    baseline: the dense reference that efficiency lengths are measured against.
    default: part of the suite's default list.
  """

  name: str
  mixer: str
  fields: tuple = ()
  patterns: tuple[str, ...] = ()
  baseline: bool = False
  default: bool = True

  def supports(self, pattern: str) -> bool:
    return pattern in self.patterns


def mechanisms() -> list[Mechanism]:
  """Every efficiency preset of the registry whose mixer can run here, in registry order."""
  out = []
  for name, (entry, preset) in registry.efficiency_presets().items():
    if not entry.is_available:
      continue
    patterns = tuple(p for p in preset.patterns if not PATTERNS[p]["cross"] or entry.cross_layer is not None)
    out.append(Mechanism(name, entry.name, tuple(preset.fields), patterns, preset.baseline, preset.default))
  return out


def baseline_name() -> str:
  return next(m.name for m in mechanisms() if m.baseline)


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int = 1
  heads: int = 4
  kv_heads: int = 4
  head_dim: int = 64
  dtype: str = "float32"


def _layer(mech: Mechanism, pattern: str, shape: Shape):
  """``(graphdef, params, call)``: the preset's layer for ``pattern``; ``call(layer, x, memory)``."""
  p = PATTERNS[pattern]
  kv_heads = None if shape.kv_heads == shape.heads else shape.kv_heads
  config = registry.mixer_config(mech.mixer, num_heads=shape.heads, num_kv_heads=kv_heads,
                                 head_dim=shape.head_dim, causal=p["causal"], rope=0, **dict(mech.fields))
  dim, dt = shape.heads * shape.head_dim, jnp.dtype(shape.dtype)
  kw = dict(rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt)
  if p["cross"]:
    layer = registry.build_cross(config, dim, **kw)
    call = lambda layer, x, memory: layer(x, memory)
  else:
    layer = registry.build(config, dim, **kw)
    call = lambda layer, x, memory: layer(x, positions=jnp.arange(x.shape[1])[None])
  graphdef, params = nnx.split(layer)
  return graphdef, params, call


def time_and_memory(fn, args, repeats: int) -> dict:
  """Compiles ``fn(*args)``; returns ``temp_mib`` (XLA's temporary memory) and ``time_ms`` (median
  wall time of the compiled call over ``repeats`` runs after one warm-up)."""
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  out = {"temp_mib": mem.temp_size_in_bytes / 2**20 if mem is not None else math.nan}
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  # On a CPU a call that takes over a second varies little between runs: one timed run is
  # enough, which keeps the embedded default's long dense cases affordable. Accelerators keep
  # every repeat (a first call there can include one-time autotuning).
  if jax.devices()[0].platform == "cpu" and time.perf_counter() - start > 1.0:
    repeats = 1
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  out["time_ms"] = 1e3 * statistics.median(times)
  return out


def measure(mech: Mechanism, pattern: str, seq_len: int, mode: str, shape: Shape, repeats: int) -> dict:
  """One measurement; returns a JSON-ready record (``error`` set if the mechanism failed)."""
  p = PATTERNS[pattern]
  kv_len = max(1, seq_len // 2) if p["cross"] else seq_len
  record = dict(mechanism=mech.name, mixer=mech.mixer, pattern=pattern, seq_len=seq_len, kv_len=kv_len,
                mode=mode)
  try:
    graphdef, params, call = _layer(mech, pattern, shape)
    dim, dt = shape.heads * shape.head_dim, jnp.dtype(shape.dtype)
    kx, km = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (shape.batch, seq_len, dim), dt)
    memory = jax.random.normal(km, (shape.batch, kv_len, dim), dt) if p["cross"] else None

    def fwd(params, x, memory):
      return call(nnx.merge(graphdef, params), x, memory)

    if mode == "fwd":
      fn = fwd
    else:
      fn = jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2) if p["cross"] else (0, 1))
    record.update(time_and_memory(fn, (params, x, memory), repeats))
  except Exception as e:  # A mechanism that cannot run a case is reported, not fatal.
    record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return record


def efficiency_lengths(records: list[dict]) -> list[dict]:
  """CAB efficiency lengths per (mechanism, pattern, mode) against the baseline mechanism."""
  baseline = baseline_name()
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
