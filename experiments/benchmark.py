r"""The attention benchmark: which mechanism for my task and my sequence length?

Default (``--suite=all``): both halves of a CAB-style comparison on an embedded default that
needs no download (8.5 minutes of CPU time, so at most that on an idle 2-core CPU; measured in
``benchmarks/cpu_main_job/``)::

    python -m experiments.benchmark

The report opens with the recommendation (:func:`experiments.report.recommendation_section`):
per CAB pattern and length, the fastest and the least-memory mechanism among those of comparable
MQAR quality (``--comparable_accuracy``), with CAB's efficiency lengths against the dense
baseline, ``jax.nn.dot_product_attention``.

* quality: MQAR recall accuracy of small LMs trained with each default quality preset of the
  mixer registry (softmax, sliding window, linear, Based with feature dim 8), over model widths,
  with the size of each model's decoding state (:mod:`experiments.quality`);
  ``--quality_mechanisms`` runs any entry or preset (``--quality_mechanisms=based,gla,jrt,retnet``);
* efficiency: forward and forward+backward time and compiled memory vs sequence length for the
  dense baseline and the registry's efficiency presets (:mod:`experiments.efficiency`) in CAB's
  four patterns, and CAB's efficiency lengths; each preset names the quality preset that stands
  for it in the recommendation.

``--list`` prints the registry (name, family, decoding cache, backends available here, paper,
presets) and exits.

Writes ``report.md``, ``results.json`` and PNG plots (``quality_mqar.png``,
``efficiency_<mode>.png``) into ``--workdir``. ``--mqar_setting=zoology`` is Zoology / Based's
MQAR setting (widths 64 to 512, 256 tokens, 64 key-value pairs, vocabulary 8192, 20k steps of
batch 256, learning rates swept over 1e-4 .. 1e-2; :meth:`experiments.quality.Settings.zoology`),
for an accelerator: 4 widths x 4 learning rates = 16 runs of 20k steps per mechanism, estimated
from the FLOPs at up to 6 min per run (width 512) on one H100 at 30 % utilisation, about an hour
per mechanism (not measured: no accelerator was available)::

    python -m experiments.benchmark --suite=quality --mqar_setting=zoology \
        --quality_mechanisms=softmax,sliding_window,based,linear,gla,jrt --workdir=benchmarks/mqar_zoology

Efficiency flags scale the other half, e.g.
``--seq_lens=1024,2048,4096,8192,16384 --dtype=bfloat16 --heads=16 --head_dim=128 --repeats=10``.

``--suite=quality`` or ``--suite=efficiency`` runs one half. ``--suite=kernels``: the Pallas flash
kernels vs cuDNN (GPU) / splash (TPU), the xla backend and the ideal block-sparse speed-up, for
dense causal, window 1024 + 4 sinks and block-sparse layouts at 50 / 25 / 12.5 % density (bf16,
batch 2, 16 heads, head dim 128, 4k to 32k by default on an accelerator; about 10 minutes on
one H100)::

    python -m experiments.benchmark --suite=kernels --workdir=benchmarks/kernels_h100
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time

from absl import app
from absl import flags
from absl import logging
import tqdm

from attn_jax import dispatch
from attn_jax.layers import registry
from experiments import efficiency
from experiments import kernels
from experiments import quality
from experiments import report

_WORKDIR = flags.DEFINE_string("workdir", "benchmark_out", "Directory for report.md, results.json and plots.")
_LIST = flags.DEFINE_bool("list", False, "Print the mixer registry (name, family, decoding cache, backends "
                          "available here, paper, presets) and exit.")
_SUITE = flags.DEFINE_enum("suite", "all", ["all", "quality", "efficiency", "kernels"],
                           "What to benchmark: quality + efficiency (all), one of them, or the Pallas kernels.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", None, "Query lengths (default: per suite and platform).")
_PATTERNS = flags.DEFINE_list("patterns", list(efficiency.PATTERNS), "CAB patterns to measure.")
_MECHANISMS = flags.DEFINE_list(
    "mechanisms", None, "Efficiency-suite mechanisms: efficiency preset names of the mixer registry "
    "(default: every default one; --list shows them all). The dense jax.nn baseline always runs.")
_QUALITY_MECHANISMS = flags.DEFINE_list(
    "quality_mechanisms", None,
    "Quality-suite mechanisms: mixer names or quality presets of the registry (default: the default "
    "presets; --list shows them all).")
_MQAR_SETTING = flags.DEFINE_enum("mqar_setting", "cpu", sorted(quality.SETTINGS),
                                  "Base MQAR setting: cpu (the embedded default) or zoology (Zoology / Based's, "
                                  "for an accelerator); the --mqar_* flags below override its fields.")
_MQAR_WIDTHS = flags.DEFINE_list("mqar_widths", None, "Model widths of the quality suite.")
_MQAR_STEPS = flags.DEFINE_integer("mqar_steps", None, "Training steps per quality run.")
_MQAR_BATCH = flags.DEFINE_integer("mqar_batch", None, "Batch size of the quality runs.")
_MQAR_SEQ_LEN = flags.DEFINE_integer("mqar_seq_len", None, "MQAR sequence length.")
_MQAR_KV_PAIRS = flags.DEFINE_integer("mqar_kv_pairs", None, "MQAR key-value pairs per sequence.")
_MQAR_VOCAB = flags.DEFINE_integer("mqar_vocab", None, "MQAR vocabulary size.")
_MQAR_LAYERS = flags.DEFINE_integer("mqar_layers", None, "Layers of the quality models.")
_MQAR_LRS = flags.DEFINE_list("mqar_lrs", None, "Learning rates to sweep per cell (best kept); "
                              "default: the setting's (cpu: one per width).")
_MQAR_EVAL = flags.DEFINE_integer("mqar_eval_batches", None, "Eval batches per quality run.")
_MODES = flags.DEFINE_list("modes", list(efficiency.MODES), "fwd and/or fwd_bwd.")
_CASES = flags.DEFINE_list("cases", list(kernels.CASES), "Kernel-suite cases.")
_BATCH = flags.DEFINE_integer("batch", None, "Batch size (default: per suite).")
_HEADS = flags.DEFINE_integer("heads", None, "Query heads (default: per suite).")
_KV_HEADS = flags.DEFINE_integer("kv_heads", None, "Key/value heads (default: --heads).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", None, "Head dimension (default: per suite).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Input dtype (default: per suite).")
_REPEATS = flags.DEFINE_integer(
    "repeats", 5, "Timed runs per measurement (median and min-max reported; at least "
    f"{efficiency.MIN_RUNS}; {efficiency.MIN_RUNS} on a CPU for calls over a second).", lower_bound=1)
_COMPARABLE = flags.DEFINE_float(
    "comparable_accuracy", report.COMPARABLE_ACCURACY,
    "The recommendation's 'comparable quality': MQAR accuracy at the largest width at most this far "
    "below the best benchmarked mechanism's.", lower_bound=0.0)
_QUALITY_FROM = flags.DEFINE_string(
    "quality_from", None, "results.json of an earlier run whose quality records the recommendation uses "
    "(for --suite=efficiency; ignored when this run measures quality).")


def _progress(tasks, desc, label):
  """Yields ``tasks``: a tqdm bar on a terminal; elsewhere (a notebook, a log file) a plain line
  at most every 30 s, so that captured output is not a stream of bar redraws."""
  if sys.stderr.isatty():
    with tqdm.tqdm(tasks, desc=desc, unit="case") as bar:
      for task in bar:
        bar.set_postfix_str(label(task))
        yield task
    return
  last = time.monotonic()
  for i, task in enumerate(tasks):
    if i == 0 or time.monotonic() - last > 30:
      print(f"{desc}: {i}/{len(tasks)} done, now {label(task)}", file=sys.stderr, flush=True)
      last = time.monotonic()
    yield task
  print(f"{desc}: {len(tasks)}/{len(tasks)} done", file=sys.stderr, flush=True)


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


def _quality_settings() -> quality.Settings:
  base = quality.SETTINGS[_MQAR_SETTING.value]
  changes = dict(steps=_MQAR_STEPS.value, batch_size=_MQAR_BATCH.value, seq_len=_MQAR_SEQ_LEN.value,
                 num_kv_pairs=_MQAR_KV_PAIRS.value, vocab_size=_MQAR_VOCAB.value, num_layers=_MQAR_LAYERS.value,
                 eval_batches=_MQAR_EVAL.value)
  if _MQAR_WIDTHS.value is not None:
    changes["widths"] = tuple(int(w) for w in _MQAR_WIDTHS.value)
  if _MQAR_LRS.value is not None:
    changes["learning_rates"] = tuple(float(x) for x in _MQAR_LRS.value)
  return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


def _quality_suite():
  presets = registry.quality_presets()
  names = _QUALITY_MECHANISMS.value or list(quality.default_presets())
  unknown = [n for n in names if n not in presets]
  if unknown:
    raise app.UsageError(f"--quality_mechanisms: unknown {unknown}; known: {sorted(presets)}")
  unavailable = [n for n in names if not presets[n][0].is_available]
  if unavailable:
    raise app.UsageError(f"--quality_mechanisms: {unavailable} need primitives this installation lacks")
  settings = _quality_settings()
  cells = [(m, w) for m in names for w in settings.widths]
  records = []
  for mech, width in _progress(cells, "quality (MQAR)", lambda c: f"{c[0]} d={c[1]}"):
    records.append(quality.run_cell(settings, mech, width, show_progress=sys.stderr.isatty()))
  return settings, records


def _efficiency_names() -> list[str]:
  """The mechanisms of the efficiency suite: the dense baseline (always: efficiency lengths and
  the recommendation's ratios are measured against it), then ``--mechanisms`` or the defaults."""
  names = _MECHANISMS.value or [m.name for m in efficiency.mechanisms() if m.default]
  return list(dict.fromkeys([efficiency.baseline_name()] + list(names)))


def _efficiency_suite():
  by_name = {m.name: m for m in efficiency.mechanisms()}
  shape = _override(efficiency.Shape())
  lens = [int(n) for n in (_SEQ_LENS.value or ["256", "512", "1024", "2048", "4096"])]
  names = _efficiency_names()
  tasks = [(by_name[m], p, n, mode) for p in _PATTERNS.value for mode in _MODES.value
           for m in names for n in lens if by_name[m].supports(p)]
  records = []
  for mech, pattern, n, mode in _progress(tasks, "efficiency", lambda t: f"{t[0].name} {t[1]} {t[3]} L={t[2]}"):
    records.append(efficiency.measure(mech, pattern, n, mode, shape, _REPEATS.value))
  # The oracles check what was timed, at the shortest length (cheap even for the naive oracle).
  checks = [efficiency.check_against_reference(by_name[m], p, min(lens), shape)
            for p in _PATTERNS.value for m in names if by_name[m].supports(p)]
  return shape, records, efficiency.efficiency_lengths(records), checks


def _quality_records_from(path):
  with open(path) as f:
    payload = json.load(f)
  if "quality" not in payload:
    raise app.UsageError(f"--quality_from: {path} has no quality records (it was not a quality run)")
  return payload["quality"]["records"]


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    # jax's INFO lines (backends it could not start) are noise here; --verbosity=0 brings them back.
    logging.set_verbosity(logging.WARNING)
  if _LIST.value:
    print(registry.listing())
    return
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  bad = [m for m in _MODES.value if m not in efficiency.MODES]
  if bad:
    raise app.UsageError(f"--modes: unknown {bad}; known: {list(efficiency.MODES)}")
  if _SUITE.value == "kernels":
    return _kernel_suite(workdir)
  known = {m.name for m in efficiency.mechanisms()}
  unknown = [n for n in _efficiency_names() if n not in known]
  if unknown:
    raise app.UsageError(f"--mechanisms: unknown {unknown}; known: {sorted(known)}")
  bad = [p for p in _PATTERNS.value if p not in efficiency.PATTERNS]
  if bad:
    raise app.UsageError(f"--patterns: unknown {bad}; known: {list(efficiency.PATTERNS)}")
  started = time.perf_counter()
  env = report.environment()
  payload = dict(environment=env)
  title = {"all": "attn_jax attention benchmark", "quality": "attn_jax quality benchmark",
           "efficiency": "attn_jax efficiency benchmark"}[_SUITE.value]
  q_lines, e_lines, plots = [], [], []
  q_records = None
  sub = 3 if _SUITE.value == "all" else 2
  if _SUITE.value in ("all", "quality"):
    settings, q_records = _quality_suite()
    payload["quality"] = dict(settings=dataclasses.asdict(settings), records=q_records)
    if _SUITE.value == "all":
      q_lines += ["## Quality: multi-query associative recall (MQAR)", ""]
    q_lines += report.quality_section(q_records, dataclasses.asdict(settings), level=sub)
    plots += report.quality_plot(q_records, workdir, dataclasses.asdict(settings))
  elif _QUALITY_FROM.value:
    q_records = _quality_records_from(_QUALITY_FROM.value)
  if _SUITE.value in ("all", "efficiency"):
    shape, records, eff, checks = _efficiency_suite()
    shape_dict = dict(vars(shape))
    names = set(_efficiency_names())
    quality_of = {m.name: m.quality for m in efficiency.mechanisms() if m.name in names}
    standing = report.quality_standing(q_records, quality_of, _COMPARABLE.value)
    baseline = efficiency.baseline_name()
    payload.update(shape=shape_dict, efficiency=records, efficiency_lengths=eff, correctness=checks,
                   quality_standing=standing,
                   recommendation=report.recommend(
                       records, [n for n, m in standing["mechanisms"].items() if m["comparable"]], baseline))
    if _QUALITY_FROM.value and _SUITE.value == "efficiency":
      payload["quality_from"] = _QUALITY_FROM.value
    rec_lines = report.recommendation_section(records, eff, standing, baseline, level=2)
    if _SUITE.value == "all":
      e_lines += ["## Efficiency: time and memory vs sequence length (CAB's four patterns)", ""]
    e_lines += report.efficiency_section(records, shape_dict, level=sub)
    e_lines += report.correctness_section(checks, level=sub)
    plots += report.efficiency_plots(records, workdir, shape_dict)
  else:
    rec_lines = []
  usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
  cost = dict(wall_s=time.perf_counter() - started, cpu_s=sum(u.ru_utime + u.ru_stime for u in usage))
  payload["cost"] = cost
  lines = report.header(env, title)
  lines.insert(-1, f"- this run: {cost['wall_s'] / 60:.1f} min wall, {cost['cpu_s'] / 60:.1f} min CPU time "
               "(on an idle machine the wall time is at most the CPU time)")
  lines += rec_lines + q_lines + e_lines
  report.write_json(os.path.join(workdir, "results.json"), payload)
  md = "\n".join(lines)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(md)
  print(md)
  print(f"\nwrote {os.path.join(workdir, 'report.md')}, results.json" +
        (f" and {len(plots)} plot(s)" if plots else ""))


if __name__ == "__main__":
  app.run(main)
