r"""The attention benchmark.

``--suite=efficiency`` (default): time and compiled memory vs sequence length for every
registered mechanism in CAB's four patterns, and CAB's efficiency lengths. Embedded default
(about 3 minutes on a 2-core CPU, no download)::

    python -m experiments.benchmark

Larger runs on an accelerator, e.g.::

    python -m experiments.benchmark --seq_lens=1024,2048,4096,8192,16384 --dtype=bfloat16 \
        --heads=16 --head_dim=128 --repeats=10 --workdir=/tmp/bench

``--suite=kernels``: the Pallas flash kernels vs cuDNN (GPU) / splash (TPU), the xla backend and
the ideal block-sparse speed-up, for dense causal, window 1024 + 4 sinks and block-sparse layouts
at 50 / 25 / 12.5 % density (bf16, batch 2, 16 heads, head dim 128, 4k to 32k by default on an
accelerator; about 10 minutes on one H100)::

    python -m experiments.benchmark --suite=kernels --workdir=benchmarks/kernels_h100

Writes ``report.md`` and ``results.json`` (and plots for the efficiency suite) into ``--workdir``.
"""

from __future__ import annotations

import dataclasses
import os

from absl import app
from absl import flags
import tqdm

from attn_jax import dispatch
from experiments import efficiency
from experiments import kernels
from experiments import report

_WORKDIR = flags.DEFINE_string("workdir", "benchmark_out", "Directory for report.md, results.json and plots.")
_SUITE = flags.DEFINE_enum("suite", "efficiency", ["efficiency", "kernels"], "What to benchmark.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", None, "Query lengths (default: per suite and platform).")
_PATTERNS = flags.DEFINE_list("patterns", list(efficiency.PATTERNS), "CAB patterns to measure.")
_MECHANISMS = flags.DEFINE_list("mechanisms", [m.name for m in efficiency.MECHANISMS],
                                "Mechanism names (default: every registered one).")
_MODES = flags.DEFINE_list("modes", list(efficiency.MODES), "fwd and/or fwd_bwd.")
_CASES = flags.DEFINE_list("cases", list(kernels.CASES), "Kernel-suite cases.")
_BATCH = flags.DEFINE_integer("batch", None, "Batch size (default: per suite).")
_HEADS = flags.DEFINE_integer("heads", None, "Query heads (default: per suite).")
_KV_HEADS = flags.DEFINE_integer("kv_heads", None, "Key/value heads (default: --heads).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", None, "Head dimension (default: per suite).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Input dtype (default: per suite).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median reported).")


def _override(shape):
  fields = dict(batch=_BATCH.value, heads=_HEADS.value, head_dim=_HEAD_DIM.value, dtype=_DTYPE.value)
  if hasattr(shape, "kv_heads"):
    fields["kv_heads"] = _KV_HEADS.value or _HEADS.value
  return dataclasses.replace(shape, **{k: v for k, v in fields.items() if v is not None})


def _kernel_suite(workdir):
  platform = dispatch.current_platform()
  unknown = [c for c in _CASES.value if c not in kernels.CASES]
  if unknown:
    raise app.UsageError(f"--cases: unknown {unknown}; known: {list(kernels.CASES)}")
  shape = _override(kernels.default_shape(platform))
  lens = [int(n) for n in (_SEQ_LENS.value or kernels.default_seq_lens(platform))]
  backend = kernels.kernel_backend(platform)
  tasks = [(c, n, m) for n in lens for c in _CASES.value for m in _MODES.value]
  records = []
  with tqdm.tqdm(tasks, desc="kernels", unit="case") as bar:
    for case, n, mode in bar:
      bar.set_postfix_str(f"{case} L={n} {mode}")
      records.append(kernels.measure(case, n, mode, shape, _REPEATS.value))
  kernels.add_ideal_ratios(records, backend)
  env = report.environment()
  report.write_json(os.path.join(workdir, "results.json"),
                    dict(environment=env, shape=dataclasses.asdict(shape), kernels=records))
  md = kernels.markdown(records, env, shape, backend)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(md)
  print(md)
  print(f"wrote {os.path.join(workdir, 'report.md')} and results.json")


def main(argv):
  del argv
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  bad = [m for m in _MODES.value if m not in efficiency.MODES]
  if bad:
    raise app.UsageError(f"--modes: unknown {bad}; known: {list(efficiency.MODES)}")
  if _SUITE.value == "kernels":
    return _kernel_suite(workdir)
  by_name = {m.name: m for m in efficiency.MECHANISMS}
  unknown = [n for n in _MECHANISMS.value if n not in by_name]
  if unknown:
    raise app.UsageError(f"--mechanisms: unknown {unknown}; known: {sorted(by_name)}")
  bad = [p for p in _PATTERNS.value if p not in efficiency.PATTERNS]
  if bad:
    raise app.UsageError(f"--patterns: unknown {bad}; known: {list(efficiency.PATTERNS)}")
  shape = _override(efficiency.Shape())
  lens = _SEQ_LENS.value or ["256", "512", "1024", "2048", "4096"]
  tasks = [(by_name[m], p, int(n), mode) for p in _PATTERNS.value for mode in _MODES.value
           for m in _MECHANISMS.value for n in lens if by_name[m].supports(p)]
  records = []
  with tqdm.tqdm(tasks, desc="efficiency", unit="case") as bar:
    for mech, pattern, n, mode in bar:
      bar.set_postfix_str(f"{mech.name} {pattern} {mode} L={n}")
      records.append(efficiency.measure(mech, pattern, n, mode, shape, _REPEATS.value))
  eff = efficiency.efficiency_lengths(records)
  env = report.environment()
  shape_dict = dict(vars(shape))
  report.write_json(os.path.join(workdir, "results.json"),
                    dict(environment=env, shape=shape_dict, efficiency=records, efficiency_lengths=eff))
  md = report.efficiency_markdown(records, eff, env, shape_dict)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(md)
  plots = report.efficiency_plots(records, workdir)
  print(md)
  print(f"\nwrote {os.path.join(workdir, 'report.md')}, results.json" + (f" and {len(plots)} plot(s)" if plots else ""))


if __name__ == "__main__":
  app.run(main)
