r"""Static cycle counts of the Pallas TPU flash kernels next to JAX's splash attention, without a TPU.

A TPU core is statically scheduled: libtpu emits VLIW bundles, about one issue cycle each, with
latency waits as explicit empty bundles. Compiled deviceless for a TPU topology, each Mosaic
kernel's final bundle schedule is dumped; counting the bundles of its per-step body gives a
lower bound on compute time per step, and composing the bodies with the number of grid steps of
each kind gives a whole-kernel estimate:

    cycles ~= steps * step_overhead + full * full_body + partial * partial_body
              + rows * (init + finalize) + prologue

Not modelled: DMA and semaphore waits, HBM bandwidth, the real per-step overhead (about 0.35 us
on hardware, above the static figure), branch delay slots. Good for ranking variants and for
ratios within about 20-30 % at blocks of 256 or more; nothing here was checked on a TPU.

Needs the libtpu venv (jax[tpu], no TPU required); run from the repository root::

    PYTHONPATH=. /work/venvs/tpu/bin/python -m experiments.tpu_static --out=benchmarks/tpu_static

(about 20 minutes on a 2-core CPU for the default variants; ``--quick`` runs one variant per
kernel). Writes ``results.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import glob
import json
import os
import re
import sys
import time

HEAD_DIM = 128
LANE = 128

# One bundle per line of the 'packed-bundles-post-ra' dump: "0x1f LB: > { op ;; op ... } /* ... */".
_BUNDLE = re.compile(r"^\s*(0x[0-9a-f]+|\d+)\s+(LH|LB|LE|PB|PF|CT)?\s*:\s*>?\s*\{(.*)$")
_OPCODE = re.compile(r"=\s*([a-z][a-z0-9_.]*)")
_REGION = re.compile(r"(Start region|End region) (\d+)")
_BRANCH = re.compile(r"sbr\.rel \(!?%p\w+\) target bundleno = (\d+)")


@dataclasses.dataclass
class Bundle:
  tag: str | None
  ops: list[str]
  events: list[tuple[str, int]]
  branch_to: int | None


def parse_bundles(path: str) -> list[Bundle]:
  """The bundles of one kernel dump, empty (latency) bundles included."""
  out = []
  with open(path) as f:
    for line in f:
      m = _BUNDLE.match(line)
      if not m:
        continue
      body, _, comment = m.group(3).partition("}")
      ops = [o.group(1) for o in (_OPCODE.search(x) for x in body.split(";;")) if o]
      events = [(k, int(r)) for k, r in _REGION.findall(comment)]
      br = _BRANCH.search(body)
      out.append(Bundle(m.group(2), ops, events, int(br.group(1)) if br else None))
  return out


def _is_matmul(op: str) -> bool:
  return op.startswith("vmatmul")


def _is_store(op: str) -> bool:
  return op.startswith("vst")


@dataclasses.dataclass
class KernelBody:
  """Bundle counts of one kernel's grid-step loop."""

  total: int
  loop: int
  tiles: list[int]       # outermost regions with matmuls (a tile kind's body), in program order
  parts: list[list[int]]  # per tile body, its innermost matmul regions (sub-block variants)
  init: int
  finalize: int

  @property
  def step_overhead(self) -> int:
    return self.loop - sum(self.tiles) - self.init - self.finalize

  @property
  def prologue(self) -> int:
    return self.total - self.loop


