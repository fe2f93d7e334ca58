r"""The attention benchmark: time and compiled memory vs sequence length in CAB's four patterns.

Embedded default (about 3 minutes on a 2-core CPU, no download)::

    python -m experiments.benchmark

Larger runs on an accelerator, e.g.::

    python -m experiments.benchmark --seq_lens=1024,2048,4096,8192,16384 --dtype=bfloat16 \
        --heads=16 --head_dim=128 --repeats=10 --workdir=/tmp/bench

Writes ``report.md``, ``results.json`` and ``efficiency_*.png`` into ``--workdir``.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import tqdm

from experiments import efficiency
from experiments import report

_WORKDIR = flags.DEFINE_string("workdir", "benchmark_out", "Directory for report.md, results.json and plots.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["256", "512", "1024", "2048", "4096"], "Query lengths.")
_PATTERNS = flags.DEFINE_list("patterns", list(efficiency.PATTERNS), "CAB patterns to measure.")
_MECHANISMS = flags.DEFINE_list("mechanisms", [m.name for m in efficiency.MECHANISMS],
                                "Mechanism names (default: every registered one).")
_MODES = flags.DEFINE_list("modes", list(efficiency.MODES), "fwd and/or fwd_bwd.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_HEADS = flags.DEFINE_integer("heads", 4, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", None, "Key/value heads (default: --heads).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Input dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median reported).")


def main(argv):
  del argv
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  by_name = {m.name: m for m in efficiency.MECHANISMS}
  unknown = [n for n in _MECHANISMS.value if n not in by_name]
  if unknown:
    raise app.UsageError(f"--mechanisms: unknown {unknown}; known: {sorted(by_name)}")
  bad = [p for p in _PATTERNS.value if p not in efficiency.PATTERNS]
  if bad:
    raise app.UsageError(f"--patterns: unknown {bad}; known: {list(efficiency.PATTERNS)}")
  bad = [m for m in _MODES.value if m not in efficiency.MODES]
  if bad:
    raise app.UsageError(f"--modes: unknown {bad}; known: {list(efficiency.MODES)}")
  shape = efficiency.Shape(batch=_BATCH.value, heads=_HEADS.value,
                           kv_heads=_KV_HEADS.value or _HEADS.value, head_dim=_HEAD_DIM.value,
                           dtype=_DTYPE.value)
  tasks = [(by_name[m], p, int(n), mode) for p in _PATTERNS.value for mode in _MODES.value
           for m in _MECHANISMS.value for n in _SEQ_LENS.value if by_name[m].supports(p)]
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
