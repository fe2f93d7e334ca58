r"""Neighborhood-attention benchmark on the configurations NATTEN publishes.

For each configuration: forward and forward+backward time of ``neighborhood_attention``, of
dense attention over the same tokens (``jax.nn.dot_product_attention``, cuDNN on GPU), the
token permutation's own cost, the BlockMask's visited / full / partial blocks, and the FLOP-bound
speed-up (1 / fraction of token pairs inside the neighborhood).

CPU smoke run (small grids, a few minutes on 2 cores, mostly the dense baseline)::

    python -m experiments.neighborhood_benchmark

NATTEN's configurations on a GPU / TPU (bf16)::

    python -m experiments.neighborhood_benchmark --configs=natten_1d,natten_1d_stride,natten_2d,\
natten_2d_stride,video_3d --dtype=bfloat16 --repeats=20 --workdir=benchmarks/neighborhood_h100

Writes ``report.md`` and ``results.json`` (with device, jax version and date) into --workdir.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import attn_jax
from attn_jax import block_mask as block_mask_lib
from attn_jax.neighborhood import api
from attn_jax.neighborhood import tiling
from attn_jax.neighborhood import windows
from experiments import report

# name: (grid, kernel_size, stride, is_causal, heads, head_dim)
CONFIGS = {
    "natten_1d": ((32768,), 2048, 1, False, 16, 128),
    "natten_1d_stride": ((32768,), 2048, 256, False, 16, 128),
    "natten_2d": ((256, 256), 80, 1, False, 24, 128),
    "natten_2d_stride": ((256, 256), 80, 16, False, 24, 128),
    "video_3d": ((30, 48, 80), (18, 24, 24), (1, 8, 8), False, 24, 128),
    "cpu_1d": ((4096,), 256, 1, False, 4, 64),
    "cpu_2d": ((64, 64), 16, 1, False, 4, 64),
    "cpu_2d_stride": ((64, 64), 32, 16, False, 4, 64),
    "cpu_3d": ((8, 32, 32), (4, 8, 8), 1, False, 4, 64),
}

FLAGS = flags.FLAGS


def _define_flags():
  # Defined only when run as a script, so that importing this module (tests) does not clash with
  # the flags of experiments.benchmark.
  flags.DEFINE_list("configs", ["cpu_1d", "cpu_2d", "cpu_2d_stride", "cpu_3d"],
                    f"Configurations: {sorted(CONFIGS)}.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Input dtype.")
  flags.DEFINE_integer("batch", 1, "Batch size.")
  flags.DEFINE_list("modes", ["fwd", "fwd_bwd"], "fwd and/or fwd_bwd.")
  flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median reported).")
  flags.DEFINE_bool("dense", True, "Also time dense attention (O(tokens^2) memory off GPU).")
  flags.DEFINE_string("workdir", "neighborhood_benchmark_out", "Output directory.")


def _time(fn, *args, repeats):
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _visible_pairs(grid, kernel, stride, dilation, causal) -> int:
  """Exact number of (query, key) pairs in the neighborhood: a product over axes."""
  total = 1
  for length, k, s, d, c in zip(grid, kernel, stride, dilation, causal):
    axis = 0
    for r in range(d):
      n = windows.residue_length(length, d, r)
      start, end = windows.axis_window(np.arange(n), n, k, s, c, np)
      axis += int((end - np.maximum(start, 0) + 1).sum())
    total *= axis
  return total


def _loss_of(fn):
  return jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))


def run_config(name: str, dtype, batch: int, modes, repeats: int, dense: bool) -> dict:
  grid, kernel, stride, causal, heads, head_dim = CONFIGS[name]
  kernel, stride, dilation, causal = api.check_arguments(grid, kernel, stride, 1, causal)
  tile = tiling.choose_tile_shape(grid, kernel, stride, dilation, causal)
  layout = tiling.TileLayout(grid, dilation, tile)
  mask = attn_jax.NeighborhoodMask(layout, kernel, stride, causal)
  start = time.perf_counter()
  bm = block_mask_lib.make_block_mask(mask, layout.num_tokens, layout.num_tokens,
                                      layout.tile_size, layout.tile_size)
  bm_seconds = time.perf_counter() - start
  tokens = math.prod(grid)
  pair_density = _visible_pairs(grid, kernel, stride, dilation, causal) / tokens ** 2
  record = dict(config=name, grid=grid, kernel_size=kernel, stride=stride, is_causal=causal,
                heads=heads, head_dim=head_dim, batch=batch, tile_shape=tile,
                visited_blocks=bm.num_nonempty, full_blocks=bm.num_full,
                partial_blocks=bm.num_partial, block_density=bm.density,
                pair_density=pair_density, flop_bound_speedup=1 / pair_density,
                block_mask_seconds=bm_seconds)
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  shape = (batch,) + grid + (heads, head_dim)
  q, k, v = (jax.random.normal(key, shape, dtype) for key in ks)

  def neighborhood(q, k, v):
    return attn_jax.neighborhood_attention(q, k, v, kernel, stride, dilation, causal)

  def permutation_only(q, k, v):
    return layout.unpermute(layout.permute(q) + layout.permute(k) + layout.permute(v))

  def dense_fn(q, k, v):
    flat = lambda x: x.reshape(batch, tokens, heads, head_dim)
    impl = "cudnn" if jax.default_backend() == "gpu" else None
    out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), implementation=impl)
    return out.reshape(shape)

  record["permutation_ms"] = _time(permutation_only, q, k, v, repeats=repeats)
  for mode in modes:
    wrap = (lambda f: f) if mode == "fwd" else _loss_of
    record[f"neighborhood_{mode}_ms"] = _time(wrap(neighborhood), q, k, v, repeats=repeats)
    if dense:
      try:
        record[f"dense_{mode}_ms"] = _time(wrap(dense_fn), q, k, v, repeats=repeats)
        record[f"speedup_{mode}"] = record[f"dense_{mode}_ms"] / record[f"neighborhood_{mode}_ms"]
      except Exception as e:  # cuDNN limits or memory: reported, not fatal.
        record[f"dense_{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return record


def markdown(records, env) -> str:
  lines = ["# Neighborhood attention benchmark", "",
           f"{env['date']}, jax {env['jax_version']}, {env['platform']} {env['device']}", "",
           "| config | grid | kernel | stride | tile | visited | full | partial | FLOP-bound speed-up | "
           "permute ms | mode | neighborhood ms | dense ms | speed-up |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda x: "-" if x is None else (f"{x:.2f}" if isinstance(x, float) else str(x))
  for r in records:
    for mode in ("fwd", "fwd_bwd"):
      if f"neighborhood_{mode}_ms" not in r:
        continue
      lines.append(
          f"| {r['config']} | {'x'.join(map(str, r['grid']))} | {'x'.join(map(str, r['kernel_size']))} | "
          f"{'x'.join(map(str, r['stride']))} | {'x'.join(map(str, r['tile_shape']))} | "
          f"{r['visited_blocks']} | {r['full_blocks']} | {r['partial_blocks']} | "
          f"{fmt(r['flop_bound_speedup'])} | {fmt(r['permutation_ms'])} | {mode} | "
          f"{fmt(r[f'neighborhood_{mode}_ms'])} | {fmt(r.get(f'dense_{mode}_ms'))} | "
          f"{fmt(r.get(f'speedup_{mode}'))} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  unknown = [c for c in FLAGS.configs if c not in CONFIGS]
  if unknown:
    raise app.UsageError(f"--configs: unknown {unknown}; known: {sorted(CONFIGS)}")
  bad = [m for m in FLAGS.modes if m not in ("fwd", "fwd_bwd")]
  if bad:
    raise app.UsageError(f"--modes: unknown {bad}; known: fwd, fwd_bwd")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  records = [run_config(c, jnp.dtype(FLAGS.dtype), FLAGS.batch, FLAGS.modes, FLAGS.repeats,
                        FLAGS.dense) for c in FLAGS.configs]
  env = report.environment()
  with open(os.path.join(FLAGS.workdir, "results.json"), "w") as f:
    json.dump(dict(environment=env, dtype=FLAGS.dtype, results=records), f, indent=1)
  md = markdown(records, env)
  with open(os.path.join(FLAGS.workdir, "report.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
