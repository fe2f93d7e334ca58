r"""The attention benchmark: which mechanism for my task and my sequence length?

Default (``--suite=all``): both halves of a CAB-style comparison on an embedded default that
needs no download (about 8.5 minutes on an idle 2-core CPU)::

    python -m experiments.benchmark

* quality: MQAR recall accuracy of small LMs trained with each default quality preset of the
  mixer registry (softmax, sliding window, linear, Based with feature dim 8), over model widths,
  with the size of each model's decoding state (:mod:`experiments.quality`);
  ``--quality_mechanisms`` runs any entry or preset (``--quality_mechanisms=based,gla,jrt,retnet``);
* efficiency: forward and forward+backward time and compiled memory vs sequence length for the
  registry's efficiency presets (:mod:`experiments.efficiency`) in CAB's four patterns, and CAB's
  efficiency lengths.

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
import os
import sys

from absl import app
from absl import flags
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
    "(default: every default one; --list shows them all).")
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
  with tqdm.tqdm(cells, desc="quality (MQAR)", unit="model") as bar:
    for mech, width in bar:
      bar.set_postfix_str(f"{mech} d={width}")
      records.append(quality.run_cell(settings, mech, width, show_progress=sys.stderr.isatty()))
  return settings, records


def _efficiency_names() -> list[str]:
  return _MECHANISMS.value or [m.name for m in efficiency.mechanisms() if m.default]


def _efficiency_suite():
  by_name = {m.name: m for m in efficiency.mechanisms()}
  shape = _override(efficiency.Shape())
  lens = _SEQ_LENS.value or ["256", "512", "1024", "2048", "4096"]
  tasks = [(by_name[m], p, int(n), mode) for p in _PATTERNS.value for mode in _MODES.value
           for m in _efficiency_names() for n in lens if by_name[m].supports(p)]
  records = []
  with tqdm.tqdm(tasks, desc="efficiency", unit="case") as bar:
    for mech, pattern, n, mode in bar:
      bar.set_postfix_str(f"{mech.name} {pattern} {mode} L={n}")
      records.append(efficiency.measure(mech, pattern, n, mode, shape, _REPEATS.value))
  return shape, records, efficiency.efficiency_lengths(records)


def main(argv):
  del argv
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
  env = report.environment()
  payload = dict(environment=env)
  title = {"all": "attn_jax attention benchmark", "quality": "attn_jax quality benchmark",
           "efficiency": "attn_jax efficiency benchmark"}[_SUITE.value]
  lines = report.header(env, title)
  plots = []
  if _SUITE.value in ("all", "quality"):
    settings, q_records = _quality_suite()
    payload["quality"] = dict(settings=dataclasses.asdict(settings), records=q_records)
    lines += ["## Quality: multi-query associative recall (MQAR)", ""]
    lines += report.quality_section(q_records, dataclasses.asdict(settings), level=3)
    plots += report.quality_plot(q_records, workdir)
  if _SUITE.value in ("all", "efficiency"):
    shape, records, eff = _efficiency_suite()
    shape_dict = dict(vars(shape))
    payload.update(shape=shape_dict, efficiency=records, efficiency_lengths=eff)
    if _SUITE.value == "all":
      lines += ["## Efficiency: time and memory vs sequence length (CAB's four patterns)", ""]
      lines += report.efficiency_section(records, eff, shape_dict, level=3)
    else:
      lines += report.efficiency_section(records, eff, shape_dict, level=2)
    plots += report.efficiency_plots(records, workdir)
  report.write_json(os.path.join(workdir, "results.json"), payload)
  md = "\n".join(lines)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(md)
  print(md)
  print(f"\nwrote {os.path.join(workdir, 'report.md')}, results.json" +
        (f" and {len(plots)} plot(s)" if plots else ""))


if __name__ == "__main__":
  app.run(main)
