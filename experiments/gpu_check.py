r"""Issue 12, part B: the benchmark sweep of one prepared GPU run (``experiments/gpu_check.sh``).

On one H100 / H200 (bf16, batch 1, 16 heads, head dim 128 then 64), within ``--budget_s``:

* softmax attention, forward and forward+backward, 4k to 32k tokens: this project's
  ``pallas_gpu`` kernels vs the ``cudnn`` backend vs tokamax (its Mosaic GPU and Triton
  implementations, when the package is importable) vs the ``xla`` backend (up to 8k tokens), for
  dense, causal, window 1024 + 4 sink tokens (cuDNN and tokamax run the window without the sinks,
  which they cannot express) and block-sparse layouts at 50 / 25 / 12.5 % density;
* neighborhood attention 1-D, 32k tokens, window 2048, against dense causal and dense attention
  (NATTEN reports 8.3x over dense for this case on an H100);
* Lightning (fixed decays) and GLA (per-channel data-dependent decays) linear attention on the
  ``pallas_gpu`` kernels against dense causal attention, 4k to 64k tokens;
* probes of jax's cuDNN path: its causal alignment for unequal lengths, and whether a non-causal
  left-only window still attends to the future (jax-ml/jax#39576).

TFLOP/s count the token pairs the mask shows: ``4 * B * H * D * pairs`` for the forward pass
(QK^T and PV), 3.5 times that for forward + backward. Ratios: ``t(pallas_gpu) / t(impl)`` (> 1:
impl is faster), and for block-sparse layouts the ideal ratio ``t / (t_dense * density)`` (1.0
is the ideal block-sparse speed-up).

The run has two phases so that the timings are not disturbed by compilation: every case is
compiled first, on ``--workers`` threads, for at most ``--compile_share`` of the budget, in
priority order (head dim 128 softmax, neighborhood, linear, then head dim 64); then the compiled
cases are timed one at a time until the budget is spent. Cases not reached are listed as
skipped. Results are rewritten after every timed case, so a run cut short still leaves them:
``gpu_check.json`` and ``gpu_check.md`` in ``--out`` and in ``benchmarks/gpu_<device>/``.

CPU dry run of the plumbing (tiny sizes, Pallas in interpret mode, a few minutes)::

    python -m experiments.gpu_check --tiny --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

import jax
import jax.numpy as jnp
import numpy as np

import attn_jax
from attn_jax import masks
from attn_jax import mechanisms
from experiments import kernels
from experiments import neighborhood_benchmark

FWD_BWD_FLOP_FACTOR = 3.5


@dataclasses.dataclass(frozen=True)
class Settings:
  seq_lens: tuple[int, ...] = (4096, 8192, 16384, 32768)
  head_dims: tuple[int, ...] = (128, 64)
  batch: int = 1
  heads: int = 16
  dtype: str = "bfloat16"
  modes: tuple[str, ...] = ("fwd", "fwd_bwd")
  softmax_cases: tuple[str, ...] = ("causal", "dense", "window_sinks", "sparse_50", "sparse_25", "sparse_12.5")
  impls: tuple[str, ...] = ("pallas_gpu", "cudnn", "tokamax_mosaic", "tokamax_triton", "xla")
  xla_max_len: int = 8192
  window: int = 1024
  sinks: int = 4
  neighborhood_tokens: int = 32768
  neighborhood_window: int = 2048
  linear_lens: tuple[int, ...] = (4096, 16384, 65536)
  repeats: int = 10


# The CPU dry run: every section and implementation kind at sizes interpret mode can afford.
TINY = Settings(seq_lens=(256,), head_dims=(16,), heads=2, dtype="bfloat16",
                softmax_cases=("causal", "dense", "window_sinks", "sparse_50"),
                impls=("pallas_gpu", "cudnn", "tokamax_mosaic", "xla"), xla_max_len=256, window=32,
                sinks=2, neighborhood_tokens=256, neighborhood_window=32, linear_lens=(128,), repeats=2)


@dataclasses.dataclass(frozen=True)
class Item:
  """One measurement: a section's case for one implementation, length, head dim and mode."""

  section: str  # "softmax", "neighborhood" or "linear"
  case: str
  impl: str
  seq: int
  head_dim: int
  mode: str

  @property
  def key(self) -> str:
    return f"{self.section}/{self.case}/{self.impl}/{self.seq}/d{self.head_dim}/{self.mode}"


