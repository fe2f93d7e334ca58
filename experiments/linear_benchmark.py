r"""Linear-attention benchmark: time and compiled memory vs length, against causal flash attention.

Lightning attention (fixed per-head decays, the chunked primitive) and dense causal softmax
attention (the project's flash backend) on the same ``[B, T, H, D]`` inputs, forward and
forward+backward, with ``implementation=None`` (the platform's default backend: xla on CPU, the
Pallas kernels on TPU / GPU). The report gives both timings, their ratio, and the growth
``time(T) / time(T / 4)`` of the linear mechanism (4 for perfectly linear cost, 16 for quadratic).

CPU default (1k to 16k tokens, batch 1, 4 heads, head dim 64, float32; about 5 minutes, most
of it the flash baseline at 16k)::

    python -m experiments.linear_benchmark --workdir=benchmarks/linear_cpu

Lightning Attention-2's published configuration on an accelerator (batch 4, 32 heads, head dim
128, bfloat16, 512 to 32k tokens)::

    python -m experiments.linear_benchmark --config=lightning2 --workdir=benchmarks/linear_h100

Writes ``report.md`` and ``results.json`` (with device, jax version and date) into --workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp

import attn_jax
from attn_jax import masks
from attn_jax import mechanisms
from experiments import efficiency
from experiments import report

# name: (batch, heads, head_dim, dtype, lengths)
CONFIGS = {
    "cpu": (1, 4, 64, "float32", (1024, 2048, 4096, 8192, 16384)),
    "lightning2": (4, 32, 128, "bfloat16", (512, 1024, 2048, 4096, 8192, 16384, 32768)),
    "gpu_scaling": (1, 16, 128, "bfloat16", (512, 2048, 8192, 32768, 65536)),
}


def _lightning(q, k, v):
  return mechanisms.lightning_attention(q, k, v, mechanisms.lightning_slopes(k.shape[2]))


def _flash(q, k, v):
  return attn_jax.attention(q, k, v, mask=masks.causal())


@dataclasses.dataclass(frozen=True)
class Primitive:
  """A causal primitive ``fn(q, k, v) -> out`` timed on its own (no projections)."""

  name: str
  fn: Callable


MECHANISMS = (Primitive("lightning", _lightning), Primitive("flash causal", _flash))


def measure(mech: Primitive, seq_len: int, mode: str, shape: efficiency.Shape, repeats: int) -> dict:
  """One causal self-attention measurement of ``mech`` on ``[B, seq_len, H, D]`` inputs."""
  record = dict(mechanism=mech.name, pattern="causal_self", seq_len=seq_len, kv_len=seq_len, mode=mode)
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (jax.random.normal(key, (shape.batch, seq_len, shape.heads, shape.head_dim), jnp.dtype(shape.dtype))
             for key in ks)
  fn = mech.fn if mode == "fwd" else jax.grad(lambda *a: mech.fn(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  try:
    record.update(efficiency.time_and_memory(fn, (q, k, v), repeats))
  except Exception as e:  # A case that cannot run is reported, not fatal.
    record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return record


def run(config: str, repeats: int, modes=efficiency.MODES, max_flash_len: int | None = None):
  """Measures every (mechanism, mode, length) of ``config``; returns the result payload."""
  batch, heads, head_dim, dtype, lengths = CONFIGS[config]
  shape = efficiency.Shape(batch=batch, heads=heads, kv_heads=heads, head_dim=head_dim, dtype=dtype)
  records = []
  for mode in modes:
    for n in lengths:
      for mech in MECHANISMS:
        if mech.name == "flash causal" and max_flash_len is not None and n > max_flash_len:
          continue
        records.append(measure(mech, n, mode, shape, repeats))
  return dict(environment=report.environment(), config=config, shape=vars(shape), records=records)


def markdown(payload) -> str:
  env, shape = payload["environment"], payload["shape"]
  lines = ["# attn_jax linear-attention benchmark", "",
           f"- date: {env['date']}",
           f"- device: {env['device']} ({env['platform']}); host {env['host']}, {env['cpu_count']} CPUs",
           f"- jax {env['jax_version']}",
           f"- config `{payload['config']}`: batch {shape['batch']}, heads {shape['heads']}, head_dim "
           f"{shape['head_dim']}, {shape['dtype']}, causal self attention, default backends",
           "- lightning: `mechanisms.lightning_attention` (fixed per-head decays, chunked); flash causal: "
           "`attention(mask=masks.causal())`",
           "- growth: lightning's time(T) / time(T/4) (linear cost gives 4, quadratic 16)", ""]
  by = {(r["mechanism"], r["mode"], r["seq_len"]): r for r in payload["records"]}
  for mode in efficiency.MODES:
    lens = sorted({r["seq_len"] for r in payload["records"] if r["mode"] == mode})
    if not lens:
      continue
    lines += [f"## {mode}", "", "| tokens | lightning ms | flash ms | flash / lightning | lightning MiB | "
              "flash MiB | growth |", "|---|---|---|---|---|---|---|"]
    for n in lens:
      a, b = by.get(("lightning", mode, n), {}), by.get(("flash causal", mode, n), {})
      ta, tb = a.get("time_ms"), b.get("time_ms")
      quarter = by.get(("lightning", mode, n // 4), {}).get("time_ms")
      cells = [n, ta, tb, tb / ta if ta and tb else None, a.get("temp_mib"), b.get("temp_mib"),
               ta / quarter if ta and quarter else None]
      lines.append("| " + " | ".join(report._fmt(c, 2) for c in cells) + " |")
    lines.append("")
  errors = [r for r in payload["records"] if "error" in r]
  if errors:
    lines += ["## errors", ""] + [f"- {r['mechanism']} / {r['mode']} / {r['seq_len']}: {r['error']}" for r in errors]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  from absl import flags  # Flags are defined by _define_flags() when run as a script.
  f = flags.FLAGS
  os.makedirs(f.workdir, exist_ok=True)
  payload = run(f.config, f.repeats, modes=tuple(f.modes), max_flash_len=f.max_flash_len)
  with open(os.path.join(f.workdir, "results.json"), "w") as fh:
    json.dump(payload, fh, indent=1)
  md = markdown(payload)
  with open(os.path.join(f.workdir, "report.md"), "w") as fh:
    fh.write(md)
  print(md)


def _define_flags():
  from absl import flags
  flags.DEFINE_string("workdir", "linear_benchmark_out", "Directory for report.md and results.json.")
  flags.DEFINE_enum("config", "cpu", list(CONFIGS), "Shape configuration.")
  flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median reported).")
  flags.DEFINE_list("modes", list(efficiency.MODES), "fwd and/or fwd_bwd.")
  flags.DEFINE_integer("max_flash_len", None, "Skip the flash baseline above this length.")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)