def analyse(path: str, bodies: int = 1) -> KernelBody:
  """Finds the grid loop (the one backward branch), the ``bodies`` tile bodies (the predicated
  regions of the tile kinds, each issuing matmuls; sub-block variants inside them are
  ``parts``), and the init / finalize regions around them."""
  bundles = parse_bundles(path)
  starts, ends = {}, {}
  for i, b in enumerate(bundles):
    for kind, r in b.events:
      (starts if kind == "Start region" else ends)[r] = i
  back = [(b.branch_to, i) for i, b in enumerate(bundles) if b.branch_to is not None and b.branch_to < i]
  if len(back) != 1:
    raise ValueError(f"{path}: expected one loop (the grid), found backward branches {back}")
  lo, hi = back[0]
  regions = [(starts[r], ends[r]) for r in starts if r in ends and lo <= starts[r] and ends[r] <= hi]
  regions = sorted(set(regions))

  def count(a, b, pred):
    return sum(1 for x in bundles[a:b + 1] for op in x.ops if pred(op))

  inside = lambda r, t: r != t and t[0] <= r[0] and r[1] <= t[1]  # noqa: E731
  # The innermost region holding every matmul is either the only tile body, or the step's own
  # predicate around the ``bodies`` tile bodies.
  with_mm = [r for r in regions if count(r[0], r[1], _is_matmul)]
  if not with_mm:
    raise ValueError(f"{path}: no tile body found")
  n_mm = count(lo, hi, _is_matmul)
  top = min((r for r in with_mm if count(r[0], r[1], _is_matmul) == n_mm), key=lambda r: r[1] - r[0])
  below = [r for r in with_mm if inside(r, top)]
  children = [r for r in below if not any(inside(r, t) for t in below)]
  tiles = children if bodies > 1 and len(children) == bodies else [top]
  minimal = [r for r in with_mm if not any(inside(t, r) for t in with_mm)]
  parts = [[m for m in minimal if m == t or inside(m, t)] for t in tiles]
  first, last = tiles[0][0], tiles[-1][1]
  before = [(a, b) for a, b in regions if b < first and count(a, b, _is_store)]
  after = [(a, b) for a, b in regions if a > last and not count(a, b, _is_matmul)]
  length = lambda r: r[1] - r[0] + 1  # noqa: E731
  return KernelBody(
      total=len(bundles), loop=hi - lo + 1, tiles=[length(t) for t in tiles],
      parts=[[length(m) for m in p] for p in parts],
      init=max(map(length, before), default=0), finalize=max(map(length, after), default=0))


@dataclasses.dataclass
class StepCounts:
  """Grid steps of one kernel call, by what they run."""

  steps: int       # every grid step, idle ones included
  full: int
  partial: int
  rows: int        # rows of blocks (init + finalize each once)
  tile_rows: int   # query rows per tile (block_q x stacked heads; keys for dK/dV)
  tile_cols: int
  # Over PARTIAL entries carrying compute sub-block kinds: per sub-block, how many are PARTIAL
  # and how many FULL (the others are skipped).
  sub: list | None = None


def estimate(body: KernelBody, counts: StepCounts, one_body: bool = False) -> dict:
  """Whole-kernel cycle estimate; ``one_body``: the kernel has a single body for both kinds."""
  full_len = body.tiles[0] if counts.full else 0
  part_len = body.tiles[0] if one_body else body.tiles[-1]
  partial_cycles = counts.partial * part_len
  if counts.sub is not None and not one_body and counts.partial:
    # PARTIAL tile body = control + one variant per sub-block (masked, unmasked or none).
    variants = body.parts[-1]
    if len(variants) != 2 * len(counts.sub):
      raise ValueError(f"expected {2 * len(counts.sub)} sub-block variants, found {variants}")
    control = part_len - sum(variants)
    partial_cycles = counts.partial * control + sum(
        n_p * variants[2 * c] + n_f * variants[2 * c + 1] for c, (n_p, n_f) in enumerate(counts.sub))
    part_len = partial_cycles / max(1, counts.partial)
  cycles = (counts.steps * body.step_overhead + counts.full * full_len + partial_cycles
            + counts.rows * (body.init + body.finalize) + body.prologue)
  per = counts.tile_rows * counts.tile_cols / (LANE * LANE)
  return dict(cycles=int(cycles), cycles_per_128x128_full=round(full_len / per, 1),
              cycles_per_128x128_partial=round(part_len / per, 1), step_overhead=body.step_overhead,
              init=body.init, finalize=body.finalize, tile_bodies=body.tiles, sub_variants=body.parts[-1],
              **dataclasses.asdict(counts))


# ---------------------------------------------------------------------------------------------
# Variants: this project's kernels and splash, compiled the same way.


def _masks(name: str, length: int):
  from attn_jax import masks
  if name == "causal":
    return masks.causal()
  if name == "window":
    return masks.sliding_window(4095) | masks.sink_tokens(4)
  if name == "local":
    # The window alone: what splash's LocalMask computes (it has no sink tokens).
    return masks.sliding_window(4095)
  raise ValueError(name)


def _splash_mask(name: str, length: int, heads: int):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  shape = (length, length)
  m = sm.CausalMask(shape) if name == "causal" else sm.LocalMask(shape, (4095, 0), 0)
  return sm.MultiHeadMask(tuple(m for _ in range(heads)))