def _softmax_impls(case: str, seq: int, s: Settings) -> list[str]:
  out = []
  for impl in s.impls:
    if impl == "xla" and seq > s.xla_max_len:
      continue
    if case.startswith("sparse") and impl not in ("pallas_gpu", "xla"):
      continue
    out.append(impl)
  return out


def plan_items(s: Settings) -> list[Item]:
  """Every measurement, in priority order (what the budget keeps when it cannot keep all)."""
  items = []

  def add(item):
    if item not in items:
      items.append(item)

  def softmax(dim):
    for case in s.softmax_cases:
      for seq in s.seq_lens:
        for mode in s.modes:
          for impl in _softmax_impls(case, seq, s):
            add(Item("softmax", case, impl, seq, dim, mode))

  softmax(s.head_dims[0])
  d = s.head_dims[0]
  for mode in s.modes:
    add(Item("neighborhood", f"1d_window{s.neighborhood_window}", "pallas_gpu", s.neighborhood_tokens, d, mode))
    for case in ("causal", "dense"):
      for impl in ("cudnn", "pallas_gpu"):
        if impl in s.impls:
          add(Item("softmax", case, impl, s.neighborhood_tokens, d, mode))
  for seq in s.linear_lens:
    for mode in s.modes:
      for case in ("lightning", "gla"):
        add(Item("linear", case, "pallas_gpu", seq, d, mode))
      for impl in ("cudnn", "pallas_gpu"):
        if impl in s.impls:
          add(Item("softmax", "causal", impl, seq, d, mode))
  for dim in s.head_dims[1:]:
    softmax(dim)
  return items


def _window_mask(s: Settings, sinks: bool):
  mask = masks.sliding_window(s.window - 1)
  return mask | masks.sink_tokens(s.sinks) if sinks else mask


def _tiles(seq: int, dim: int):
  return kernels.kernel_tiles("pallas_gpu", seq, dim)


def softmax_mask(case: str, seq: int, dim: int, s: Settings, impl: str):
  """The case's mask; cuDNN and tokamax run the window case without its sink tokens."""
  if case == "causal":
    return masks.causal()
  if case == "dense":
    return None
  if case == "window_sinks":
    return _window_mask(s, sinks=impl in ("pallas_gpu", "xla"))
  density = float(case.split("_")[1]) / 100
  return kernels.sparse_layout(seq, *_tiles(seq, dim), density)


def visible_pairs(item: Item, s: Settings) -> int:
  """Token pairs the measured mask shows (the work a perfect kernel does)."""
  n = item.seq
  if item.section == "neighborhood":
    k = (s.neighborhood_window,)
    return neighborhood_benchmark._visible_pairs((n,), k, (1,), (1,), (False,))
  if item.section == "linear" or item.case == "causal":
    return n * (n + 1) // 2
  if item.case == "dense":
    return n * n
  if item.case == "window_sinks":
    rows = np.arange(n, dtype=np.int64)
    first = np.maximum(0, rows - (s.window - 1))
    pairs = rows - first + 1
    if item.impl in ("pallas_gpu", "xla"):
      pairs = pairs + np.maximum(0, np.minimum(s.sinks, first))  # sink keys left of the window
    return int(pairs.sum())
  mask = softmax_mask(item.case, n, item.head_dim, s, item.impl)
  return int(mask.layout.sum()) * mask.block_q * mask.block_kv


def _tokamax():
  import tokamax  # noqa: F401  (optional: reported as missing when it does not import)
  return tokamax


