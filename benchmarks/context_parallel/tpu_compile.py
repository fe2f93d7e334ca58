"""Deviceless TPU compile of context-parallel attention: does the hardware compiler accept it, and
how much memory does each chip need?

Compiles ``attn_jax.attention`` (Pallas TPU kernels, not interpret mode) with the sequence
sharded over every chip of a TPU topology, forward and forward + backward, through libtpu's
ahead-of-time compiler on a machine without a TPU (see ``/work/shared/aot/README.md``), and
writes the compiled memory analysis per chip.

Run it in a venv with ``jax[tpu]==0.10.2`` and only jax + numpy (attn_jax's primitives need
nothing else)::

  ALLOW_MULTIPLE_LIBTPU_LOAD=1 PYTHONPATH=. /work/venvs/tpu/bin/python \\
      benchmarks/context_parallel/tpu_compile.py --topology v5e:2x2 --tokens 131072 \\
      --out benchmarks/context_parallel/v5e_2x2_128k.json

About a minute per case on a CPU (the 1M-token case on ``v5e:16x16`` plans 256 x 256 ring
entries on the host first). ``ALLOW_MULTIPLE_LIBTPU_LOAD`` lets it run while another process
holds libtpu's lock file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import attn_jax
from attn_jax import masks
from attn_jax.context_parallel import softmax as cp_softmax
from attn_jax.softmax import common

MASKS = {
    "causal": masks.causal,
    "window": lambda: masks.sliding_window(4095) | masks.sink_tokens(4),
    "full": masks.full,
}


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  out = {f: int(getattr(m, f)) for f in fields}
  # Per chip, live at once: inputs + outputs + temporaries (aliased buffers counted once).
  out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                        + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
  return out


def run(topology: str, tokens: int, strategy: str, mask_name: str, heads: int, kv_heads: int,
        head_dim: int, batch: int, backward: bool) -> dict:
  """One compile. ``strategy="none"``: the plain call on the topology's first chip (baseline)."""
  topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  devices = np.asarray(topo.devices)
  if strategy == "none":
    devices = devices.reshape(-1)[:1]
  mesh = Mesh(devices.reshape(-1), ("sequence",))
  cp = None if strategy == "none" else attn_jax.ContextParallel(mesh, "sequence", strategy)
  # The deviceless process's default backend is the CPU: the kernels must be asked for by name
  # and told they compile for hardware.
  config = attn_jax.PallasTpuConfig(interpret=False)
  mask = MASKS[mask_name]()
  x = NamedSharding(mesh, P(None, "sequence", None, None))
  q = jax.ShapeDtypeStruct((batch, tokens, heads, head_dim), jnp.bfloat16, sharding=x)
  kv = jax.ShapeDtypeStruct((batch, tokens, kv_heads, head_dim), jnp.bfloat16, sharding=x)

  def fwd(q, k, v):
    return attn_jax.attention(q, k, v, mask=mask, implementation="pallas_tpu", config=config,
                              context_parallel=cp)

  def fwd_bwd(q, k, v):
    out, vjp = jax.vjp(fwd, q, k, v)
    return vjp(out)  # any cotangent of the output's shape and sharding

  start = time.time()
  plan_start = time.time()
  spec = common.Spec(mask=mask, scale=head_dim ** -0.5, logits_soft_cap=None, q_len=tokens, kv_len=tokens,
                     num_q_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, v_head_dim=head_dim,
                     has_sinks=False, has_segments=False)
  plan_info = None
  if cp is not None:
    plan = cp_softmax.make_plan(spec, cp, "pallas_tpu", config)
    plan_info = {"load_balance": "zigzag" if plan.q_layout.pieces == 2 else "contiguous",
                 "ring_steps": plan.num_steps, "branches": len(plan.branches),
                 "device_steps": plan.device_steps, "skipped": plan.skipped,
                 "host_plan_seconds": round(time.time() - plan_start, 2)}
  compiled = jax.jit(fwd_bwd if backward else fwd).lower(q, kv, kv).compile()
  return {
      "topology": topology, "device_kind": devices.flat[0].device_kind, "chips": int(devices.size),
      "tokens": tokens, "tokens_per_chip": tokens // devices.size, "strategy": strategy, "mask": repr(mask),
      "batch": batch, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": "bfloat16",
      "pass": "forward+backward" if backward else "forward",
      "plan": plan_info,
      "memory_per_chip": _memory(compiled),
      "compile_seconds": round(time.time() - start, 1),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--topology", default="v5e:2x2")
  p.add_argument("--tokens", type=int, default=131072)
  p.add_argument("--strategy", default="ring", choices=["ring", "all_gather", "none"],
                 help="'none': the plain call on one chip with --tokens tokens (the baseline)")
  p.add_argument("--mask", default="causal", choices=sorted(MASKS))
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--passes", default="forward,forward+backward")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  results = []
  for name in args.passes.split(","):
    r = run(args.topology, args.tokens, args.strategy, args.mask, args.heads, args.kv_heads, args.head_dim,
            args.batch, backward=name == "forward+backward")
    print(json.dumps(r), flush=True)
    results.append(r)
  report = {"jax": jax.__version__, "date": datetime.date.today().isoformat(),
            "note": "deviceless compile (libtpu AOT) on a CPU-only machine; nothing ran", "results": results}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
