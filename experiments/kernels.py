"""Kernel benchmark: the block-sparse flash kernels against cuDNN / splash, the xla backend and
the ideal block-sparse speed-up.

Cases: dense causal; sliding window 1024 with 4 sink tokens; non-causal block-sparse
layouts at densities 50 / 25 / 12.5 % whose blocks equal the kernel's tiles (so every visited
tile is FULL). For each case, sequence length and mode (``fwd`` / ``fwd_bwd``) it reports

* ``time_ms`` of the platform's kernel (``pallas_gpu`` / ``pallas_tpu``), of the ``xla``
  backend, and of the vendor baseline: ``jax.nn.dot_product_attention(implementation="cudnn")``
  on GPU, splash attention on TPU (with the same mask where the baseline can express it: the
  window baseline has no sinks, the block-sparse baseline is the dense non-causal call);
* ``tflops``: achieved TFLOP/s counting only the tiles the kernel computes
  (4 * B * H * D * computed_pairs for the forward pass: QK^T and PV; 3.5x that for forward +
  backward, whose 5 extra matmuls recompute S and produce dP, dV, dQ and dK);
* ratios: ``vs_baseline = baseline_time / kernel_time`` (> 1 is faster than the baseline),
  ``vs_xla``, and for block-sparse and window cases ``ideal_ratio = time / (dense_time * density)``
  (1.0 is the ideal speed-up; the issue's target is <= 1.3).

On a CPU the kernels only run in interpret mode, which measures nothing useful: the suite then
times the xla backend alone and says so in the report.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import attn_jax
from attn_jax import block_mask as block_mask_lib
from attn_jax import dispatch
from attn_jax import masks

CASES = ("dense_causal", "window1024_sinks4", "sparse_50", "sparse_25", "sparse_12.5")
MODES = ("fwd", "fwd_bwd")


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int = 2
  heads: int = 16
  head_dim: int = 128
  dtype: str = "bfloat16"


def kernel_backend(platform: str | None = None) -> str | None:
  platform = platform or dispatch.current_platform()
  return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform)


def kernel_tiles(backend: str | None, seq_len: int, head_dim: int) -> tuple[int, int]:
  """Tile sizes the benchmark runs the kernel with (passed explicitly in its config), so that
  block-sparse layouts align with them."""
  if backend == "pallas_gpu":
    return (64, 32) if head_dim > 128 else (128, 64)
  if backend == "pallas_tpu":
    return (min(512, seq_len), min(512, seq_len))
  # The xla backend on CPU: small tiles so that 1k-2k sequences still have 8+ blocks per row.
  return (min(128, seq_len), min(128, seq_len))


def kernel_config(backend: str | None, tiles: tuple[int, int]):
  if backend == "pallas_gpu":
    return attn_jax.PallasGpuConfig(block_q=tiles[0], block_kv=tiles[1])
  if backend == "pallas_tpu":
    return attn_jax.PallasTpuConfig(block_q=tiles[0], block_kv=tiles[1])
  return attn_jax.XlaConfig(block_q=tiles[0], block_kv=tiles[1])


def sparse_layout(seq_len: int, block_q: int, block_kv: int, density: float, seed: int = 0):
  """A non-causal block layout with ``round(density * nk)`` random key blocks per query block."""
  nq, nk = seq_len // block_q, seq_len // block_kv
  per_row = max(1, round(density * nk))
  rng = np.random.RandomState(seed)
  layout = np.zeros((nq, nk), bool)
  for i in range(nq):
    layout[i, rng.choice(nk, per_row, replace=False)] = True
  return masks.block_layout(layout, block_q, block_kv)


def case_mask(case: str, seq_len: int, tiles: tuple[int, int]):
  if case == "dense_causal":
    return masks.causal(), True
  if case == "window1024_sinks4":
    return masks.sliding_window(1023) | masks.sink_tokens(4), True
  density = float(case.split("_")[1]) / 100
  return sparse_layout(seq_len, tiles[0], tiles[1], density), False


def _time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _mode_fn(forward, mode):
  if mode == "fwd":
    return jax.jit(forward)
  return jax.jit(jax.grad(lambda q, k, v: forward(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))


def _baseline_forward(platform: str, case: str, causal: bool, seq_len: int, shape: Shape):
  """Vendor baseline for the case, or None if it cannot express it on this platform."""
  if platform == "gpu":
    kwargs = {}
    if case == "dense_causal":
      kwargs["is_causal"] = True
    elif case.startswith("window"):
      kwargs.update(is_causal=True, local_window_size=(1023, 0))
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)
  if platform == "tpu":
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    shp = (seq_len, seq_len)
    if case == "dense_causal":
      m = splash.CausalMask(shp)
    elif case.startswith("window"):
      m = splash.LocalMask(shp, (1023, 0), 0)
    else:
      m = splash.FullMask(shp)
    kernel = splash.make_splash_mha_single_device(splash.MultiHeadMask([m] * shape.heads))
    scale = shape.head_dim ** -0.5

    def forward(q, k, v):
      to_hm = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
      out = jax.vmap(kernel)(to_hm(q * scale), to_hm(k), to_hm(v))
      return out.transpose(0, 2, 1, 3)
    return forward
  return None


def measure(case: str, seq_len: int, mode: str, shape: Shape, repeats: int,
            implementations=None) -> dict:
  platform = dispatch.current_platform()
  backend = kernel_backend(platform)
  tiles = kernel_tiles(backend, seq_len, shape.head_dim)
  mask, causal = case_mask(case, seq_len, tiles)
  bm = block_mask_lib.make_block_mask(mask, seq_len, seq_len, *tiles)
  computed_pairs = bm.num_nonempty * tiles[0] * tiles[1]
  density = bm.density
  dt = jnp.dtype(shape.dtype)
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  dims = (shape.batch, seq_len, shape.heads, shape.head_dim)
  q, k, v = (jax.random.normal(key, dims, dt) for key in ks)
  flops = 4.0 * shape.batch * shape.heads * shape.head_dim * computed_pairs * (1.0 if mode == "fwd" else 3.5)
  record = dict(case=case, seq_len=seq_len, mode=mode, density=density, partial_tiles=bm.num_partial,
                tiles=list(tiles), computed_gflop=flops / 1e9)
  impls = implementations or ([backend] if backend else []) + ["xla", "baseline"]
  for impl in impls:
    try:
      if impl == "baseline":
        forward = _baseline_forward(platform, case, causal, seq_len, shape)
        if forward is None:
          continue
      else:
        config = kernel_config(impl, tiles) if impl == backend else attn_jax.XlaConfig()
        forward = (lambda m, i, c: lambda q, k, v: attn_jax.attention(q, k, v, mask=m, implementation=i, config=c))(
            mask, impl, config)
      record[f"{impl}_ms"] = _time(_mode_fn(forward, mode), (q, k, v), repeats)
    except Exception as e:  # Reported per implementation; the sweep goes on.
      record[f"{impl}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  main = record.get(f"{backend}_ms") if backend else record.get("xla_ms")
  if main:
    record["tflops"] = flops / (main * 1e-3) / 1e12
    if "baseline_ms" in record:
      record["vs_baseline"] = record["baseline_ms"] / main
    if backend and "xla_ms" in record:
      record["vs_xla"] = record["xla_ms"] / main
  return record


def add_ideal_ratios(records: list[dict], backend: str | None) -> None:
  """time / (own dense time x density), with the dense non-causal time estimated from the
  dense causal run (a causal mask computes about half the tiles: dense = causal / causal density)."""
  key = f"{backend}_ms" if backend else "xla_ms"
  dense = {}
  for r in records:
    if r["case"] == "dense_causal" and key in r:
      dense[(r["seq_len"], r["mode"])] = r[key] / r["density"]
  for r in records:
    base = dense.get((r["seq_len"], r["mode"]))
    if r["case"] != "dense_causal" and base and key in r:
      r["ideal_ratio"] = r[key] / (base * r["density"])


def markdown(records: list[dict], env: dict, shape: Shape, backend: str | None) -> str:
  lines = ["# Kernel benchmark", ""]
  lines.append(f"- date: {env['date']}; device: {env['device']} ({env['platform']}); jax {env['jax_version']}")
  lines.append(f"- shape: batch {shape.batch}, heads {shape.heads}, head_dim {shape.head_dim}, {shape.dtype}")
  if backend is None:
    lines.append("- no TPU/GPU: the Pallas kernels were not timed (interpret mode measures nothing); "
                 "xla backend only")
  baseline = {"gpu": "cuDNN (jax.nn.dot_product_attention)", "tpu": "splash attention"}.get(env["platform"], "none")
  lines.append(f"- baseline: {baseline}. TFLOP/s count only computed tiles; ideal ratio = time / "
               "(own dense time x density), 1.0 is the ideal block-sparse speed-up")
  lines.append("")
  cols = ([f"{backend}_ms"] if backend else []) + ["xla_ms", "baseline_ms"]
  header = ("| case | seq | mode | density | " + " | ".join(c.replace("_ms", " ms") for c in cols)
            + " | TFLOP/s | vs baseline | vs xla | ideal ratio |")
  lines += [header, "|" + "---|" * (len(cols) + 8)]

  def f(r, name, digits=2):
    v = r.get(name)
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))
  for r in records:
    times = " | ".join(f(r, c) for c in cols)
    lines.append(f"| {r['case']} | {r['seq_len']} | {r['mode']} | {r['density']:.3f} | {times} | "
                 f"{f(r, 'tflops', 3)} | {f(r, 'vs_baseline')} | {f(r, 'vs_xla')} | {f(r, 'ideal_ratio')} |")
  errors = [(r, k, v) for r in records for k, v in r.items() if k.endswith("_error")]
  if errors:
    lines += ["", "## Errors", ""]
    lines += [f"- {r['case']} / {r['seq_len']} / {r['mode']} / {k[:-6]}: {v}" for r, k, v in errors]
  return "\n".join(lines) + "\n"


def default_seq_lens(platform: str) -> list[int]:
  return [4096, 8192, 16384, 32768] if platform in ("gpu", "tpu") else [1024, 2048]


def default_shape(platform: str) -> Shape:
  if platform in ("gpu", "tpu"):
    return Shape()
  return Shape(batch=1, heads=2, head_dim=64, dtype="float32")