def forward_fn(item: Item, s: Settings):
  """``(fn, arg_shapes)``: ``fn(*args) -> out`` for the item, and its inputs as ShapeDtypeStructs."""
  dt = jnp.dtype(s.dtype)
  qkv = [jax.ShapeDtypeStruct((s.batch, item.seq, s.heads, item.head_dim), dt)] * 3
  if item.section == "linear":
    if item.case == "lightning":
      slopes = jnp.asarray(mechanisms.lightning_slopes(s.heads))
      return (lambda q, k, v: mechanisms.lightning_attention(q, k, v, slopes, implementation=item.impl)), qkv
    decay = jax.ShapeDtypeStruct((s.batch, item.seq, s.heads, item.head_dim), jnp.float32)
    return (lambda q, k, v, log_decay: attn_jax.linear_attention(
        q, k, v, log_decay=log_decay, implementation=item.impl)), qkv + [decay]
  if item.section == "neighborhood":
    w = s.neighborhood_window
    return (lambda q, k, v: attn_jax.neighborhood_attention(q, k, v, w, implementation=item.impl)), qkv
  mask = softmax_mask(item.case, item.seq, item.head_dim, s, item.impl)
  if item.impl.startswith("tokamax"):
    tokamax = _tokamax()
    kwargs = {}
    if item.case == "causal":
      kwargs["is_causal"] = True
    elif item.case == "window_sinks":
      kwargs.update(is_causal=True, local_window_size=(s.window - 1, 0))
    implementation = item.impl.split("_", 1)[1]
    return (lambda q, k, v: tokamax.dot_product_attention(q, k, v, implementation=implementation, **kwargs)), qkv
  config = None
  if item.impl == "pallas_gpu":
    config = attn_jax.PallasGpuConfig(*_tiles(item.seq, item.head_dim))
  return (lambda q, k, v: attn_jax.attention(q, k, v, mask=mask, implementation=item.impl, config=config)), qkv


def _with_mode(fn, mode: str, nargs: int):
  if mode == "fwd":
    return fn
  return jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=tuple(range(min(3, nargs))))


def compile_item(item: Item, s: Settings):
  fn, shapes = forward_fn(item, s)
  start = time.perf_counter()
  compiled = jax.jit(_with_mode(fn, item.mode, len(shapes))).lower(*shapes).compile()
  return compiled, shapes, time.perf_counter() - start


def _inputs(shapes, seed: int):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  out = []
  for key, sd in zip(keys, shapes):
    x = jax.random.normal(key, sd.shape, jnp.float32)
    if sd.dtype == jnp.float32 and len(out) == 3:
      x = -jax.nn.softplus(x - 1.0)  # log decays of GLA gates: in (-inf, 0)
    out.append(x.astype(sd.dtype))
  return out


def time_compiled(compiled, shapes, repeats: int, seed: int = 0) -> dict:
  args = _inputs(shapes, seed)
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  first = time.perf_counter() - start
  # Long calls need fewer repeats for a stable median; the budget matters more than the tail.
  n = max(2, min(repeats, int(1.0 / max(first, 1e-4))))
  times = []
  for _ in range(n):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return dict(time_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times), runs=n)


def _error(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def probes() -> dict:
  """What jax's cuDNN path does where this project's cudnn backend relies on (or avoids) it."""
  out = {}
  if jax.default_backend() != "gpu":
    return dict(skipped="no GPU")
  ks = jax.random.split(jax.random.PRNGKey(1), 3)

  def run(tq, tk, **kwargs):
    q = jax.random.normal(ks[0], (1, tq, 2, 64), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, tk, 2, 64), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, tk, 2, 64), jnp.bfloat16)
    got = jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kwargs).astype(jnp.float32)
    return q, k, v, got

  def err(a, b):
    return float(jnp.abs(a - b.astype(jnp.float32)).max())

  for tq, tk in ((256, 512), (512, 256)):
    name = f"causal_alignment_q{tq}_kv{tk}"
    try:
      q, k, v, got = run(tq, tk, is_causal=True)
      top_left = jnp.tril(jnp.ones((tq, tk), bool))
      bottom_right = jnp.tril(jnp.ones((tq, tk), bool), k=tk - tq)
      out[name] = {
          "max_err_vs_top_left": err(got, jax.nn.dot_product_attention(q, k, v, mask=top_left[None, None])),
          "max_err_vs_bottom_right": err(got, jax.nn.dot_product_attention(q, k, v, mask=bottom_right[None, None])),
      }
    except Exception as e:  # A probe reports what happened; it never stops the run.
      out[name] = _error(e)
  try:
    q, k, v, got = run(512, 512, local_window_size=(64, 0))
    want = jax.nn.dot_product_attention(q, k, v, local_window_size=(64, 0), implementation="xla")
    out["noncausal_left_window_max_err"] = err(got, want)
    out["noncausal_left_window_note"] = "large: jax-ml/jax#39576 present (attends to the future)"
  except Exception as e:
    out["noncausal_left_window_max_err"] = _error(e)
  return out


