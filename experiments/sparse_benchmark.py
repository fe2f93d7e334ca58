r"""Content-dependent sparse attention benchmark: one causal layer, time and compiled
memory of every mechanism against dense causal flash attention, forward and forward+backward.

Each mechanism runs with its default backend (xla on CPU) at a budget typical of its paper,
scaled to the length where the paper scales it (the sqrt(T) spans of Superlinear, the clusters
of the Routing Transformer); the report gives times, the flash / mechanism ratio and XLA's
compiled temporary memory. Recycled Attention is a decoding method: it is timed as a decoding
loop of ``--decode_steps`` steps after a prompt of T tokens, against the same loop with a full
step every step (dense decoding).

CPU default (4k to 32k tokens, batch 1, 4 heads, head dim 64, float32; about an hour on two
cores, most of it the flash baseline and the O(T^2) pieces at 32k)::

    python -m experiments.sparse_benchmark --workdir=benchmarks/sparse_cpu

A smoke run (about two minutes)::

    python -m experiments.sparse_benchmark --lengths=1024,2048 --workdir=/tmp/sparse_smoke

Writes ``report.md`` and ``results.json`` (with device, jax version and date) into --workdir.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import attn_jax
from attn_jax import masks
from attn_jax import mechanisms
from experiments import efficiency
from experiments import report


@dataclasses.dataclass(frozen=True)
class Fn:
  """A timed function ``fn(q, k, v, causal) -> [B, T, H, Dv]`` of the primitives (the registry's
  efficiency presets time whole layers; this benchmark times the mechanisms themselves)."""

  name: str
  fn: Callable
  baseline: bool = False


def measure(mech: Fn, seq_len: int, mode: str, shape: efficiency.Shape, repeats: int) -> dict:
  """One causal self-attention measurement of ``mech`` on random ``q, k, v [B, T, H, D]``:
  ``fwd`` (the output) or ``fwd_bwd`` (gradients of q, k and v); ``error`` set if it failed."""
  record = dict(mechanism=mech.name, pattern="causal_self", seq_len=seq_len, kv_len=seq_len, mode=mode)
  dt = jnp.dtype(shape.dtype)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (jax.random.normal(key, (shape.batch, seq_len, h, shape.head_dim), dt)
             for key, h in zip(keys, (shape.heads, shape.kv_heads, shape.kv_heads)))
  try:
    fwd = lambda q, k, v: mech.fn(q, k, v, True)
    if mode == "fwd":
      fn = fwd
    else:
      fn = jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    record.update(efficiency.time_and_memory(fn, (q, k, v), repeats))
  except Exception as e:  # A mechanism that cannot run a case is reported, not fatal.
    record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return record


def _flash(q, k, v, causal):
  del causal
  return attn_jax.attention(q, k, v, mask=masks.causal())


def _topk(q, k, v, causal):
  del causal
  return mechanisms.topk_block_attention(q, k, v, block_size=128, top_k=8)


def _hyper(q, k, v, causal):
  del causal
  proj = jax.random.normal(jax.random.PRNGKey(1), (q.shape[3], 7))
  return mechanisms.hyper_attention(q, k, v, proj, jax.random.PRNGKey(2), block_size=256, sample_size=256,
                                    min_seq_len=4096)


def _routing(q, k, v, causal):
  del causal
  t = q.shape[1]
  size = 256
  cent = jax.random.normal(jax.random.PRNGKey(3), (q.shape[2], max(1, t // size), q.shape[3]))
  cent = cent / jnp.linalg.norm(cent, axis=-1, keepdims=True)
  return mechanisms.routing_attention(q, k, v, cent, cluster_size=size, num_local_heads=q.shape[2] // 2,
                                      local_window=256)


def _landmark(q, k, v, causal):
  del causal
  b, t, h, d = k.shape
  lk = k[:, :t // 64 * 64].reshape(b, t // 64, 64, h, d).mean(2)
  return mechanisms.landmark_attention(q, k, v, lk, block_size=64, top_k=8)


def _power(q, k, v, causal):
  del causal
  return attn_jax.attention(q, k, v, mask=masks.power_attention(128, window_blocks=2, sink_blocks=1))


def _dynamic_mask(q, k, v, causal):
  del causal
  return mechanisms.dynamic_mask_attention(q, k, v, v.mean(-1).astype(jnp.float32), window=1024, block_size=128)


def _core_context(q, k, v, causal):
  del causal
  return mechanisms.core_context_attention(q, k, v, group_size=16, window=512)


def _chunks(t, mean=64, seed=0):
  rng = np.random.default_rng(seed)
  return np.cumsum(np.r_[0, rng.random(t - 1) < 1.0 / mean])[None].astype(np.int32)


def _dhsa(q, k, v, causal):
  del causal
  t = q.shape[1]
  ids = np.repeat(_chunks(t), q.shape[0], 0)
  return mechanisms.dhsa_attention(q, k, v, jnp.asarray(ids), num_chunks=int(ids.max()) + 1, budget=1024)


def _superlinear(q, k, v, causal):
  del causal
  return mechanisms.superlinear_attention(q, k, v, span_size=int(math.isqrt(q.shape[1])), top_k=8)


MECHANISMS = [
    Fn("flash causal", _flash, baseline=True),
    Fn("topk_block b128 k8", _topk),
    Fn("hyper b256 m256", _hyper),
    Fn("routing w256 (+2 local heads)", _routing),
    Fn("landmark b64 k8", _landmark),
    Fn("power_attention b128", _power),
    Fn("dynamic_mask w1024", _dynamic_mask),
    Fn("core_context g16 w512", _core_context),
    Fn("dhsa budget1024", _dhsa),
    Fn("superlinear sqrt(T) k8", _superlinear),
]


def _decoder(steps: int, stride: int, top_k: int = 1024):
  """The last ``steps`` queries decode after a prompt of the rest (``stride=1``: dense decoding)."""
  def fn(q, k, v, causal):
    del causal
    prompt = q.shape[1] - steps
    return mechanisms.recycled_attention(q[:, prompt:], k, v, prompt_len=prompt, stride=stride,
                                         top_k=min(top_k, prompt))
  return fn


def run(lengths, repeats: int, modes, shape: efficiency.Shape, decode_steps: int, only=None):
  records = []
  for mode in modes:
    for n in lengths:
      for mech in MECHANISMS:
        if only and mech.name not in only and not mech.baseline:
          continue
        rec = measure(mech, n, mode, shape, repeats)
        print(json.dumps(rec), flush=True)
        records.append(rec)
  if decode_steps:
    # Recycled Attention is a decoding method: the same loop with a full step every step is dense
    # decoding, its baseline.
    for n in lengths:
      for name, stride in ((f"dense decode ({decode_steps} steps)", 1), (f"recycled decode ({decode_steps} steps)", 8)):
        rec = measure(Fn(name, _decoder(decode_steps, stride)), n, "fwd", shape, repeats)
        rec["mode"] = "decode"
        print(json.dumps(rec), flush=True)
        records.append(rec)
  return dict(environment=report.environment(), shape=vars(shape), records=records)


def markdown(payload) -> str:
  env, shape = payload["environment"], payload["shape"]
  lines = ["# attn_jax content-dependent sparse attention benchmark", "",
           f"- date: {env['date']}",
           f"- device: {env['device']} ({env['platform']}); host {env['host']}, {env['cpu_count']} CPUs",
           f"- jax {env['jax_version']}",
           f"- one causal self-attention layer: batch {shape['batch']}, heads {shape['heads']} (K/V heads "
           f"{shape['kv_heads']}), head_dim {shape['head_dim']}, {shape['dtype']}, default backends",
           "- time: median wall time of the compiled call; MiB: XLA's compiled temporary memory; "
           "x flash: flash time / mechanism time (above 1: faster than dense)", ""]
  recs = payload["records"]
  by = {(r["mechanism"], r["mode"], r["seq_len"]): r for r in recs}
  names = [m for m in dict.fromkeys(r["mechanism"] for r in recs if r["mode"] != "decode")]
  for mode in ("fwd", "fwd_bwd", "decode"):
    lens = sorted({r["seq_len"] for r in recs if r["mode"] == mode})
    if not lens:
      continue
    rows = names if mode != "decode" else list(dict.fromkeys(r["mechanism"] for r in recs if r["mode"] == "decode"))
    base = "flash causal" if mode != "decode" else rows[0]
    lines += [f"## {mode}", "", "| mechanism | " + " | ".join(f"{n} ms | x {'flash' if mode != 'decode' else 'dense'} "
                                                               f"| MiB" for n in lens) + " |",
              "|---|" + "---|---|---|" * len(lens)]
    for name in rows:
      cells = []
      for n in lens:
        r = by.get((name, mode, n), {})
        b = by.get((base, mode, n), {}).get("time_ms")
        t = r.get("time_ms")
        cells += [t, b / t if b and t else None, r.get("temp_mib")]
      lines.append(f"| {name} | " + " | ".join(report._fmt(c, 2) for c in cells) + " |")
    lines.append("")
  errors = [r for r in recs if "error" in r]
  if errors:
    lines += ["## errors", ""] + [f"- {r['mechanism']} / {r['mode']} / {r['seq_len']}: {r['error']}" for r in errors]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  os.makedirs(f.workdir, exist_ok=True)
  shape = efficiency.Shape(batch=f.batch, heads=f.heads, kv_heads=f.heads, head_dim=f.head_dim, dtype=f.dtype)
  payload = run([int(x) for x in f.lengths], f.repeats, tuple(f.modes), shape, f.decode_steps, only=f.only)
  with open(os.path.join(f.workdir, "results.json"), "w") as fh:
    json.dump(payload, fh, indent=1)
  md = markdown(payload)
  with open(os.path.join(f.workdir, "report.md"), "w") as fh:
    fh.write(md)
  print(md)


def _define_flags():
  from absl import flags
  flags.DEFINE_string("workdir", "sparse_benchmark_out", "Directory for report.md and results.json.")
  flags.DEFINE_list("lengths", ["4096", "8192", "16384", "32768"], "Sequence lengths.")
  flags.DEFINE_list("modes", list(efficiency.MODES), "fwd and/or fwd_bwd.")
  flags.DEFINE_list("only", [], "Mechanism names to run (the flash baseline always runs); empty: all.")
  flags.DEFINE_integer("repeats", 2, "Timed runs per measurement (median reported).")
  flags.DEFINE_integer("batch", 1, "Batch size.")
  flags.DEFINE_integer("heads", 4, "Query (= K/V) heads.")
  flags.DEFINE_integer("head_dim", 64, "Head dimension.")
  flags.DEFINE_string("dtype", "float32", "Input dtype.")
  flags.DEFINE_integer("decode_steps", 64, "Decoding steps of the Recycled Attention loop (0: skip).")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