def _project_counts(cfg, mask_name, length, heads, kv_heads):
  """Step counts of the project's forward, dQ and dK/dV calls, from the schedules they run."""
  from attn_jax import block_mask as bm_lib
  from attn_jax.softmax import common, pallas as sp, schedule
  import jax.numpy as jnp  # noqa: F401
  mask = _masks(mask_name, length)
  spec = common.Spec(mask=mask, scale=HEAD_DIM ** -0.5, logits_soft_cap=None, q_len=length, kv_len=length,
                     num_q_heads=heads, num_kv_heads=kv_heads, head_dim=HEAD_DIM, v_head_dim=HEAD_DIM,
                     has_sinks=False, has_segments=False)
  blocks = sp._tpu_blocks(cfg, spec, False, heads // kv_heads)
  bm = bm_lib.make_block_mask(mask, length, length, blocks.block_q, blocks.block_kv, heads)
  grid = blocks.sub_grid if bm.num_partial else (1, 1)
  subs = grid[0] * grid[1]
  rows = schedule.row_steps(bm, None, heads, blocks.stack, sub_grid=grid)
  cols = schedule.col_steps(bm, None, heads, heads // kv_heads, blocks.stack, sub_grid=grid)

  def counts(sl, units, tile_rows, tile_cols):
    full = partial = 0
    sub = [[0, 0] for _ in range(subs)] if subs > 1 else None
    for u in range(units):
      for band in range(sl.num_bands):
        e = sl.entries(band, int(sl.unit_map[u]))
        full += int((e["kind"] == 2).sum())
        partial += int((e["kind"] == 1).sum())
        if sub is not None:
          packed = e["sub"][e["kind"] == 1]
          for c in range(subs):
            kind = (packed >> (2 * c)) & 3
            sub[c][0] += int((kind == 1).sum())
            sub[c][1] += int((kind == 2).sum())
    n_rows = units * int(sl.band_starts[-1])
    return StepCounts(units * sl.num_bands * sl.capacity, full, partial, n_rows, tile_rows, tile_cols, sub)

  rows_per_step = blocks.block_q * blocks.stack
  return blocks, {"fwd": counts(rows, heads // blocks.stack, rows_per_step, blocks.block_kv),
                  "dq": counts(rows, heads // blocks.stack, rows_per_step, blocks.block_kv),
                  "dkv": counts(cols, kv_heads, blocks.block_kv, rows_per_step)}


def _splash_counts(mask_name, length, heads, bq, bkv, bq_dkv, bkv_dkv, fused):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mi
  import numpy as np
  mask = _splash_mask(mask_name, length, heads)

  def counts(info, rows_axis, tile_rows, tile_cols):
    bm = np.asarray(info.block_mask)
    per_head = bm.shape[0]
    steps = bm.size * (heads // per_head)
    full = int((bm == 2).sum()) * (heads // per_head)
    partial = int((bm == 1).sum()) * (heads // per_head)
    return StepCounts(steps, full, partial, heads * bm.shape[rows_axis], tile_rows, tile_cols)

  fwd, _ = mi.process_mask(mask, (bq, bkv))
  dkv, _ = mi.process_mask_dkv(mask, (bq_dkv, bkv_dkv))
  out = {"fwd": counts(fwd, 1, bq, bkv), "dkv": counts(dkv, 2, bkv_dkv, bq_dkv)}
  if not fused:
    out["dq"] = counts(fwd, 1, bq, bkv)
  return out


@dataclasses.dataclass(frozen=True)
class Variant:
  kernel: str          # "project" or "splash"
  mask: str            # "causal", "window" (4095 + 4 sinks) or "local" (window 4095 alone)
  mode: str            # "fwd" or "bwd"
  length: int
  blocks: tuple        # project: (block_q, block_kv, block_kv_compute); splash: (bq, bkv, bkvc)
  heads: int = 1
  kv_heads: int = 1
  fused: bool = False  # one fused dQ/dK/dV backward kernel

  @property
  def name(self):
    extra = " fused" if self.fused else ""
    gqa = f" h{self.heads}/{self.kv_heads}" if self.heads > 1 else ""
    return f"{self.kernel} {self.mask} {self.mode} T={self.length}{gqa} blocks={'/'.join(map(str, self.blocks))}{extra}"


def compile_variant(v: Variant, generation: str, topology, dump_dir: str) -> dict:
  """Compiles one variant deviceless and returns per-kernel estimates."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.sharding.Mesh(topology.devices[:1], ("x",))
  rep = NamedSharding(mesh, P())
  bf = jnp.bfloat16
  if v.kernel == "project":
    import attn_jax
    bq, bk, bkc = v.blocks
    cfg = attn_jax.PallasTpuConfig(interpret=False, generation=generation, block_q=bq, block_kv=bk,
                                   block_kv_compute=bkc, fused_backward=v.fused)
    mask = _masks(v.mask, v.length)

    def fwd(q, k, v_):
      return attn_jax.attention(q, k, v_, mask=mask, implementation="pallas_tpu", config=cfg)
    shapes = [(1, v.length, v.heads, HEAD_DIM), (1, v.length, v.kv_heads, HEAD_DIM)]
    blocks, counts = _project_counts(cfg, v.mask, v.length, v.heads, v.kv_heads)
    names = {"fwd": "flash_fwd_tpu", "dq": "flash_dq_tpu", "dkv": "flash_dkv_tpu"}
    one_body = False
  else:
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    bq, bkv, bkvc = v.blocks
    bs = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkvc, block_q_dkv=bq,
                       block_kv_dkv=bkv, block_kv_dkv_compute=bkvc,
                       block_q_dq=None if v.fused else bq, block_kv_dq=None if v.fused else bkv,
                       use_fused_bwd_kernel=v.fused)
    kernel = sk.make_splash_mha_single_device(mask=_splash_mask(v.mask, v.length, v.heads), block_sizes=bs)
    scale = HEAD_DIM ** -0.5

    def fwd(q, k, v_):
      return kernel(q * scale, k, v_)
    shapes = [(v.heads, v.length, HEAD_DIM), (v.kv_heads, v.length, HEAD_DIM)]
    counts = _splash_counts(v.mask, v.length, v.heads, bq, bkv, bq, bkv, v.fused)
    names = {"fwd": "splash_mha_fwd", "dq": "splash_mha_dq", "dkv": "splash_mha_dkv"}
    one_body = True
  fn = fwd if v.mode == "fwd" else (
      lambda q, k, v_: jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v_))
  args = [jax.ShapeDtypeStruct(shapes[0], bf, sharding=rep)] + [jax.ShapeDtypeStruct(shapes[1], bf, sharding=rep)] * 2
  before = set(glob.glob(os.path.join(dump_dir, "*-packed-bundles-post-ra.txt")))
  start = time.perf_counter()
  jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - start
  new = sorted(set(glob.glob(os.path.join(dump_dir, "*-packed-bundles-post-ra.txt"))) - before)
  new = [f for f in new if "schedule-analysis" not in f]
  phases = ["fwd"] if v.mode == "fwd" else (["dkv"] if v.fused else ["dq", "dkv"])
  result = dict(variant=v.name, **dataclasses.asdict(v), compile_seconds=round(seconds, 1), kernels={})
  for phase in phases:
    files = [f for f in new if re.search(names[phase] + r"[^/]*\.\d+-\d+-packed", f)]
    if phase == "dkv" and v.kernel == "splash" and v.fused:
      files = [f for f in new if "splash_mha_dkv" in f]
    if len(files) != 1:
      raise RuntimeError(f"{v.name}: expected one {phase} kernel dump, got {files}")
    c = counts[phase]
    bodies = 1 if one_body else int(c.full > 0) + int(c.partial > 0)
    result["kernels"][phase] = estimate(analyse(files[0], bodies), c, one_body)
  result["cycles"] = sum(k["cycles"] for k in result["kernels"].values())
  return result


def default_variants(quick: bool = False) -> list[Variant]:
  causal, window = 8192, 32768
  if quick:
    return [Variant("project", "causal", "fwd", causal, (1024, 1024, 512)),
            Variant("splash", "causal", "fwd", causal, (1024, 1024, 512))]
  out = []
  for b in [(512, 512, 512), (1024, 1024, 512), (1024, 1024, 256), (2048, 1024, 512), (1024, 2048, 512)]:
    out.append(Variant("project", "causal", "fwd", causal, b))
  for b in [(512, 512, 512), (512, 1024, 512), (1024, 1024, 512), (1024, 2048, 512), (2048, 1024, 512)]:
    out.append(Variant("splash", "causal", "fwd", causal, b))
  for b in [(512, 512, 512), (1024, 1024, 512)]:
    out.append(Variant("project", "causal", "bwd", causal, b))
    out.append(Variant("project", "causal", "bwd", causal, b, fused=True))
    out.append(Variant("splash", "causal", "bwd", causal, b))
    out.append(Variant("splash", "causal", "bwd", causal, b, fused=True))
  for b in [(512, 512, 512), (1024, 1024, 512)]:
    out.append(Variant("project", "window", "fwd", window, b))
    out.append(Variant("splash", "window", "fwd", window, b))
  for b in [(512, 512, 128), (1024, 1024, 256)]:
    out.append(Variant("project", "window", "fwd", window, b))
  for b in [(512, 512, 512), (1024, 1024, 512)]:
    out.append(Variant("project", "local", "fwd", window, b))
    out.append(Variant("splash", "local", "fwd", window, b))
  out.append(Variant("project", "causal", "fwd", causal, (256, 1024, 512), heads=4, kv_heads=1))
  out.append(Variant("splash", "causal", "fwd", causal, (1024, 1024, 512), heads=4, kv_heads=1))
  return out


def report(results: list[dict], meta: dict) -> str:
  lines = [f"# Static cycle counts: Pallas TPU flash kernels vs splash attention", "",
           f"{meta['date']}, jax {meta['jax']}, libtpu {meta['libtpu']}, deviceless compile on a CPU "
           f"host (no TPU). Head dim {HEAD_DIM}, bf16, batch 1. Command: `{meta['command']}`.", "",
           "Cycles per 128x128 tile: bundles of the FULL (and PARTIAL) tile body divided by the "
           "tile's 128x128 sub-tiles (MXU ideal on v5e: 64 for the forward's two matmuls). "
           "Estimated cycles: the whole call, steps x step overhead + tile bodies + per-row init "
           "and finalize (see experiments/tpu_static.py); forward+backward rows count dQ and dK/dV.",
           ""]
  for gen in sorted({r["generation"] for r in results}):
    lines += [f"## {gen}", "",
              "| variant | kernel | cycles / 128x128 FULL | PARTIAL | step overhead | steps | est. cycles | vs splash best |",
              "|---|---|---|---|---|---|---|---|"]
    rows = [r for r in results if r["generation"] == gen]
    best = collections.defaultdict(lambda: None)
    for r in rows:
      key = (r["mask"], r["mode"], r["length"], r["heads"])
      if r["kernel"] == "splash" and (best[key] is None or r["cycles"] < best[key]):
        best[key] = r["cycles"]
    for r in rows:
      b = best[(r["mask"], r["mode"], r["length"], r["heads"])]
      ratio = f"{r['cycles'] / b:.2f}x" if b else "-"
      for n, (phase, k) in enumerate(r["kernels"].items()):
        lines.append(f"| {r['variant'] if n == 0 else ''} | {phase} | {k['cycles_per_128x128_full']} | "
                     f"{k['cycles_per_128x128_partial']} | {k['step_overhead']} | {k['steps']} | "
                     f"{k['cycles']:,} | {ratio if n == len(r['kernels']) - 1 else ''} |")
      if len(r["kernels"]) > 1:
        lines.append(f"| | total | | | | | {r['cycles']:,} | {ratio} |")
    lines.append("")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="benchmarks/tpu_static")
  parser.add_argument("--generations", default="v5e,v6e")
  parser.add_argument("--quick", action="store_true", help="one variant per kernel")
  parser.add_argument("--only", default="", help="substring filter on variant names")
  args = parser.parse_args(argv)
  dump = os.path.abspath(os.path.join(args.out, "dumps"))
  os.makedirs(dump, exist_ok=True)
  # libtpu reads its flags when the TPU plugin initialises (at the first topology request).
  os.environ["LIBTPU_INIT_ARGS"] = (
      f"--xla_jf_dump_to={dump} --xla_jf_dump_llo_text=true "
      "--xla_jf_dump_llo_pass_label_regex=packed-bundles-post-ra")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax
  from jax.experimental import topologies
  import importlib.metadata as md
  topo_names = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
  results = []
  for gen in args.generations.split(","):
    topology = topologies.get_topology_desc(topology_name=topo_names[gen], platform="tpu")
    for v in default_variants(args.quick):
      if args.only and args.only not in v.name:
        continue
      try:
        r = compile_variant(v, gen, topology, dump)
      except Exception as e:  # noqa: BLE001  A variant that does not compile is reported, not fatal.
        print(f"{gen} {v.name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        continue
      r["generation"] = gen
      results.append(r)
      tiles = ", ".join(f"{p} {k['cycles_per_128x128_full']}/tile" for p, k in r["kernels"].items())
      print(f"{gen} {v.name}: {r['cycles']:,} cycles ({tiles}; compiled in {r['compile_seconds']} s)",
            flush=True)
  meta = dict(date=datetime.date.today().isoformat(), jax=jax.__version__, libtpu=md.version("libtpu"),
              command="PYTHONPATH=. python -m experiments.tpu_static " + " ".join(argv or sys.argv[1:]))
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(dict(meta=meta, results=results), f, indent=1)
  with open(os.path.join(args.out, "report.md"), "w") as f:
    f.write(report(results, meta))


if __name__ == "__main__":
  main()