def environment() -> dict:
  dev = jax.devices()[0]
  env = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             device=getattr(dev, "device_kind", str(dev)), platform=dev.platform,
             jax=jax.__version__, python=platform.python_version(), host=platform.node())
  try:
    import jaxlib
    env["jaxlib"] = jaxlib.__version__
  except ImportError:
    pass
  try:
    env["driver"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
        text=True, timeout=20).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    env["driver"] = None
  try:
    from jax._src.lib import cuda_versions  # Private, and absent on CPU-only jaxlib: best effort.
    env["cudnn"] = cuda_versions.cudnn_get_version() if cuda_versions else None
  except Exception:  # noqa: BLE001
    env["cudnn"] = None
  try:
    env["tokamax"] = getattr(_tokamax(), "__version__", "unknown")
  except Exception as e:  # noqa: BLE001
    env["tokamax"] = f"not available ({_error(e)})"
  return env


def test_summary(out_dir: str) -> dict | None:
  """Counts and failures from the pytest junit file the shell wrapper writes, if any."""
  path = os.path.join(out_dir, "gpu_tests.xml")
  if not os.path.exists(path):
    return None
  try:
    root = ElementTree.parse(path).getroot()
  except ElementTree.ParseError as e:
    return dict(error=f"unreadable junit file: {e}")
  suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
  summary = {k: sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors", "skipped")}
  summary["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                       if c.find("failure") is not None or c.find("error") is not None]
  return summary


def _fmt(x, digits=2):
  if x is None:
    return "-"
  return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def derived(records: dict, s: Settings) -> None:
  """Adds TFLOP/s, ratios to pallas_gpu and ideal block-sparse ratios to the timed records."""
  for r in records.values():
    if "time_ms" in r:
      r["tflops"] = r["gflop"] / r["time_ms"]  # GFLOP / ms = TFLOP/s
  for r in records.values():
    if "time_ms" not in r:
      continue
    if r["section"] == "softmax" and r["impl"] != "pallas_gpu":
      base = records.get(Item("softmax", r["case"], "pallas_gpu", r["seq"], r["head_dim"], r["mode"]).key)
      if base and "time_ms" in base:
        r["speed_vs_pallas_gpu"] = base["time_ms"] / r["time_ms"]
    if r["section"] == "softmax" and r["case"].startswith("sparse"):
      dense = records.get(Item("softmax", "dense", r["impl"], r["seq"], r["head_dim"], r["mode"]).key)
      if dense and "time_ms" in dense:
        r["ideal_ratio"] = r["time_ms"] / (dense["time_ms"] * r["density"])
    if r["section"] in ("neighborhood", "linear"):
      for case in ("causal", "dense"):
        for impl in ("cudnn", "pallas_gpu"):
          base = records.get(Item("softmax", case, impl, r["seq"], r["head_dim"], r["mode"]).key)
          if base and "time_ms" in base:
            r[f"speedup_vs_{case}_{impl}"] = base["time_ms"] / r["time_ms"]


def markdown(payload: dict, s: Settings) -> str:
  env, records = payload["environment"], payload["records"]
  lines = [f"# GPU check: {env.get('device')}", "",
           f"- date: {env.get('date')}; driver {env.get('driver')}; jax {env.get('jax')} "
           f"(jaxlib {env.get('jaxlib')}); cuDNN {env.get('cudnn')}; Python {env.get('python')}",
           f"- tokamax: {env.get('tokamax')}",
           f"- shape: batch {s.batch}, {s.heads} heads (MHA), {s.dtype}; TFLOP/s count mask-visible pairs "
           f"(4·B·H·D·pairs forward, x{FWD_BWD_FLOP_FACTOR} forward+backward); 'vs pallas' = "
           "t(pallas_gpu) / t(impl); ideal = t / (t_dense x density)",
           f"- budget {payload['budget_s']:.0f} s: {payload['timed']} cases timed, {payload['compiled']} compiled, "
           f"{len(payload['skipped'])} skipped"]
  tests = payload.get("tests")
  if tests:
    lines.append(f"- GPU tests: {tests}")
  lines += ["", "## Probes of jax's cuDNN path", "", "```", json.dumps(payload.get("probes"), indent=1), "```", ""]
  impls = list(s.impls)
  for dim in s.head_dims:
    for mode in s.modes:
      rows = [r for r in records.values() if r["section"] == "softmax" and r["head_dim"] == dim and r["mode"] == mode]
      if not rows:
        continue
      lines += [f"## Softmax attention, head dim {dim}, {mode}", "",
                "| case | tokens | " + " | ".join(f"{i} ms (TFLOP/s)" for i in impls) +
                " | cudnn vs pallas | best tokamax vs pallas | ideal (pallas) |",
                "|---|---|" + "---|" * (len(impls) + 3)]
      for case in s.softmax_cases:
        for seq in sorted({r["seq"] for r in rows}):
          get = lambda impl: records.get(Item("softmax", case, impl, seq, dim, mode).key, {})  # noqa: E731
          cells = []
          for impl in impls:
            r = get(impl)
            cells.append(f"{_fmt(r.get('time_ms'))} ({_fmt(r.get('tflops'), 1)})" if "time_ms" in r
                         else ("err" if "error" in r else "-"))
          if all(c == "-" for c in cells):
            continue
          tok = [get(i).get("speed_vs_pallas_gpu") for i in impls if i.startswith("tokamax")]
          tok = [t for t in tok if t is not None]
          lines.append(f"| {case} | {seq} | " + " | ".join(cells) + f" | {_fmt(get('cudnn').get('speed_vs_pallas_gpu'))} | "
                       f"{_fmt(max(tok) if tok else None)} | {_fmt(get('pallas_gpu').get('ideal_ratio'))} |")
      lines.append("")
  for section, title in (("neighborhood", "Neighborhood attention 1-D vs dense"), ("linear", "Linear attention vs dense causal")):
    rows = [r for r in records.values() if r["section"] == section]
    if not rows:
      continue
    lines += [f"## {title}", "", "| case | tokens | mode | ms | TFLOP/s-equivalent | x causal cudnn | x causal pallas | "
              "x dense cudnn | x dense pallas |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
      lines.append(f"| {r['case']} | {r['seq']} | {r['mode']} | {_fmt(r.get('time_ms'))} | {_fmt(r.get('tflops'), 1)} | "
                   f"{_fmt(r.get('speedup_vs_causal_cudnn'))} | {_fmt(r.get('speedup_vs_causal_pallas_gpu'))} | "
                   f"{_fmt(r.get('speedup_vs_dense_cudnn'))} | {_fmt(r.get('speedup_vs_dense_pallas_gpu'))} |")
    lines.append("")
  errors = [r for r in records.values() if "error" in r]
  if errors:
    lines += ["## Errors and refusals", ""] + [f"- {r['key']}: {r['error']}" for r in errors] + [""]
  if payload["skipped"]:
    lines += ["## Skipped (budget)", "", ", ".join(payload["skipped"]), ""]
  return "\n".join(lines)


def _write(payload: dict, s: Settings, dirs: list[str]) -> None:
  md = markdown(payload, s)
  for d in dirs:
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "gpu_check.json"), "w") as f:
      json.dump(payload, f, indent=1, default=str)
    with open(os.path.join(d, "gpu_check.md"), "w") as f:
      f.write(md)


def run(s: Settings, out_dir: str, budget_s: float, workers: int = 8, compile_share: float = 0.5,
        bench_dir: str | None = None) -> dict:
  """The whole sweep within ``budget_s`` seconds; writes and returns the result payload."""
  t0 = time.monotonic()
  deadline = t0 + budget_s
  env = environment()
  dirs = [out_dir] + ([bench_dir] if bench_dir else [])
  payload = dict(environment=env, settings=dataclasses.asdict(s), budget_s=budget_s, tests=test_summary(out_dir),
                 probes=None, records={}, skipped=[], compiled=0, timed=0)
  items = plan_items(s)
  records = payload["records"]
  for it in items:
    pairs = visible_pairs(it, s)
    gflop = 4.0 * s.batch * s.heads * it.head_dim * pairs / 1e9
    records[it.key] = dict(key=it.key, **dataclasses.asdict(it), pairs=pairs, density=pairs / it.seq ** 2,
                           gflop=gflop * (1.0 if it.mode == "fwd" else FWD_BWD_FLOP_FACTOR))
  _write(payload, s, dirs)

  # Phase 1: compile in priority order on worker threads, until the compile share is spent.
  compiled = {}
  compile_deadline = t0 + compile_share * budget_s
  if compile_deadline <= time.monotonic():
    items_to_compile = []
  else:
    items_to_compile = items
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
  futures = {it.key: pool.submit(compile_item, it, s) for it in items_to_compile}
  for it in items_to_compile:
    left = compile_deadline - time.monotonic()
    if left <= 0:
      break
    try:
      compiled[it.key] = futures[it.key].result(timeout=left)
      records[it.key]["compile_s"] = compiled[it.key][2]
    except concurrent.futures.TimeoutError:
      break
    except Exception as e:  # A case an implementation cannot run is a result, not a failure.
      records[it.key]["error"] = _error(e)
  # Cases still queued are dropped; compiles already running finish first, so that none runs
  # while the timings are taken.
  pool.shutdown(wait=True, cancel_futures=True)
  for it in items_to_compile:
    f = futures[it.key]
    if it.key not in compiled and "error" not in records[it.key] and f.done() and not f.cancelled():
      try:
        compiled[it.key] = f.result()
        records[it.key]["compile_s"] = compiled[it.key][2]
      except Exception as e:  # noqa: BLE001
        records[it.key]["error"] = _error(e)
  payload["compiled"] = len(compiled)
  payload["probes"] = probes()
  _write(payload, s, dirs)

  # Phase 2: time the compiled cases one at a time, in priority order.
  for i, it in enumerate(items):
    if it.key not in compiled:
      if "error" not in records[it.key]:
        payload["skipped"].append(it.key)
      continue
    if time.monotonic() > deadline:
      payload["skipped"].append(it.key)
      continue
    exe, shapes, _ = compiled.pop(it.key)
    try:
      records[it.key].update(time_compiled(exe, shapes, s.repeats, seed=i))
      payload["timed"] += 1
    except Exception as e:  # Out of memory, a runtime refusal: reported per case.
      records[it.key]["error"] = _error(e)
    del exe
    derived(records, s)
    _write(payload, s, dirs)
  derived(records, s)
  payload["elapsed_s"] = time.monotonic() - t0
  _write(payload, s, dirs)
  return payload


def _device_slug() -> str:
  kind = getattr(jax.devices()[0], "device_kind", jax.default_backend())
  return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="output directory")
  parser.add_argument("--budget_s", type=float, default=300.0, help="seconds for the whole sweep")
  parser.add_argument("--workers", type=int, default=8, help="compile threads")
  parser.add_argument("--compile_share", type=float, default=0.5, help="share of the budget for compiling")
  parser.add_argument("--tiny", action="store_true", help="CPU dry run at tiny sizes")
  parser.add_argument("--no_bench_copy", action="store_true", help="do not also write benchmarks/gpu_<device>/")
  args = parser.parse_args(argv)
  s = TINY if args.tiny else Settings()
  bench = None if args.no_bench_copy or args.tiny else os.path.join("benchmarks", f"gpu_{_device_slug()}")
  payload = run(s, args.out, args.budget_s, workers=args.workers, compile_share=args.compile_share, bench_dir=bench)
  print(markdown(payload, s))
  sys.stdout.flush()
  # A compile thread still stuck in a backend must not hold the process (and the GPU lease) open.
  os._exit(0)


if __name__ == "__main__":
  main()
