"""Writes benchmark results as JSON, a markdown report and PNG plots.

The main job's report opens with :func:`recommendation_section`: for each CAB pattern and length,
the fastest and the least-memory mechanism among those of *comparable quality* (MQAR accuracy at
the largest measured width within :data:`COMPARABLE_ACCURACY` of the best benchmarked one), with
the efficiency lengths against the dense baseline.
"""

from __future__ import annotations

import datetime
import json
import os
import platform

import jax

# "Comparable quality": MQAR accuracy at the largest measured width at most this far (absolute)
# below the best accuracy among the benchmarked mechanisms' quality counterparts.
COMPARABLE_ACCURACY = 0.05
NOISY_MARK = "†"


def environment() -> dict:
  dev = jax.devices()[0]
  return dict(
      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      jax_version=jax.__version__,
      platform=dev.platform,
      device=getattr(dev, "device_kind", str(dev)),
      device_count=jax.device_count(),
      host=platform.platform(),
      cpu_count=os.cpu_count(),
  )


def _fmt(value, digits=1):
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


def _ms(value) -> str:
  """Three significant digits, enough for timings whose runs differ by percents."""
  if value >= 100:
    return f"{value:.0f}"
  if value >= 10:
    return f"{value:.1f}"
  return f"{value:.2f}"


def timing(r) -> str:
  """``median (min-max)`` of a timed record, marked when noisy."""
  text = f"{_ms(r['time_ms'])} ({_ms(r['time_min_ms'])}-{_ms(r['time_max_ms'])})" if "time_min_ms" in r \
      else _ms(r["time_ms"])
  return text + (NOISY_MARK if r.get("noisy") else "")


def shape_title(shape: dict) -> str:
  kv = f" (kv {shape['kv_heads']})" if shape.get("kv_heads", shape["heads"]) != shape["heads"] else ""
  return f"batch {shape['batch']}, heads {shape['heads']}{kv}, head dim {shape['head_dim']}, {shape['dtype']}"


def header(env, title: str) -> list[str]:
  """Title and environment lines of a report."""
  lines = [f"# {title}", ""]
  lines.append(f"- date: {env['date']}")
  lines.append(f"- device: {env['device']} ({env['platform']}, {env['device_count']} device(s)); "
               f"host {env['host']}, {env['cpu_count']} CPUs")
  lines.append(f"- jax {env['jax_version']}")
  lines.append("")
  return lines


def quality_standing(quality_records, quality_of: dict, tolerance: float = COMPARABLE_ACCURACY) -> dict:
  """Which efficiency mechanisms count as of comparable quality.

  Args:
    quality_records: the quality suite's records (``mechanism``, ``width``, ``accuracy``), or
      None / empty when quality was not measured.
    quality_of: efficiency mechanism name -> the quality-suite mechanism standing for it (None:
      not measured); :attr:`experiments.efficiency.Mechanism.quality`.
    tolerance: absolute MQAR accuracy below the best that still counts as comparable.

  Returns:
    ``dict(measured, width, best, best_mechanism, tolerance, mechanisms={name: dict(quality,
    accuracy, comparable)})``: accuracies at the largest width measured. Without any measured
    counterpart every mechanism is comparable (``measured`` False): speed and memory alone rank.
  """
  ok = [r for r in (quality_records or []) if "error" not in r and r.get("accuracy") is not None]
  width = max((r["width"] for r in ok), default=None)
  acc = {r["mechanism"]: float(r["accuracy"]) for r in ok if r["width"] == width}
  measured = {name: acc[q] for name, q in quality_of.items() if q in acc}
  out = dict(measured=bool(measured), width=width, best=None, best_mechanism=None, tolerance=tolerance,
             mechanisms={})
  if measured:
    best_name = max(measured, key=lambda n: (measured[n], n))
    out.update(best=measured[best_name], best_mechanism=quality_of[best_name])
  for name, q in quality_of.items():
    a = measured.get(name)
    comparable = (a is not None and a >= out["best"] - tolerance) if measured else True
    out["mechanisms"][name] = dict(quality=q, accuracy=a, comparable=comparable)
  return out


def recommend(records, comparable, baseline: str) -> list[dict]:
  """Per (pattern, mode, length): the fastest and the least-memory mechanism among ``comparable``.

  The fastest is the argmin of the median times, the least-memory the argmin of the compiled
  temporary memory (ties: the faster, then the name); failed measurements do not compete.
  ``fastest_any`` is the fastest of every measured mechanism, comparable or not. Ratios are
  against the dense ``baseline`` at the same point (None where it was not measured).
  """
  comparable = set(comparable)
  ok = [r for r in records if "error" not in r]
  rows = []
  keys = dict.fromkeys((r["pattern"], r["mode"], r["seq_len"]) for r in records)
  for pattern, mode, n in keys:
    here = [r for r in ok if (r["pattern"], r["mode"], r["seq_len"]) == (pattern, mode, n)]
    base = next((r for r in here if r["mechanism"] == baseline), None)
    cands = [r for r in here if r["mechanism"] in comparable]
    row = dict(pattern=pattern, mode=mode, seq_len=n, fastest=None, least_memory=None, fastest_any=None)
    if cands:
      fast = min(cands, key=lambda r: (r["time_ms"], r["mechanism"]))
      small = min(cands, key=lambda r: (r["temp_mib"], r["time_ms"], r["mechanism"]))
      row.update(fastest=fast["mechanism"], fastest_ms=fast["time_ms"], fastest_noisy=bool(fast.get("noisy")),
                 speedup=base["time_ms"] / fast["time_ms"] if base else None,
                 least_memory=small["mechanism"], least_memory_mib=small["temp_mib"],
                 memory_ratio=small["temp_mib"] / base["temp_mib"] if base and base["temp_mib"] > 0 else None)
    if here:
      anyf = min(here, key=lambda r: (r["time_ms"], r["mechanism"]))
      row.update(fastest_any=anyf["mechanism"], fastest_any_ms=anyf["time_ms"],
                 fastest_any_noisy=bool(anyf.get("noisy")))
    rows.append(row)
  return rows


_MODE_TITLES = {"fwd_bwd": "training (fwd+bwd)", "fwd": "inference (fwd)"}


def _times(x) -> str:
  if x >= 10:
    return f"{x:.0f}x"
  return f"{x:.1f}x" if x >= 1 else f"{x:.2g}x"


def _ratio(x, what: str) -> str:
  if x is None:
    return ""
  if what == "faster" and x < 1:
    return f", {_times(1 / x)} slower"
  return f", {_times(x)} {what}"


def recommendation_section(records, eff_rows, standing: dict, baseline: str, level: int = 2) -> list[str]:
  """The report's opening: which attention for my pattern and length, with efficiency lengths."""
  h = "#" * level
  rec = recommend(records, [n for n, m in standing["mechanisms"].items() if m["comparable"]], baseline)
  modes = [m for m in ("fwd_bwd", "fwd") if any(r["mode"] == m for r in rec)]
  lines = [f"{h} Recommendation: which attention for my pattern and length", ""]
  if standing["measured"]:
    comp = [n for n, m in standing["mechanisms"].items() if m["comparable"]]
    others = [f"{n} ({m['quality']} {m['accuracy']:.3f})" for n, m in standing["mechanisms"].items()
              if not m["comparable"] and m["accuracy"] is not None]
    unmeasured = [n for n, m in standing["mechanisms"].items() if m["accuracy"] is None]
    lines.append(f"- comparable quality: MQAR accuracy at the largest width (d={standing['width']}) within "
                 f"{standing['tolerance']:g} of the best benchmarked mechanism's ({standing['best_mechanism']} "
                 f"{standing['best']:.3f}); each mechanism is scored by its quality-suite counterpart: "
                 + ", ".join(f"{n} -> {m['quality']}" for n, m in standing["mechanisms"].items() if m["quality"]))
    lines.append(f"- comparable: {', '.join(comp) or 'none'}; below: {', '.join(others) or 'none'}"
                 + (f"; quality not measured: {', '.join(unmeasured)}" if unmeasured else ""))
  else:
    lines.append("- quality not measured in this run (no quality records, or none for these mechanisms): every "
                 "mechanism counts as comparable, so the table ranks speed and memory alone")
  lines.append(f"- fastest: smallest median time; least memory: smallest compiled temporary memory; ratios "
               f"against the dense baseline, {baseline}: 'Nx faster' ('slower') is its time / the pick's (the "
               "inverse), 'Nx the memory' the pick's memory / its")
  lines.append(f"- {NOISY_MARK}: the timed runs' spread (max - min) / median exceeded 25 % (a busy machine); such "
               "a point is kept in the tables but left out of the efficiency lengths")
  lines.append("")
  header = ["pattern", "length"]
  for m in modes:
    header += [f"{_MODE_TITLES[m]}: fastest", "least memory"]
  header.append(f"fastest at any quality ({_MODE_TITLES[modes[0]].split(' ')[0] if modes else ''})")
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "---|" * len(header))
  by = {(r["pattern"], r["mode"], r["seq_len"]): r for r in rec}
  for pattern in dict.fromkeys(r["pattern"] for r in rec):
    for n in sorted({r["seq_len"] for r in rec if r["pattern"] == pattern}):
      cells = [pattern, str(n)]
      for m in modes:
        r = by.get((pattern, m, n))
        if r is None or r["fastest"] is None:
          cells += ["-", "-"]
          continue
        is_base = r["fastest"] == baseline
        cells.append(f"{r['fastest']} {_ms(r['fastest_ms'])} ms{NOISY_MARK if r['fastest_noisy'] else ''}"
                     + ("" if is_base else _ratio(r["speedup"], "faster")))
        is_base = r["least_memory"] == baseline
        cells.append(f"{r['least_memory']} {r['least_memory_mib']:.1f} MiB"
                     + ("" if is_base else _ratio(r["memory_ratio"], "the memory")))
      r = by.get((pattern, modes[0], n)) if modes else None
      if r is None or r["fastest_any"] is None:
        cells.append("-")
      else:
        acc = standing["mechanisms"].get(r["fastest_any"], {}).get("accuracy")
        quality = f" (MQAR {acc:.2f})" if acc is not None else (" (quality not measured)" if standing["measured"] else "")
        cells.append(f"{r['fastest_any']} {_ms(r['fastest_any_ms'])} ms"
                     f"{NOISY_MARK if r['fastest_any_noisy'] else ''}{quality}")
      lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  if eff_rows:
    lines += efficiency_length_table(eff_rows, standing, level + 1)
  return lines


def efficiency_length_table(eff_rows, standing: dict, level: int) -> list[str]:
  """CAB efficiency lengths: a row per (mechanism, mode), a column per pattern."""
  h = "#" * level
  patterns = list(dict.fromkeys(r["pattern"] for r in eff_rows))
  lines = [f"{h} CAB efficiency lengths (vs the dense baseline)", "",
           "Shortest measured length from which the mechanism is faster (time) / needs less temporary "
           "memory (memory) than the dense baseline at every longer measured length; '-': not within the "
           f"measured range; '*': some lengths left out because a timing was noisy ({NOISY_MARK}).", ""]
  acc_title = f"MQAR d={standing['width']}" if standing["measured"] else "MQAR"
  lines.append(f"| mechanism | mode | {acc_title} | " + " | ".join(f"{p}: time / memory" for p in patterns) + " |")
  lines.append("|" + "---|" * (len(patterns) + 3))
  noisy = False
  for mech in dict.fromkeys(r["mechanism"] for r in eff_rows):
    for mode in dict.fromkeys(r["mode"] for r in eff_rows if r["mechanism"] == mech):
      m = standing["mechanisms"].get(mech, {})
      acc = "-" if m.get("accuracy") is None else f"{m['accuracy']:.3f}" + ("" if m.get("comparable") else " (below)")
      cells = [mech, mode, acc]
      for p in patterns:
        r = next((x for x in eff_rows if (x["mechanism"], x["mode"], x["pattern"]) == (mech, mode, p)), None)
        if r is None:
          cells.append("n/a")
          continue
        star = "*" if r.get("time_noisy_lengths") else ""
        noisy = noisy or bool(star)
        cells.append(f"{_fmt(r['time_efficiency_length'])}{star} / {_fmt(r['memory_efficiency_length'])}")
      lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  if noisy:
    lines.append("'*': results.json lists the left-out lengths (`time_noisy_lengths`); rerun on a quieter "
                 "machine, or with more `--repeats`, to decide them.")
    lines.append("")
  return lines


def efficiency_markdown(records, eff_rows, env, shape, quality_of=None, quality_records=None,
                        baseline: str | None = None) -> str:
  """The efficiency suite's report on its own (``--suite=efficiency``): the recommendation (by
  speed and memory alone unless ``quality_records`` are given), then the measurements."""
  lines = header(env, "attn_jax efficiency benchmark")
  if quality_of is not None and baseline is not None:
    standing = quality_standing(quality_records, quality_of)
    lines += recommendation_section(records, eff_rows, standing, baseline, level=2)
  else:
    lines += efficiency_length_table(eff_rows, quality_standing(None, {}), level=2)
  return "\n".join(lines + efficiency_section(records, shape, level=2))


def efficiency_section(records, shape, level: int = 2) -> list[str]:
  """Tables of time and memory per pattern and mode (efficiency lengths: see the recommendation)."""
  h = "#" * level
  lines = []
  lines.append(f"- shape: {shape_title(shape)}; cross patterns use kv_len = seq_len // 2")
  lines.append("- time: median wall-clock ms of the compiled call over its timed runs, (min-max) of those runs; "
               f"{NOISY_MARK}: spread above 25 % (after one retry); memory: XLA compiled temporary memory in MiB "
               "(scratch beyond inputs and outputs)")
  lines.append("")
  lens = sorted({r["seq_len"] for r in records})
  for pattern in dict.fromkeys(r["pattern"] for r in records):
    for mode in dict.fromkeys(r["mode"] for r in records):
      rows = [r for r in records if r["pattern"] == pattern and r["mode"] == mode]
      if not rows:
        continue
      lines.append(f"{h} {pattern}, {mode}")
      lines.append("")
      lines.append("| mechanism | " + " | ".join(f"{n}: ms / MiB" for n in lens) + " |")
      lines.append("|" + "---|" * (len(lens) + 1))
      for mech in dict.fromkeys(r["mechanism"] for r in rows):
        cells = []
        for n in lens:
          r = next((x for x in rows if x["mechanism"] == mech and x["seq_len"] == n), None)
          if r is None:
            cells.append("-")
          elif "error" in r:
            cells.append("error")
          else:
            cells.append(f"{timing(r)} / {_fmt(r['temp_mib'], 1)}")
        lines.append(f"| {mech} | " + " | ".join(cells) + " |")
      lines.append("")
  errors = [r for r in records if "error" in r]
  if errors:
    lines.append(f"{h} Errors")
    lines.append("")
    for r in errors:
      lines.append(f"- {r['mechanism']} / {r['pattern']} / {r['mode']} / {r['seq_len']}: {r['error']}")
    lines.append("")
  return lines


def correctness_section(checks, level: int = 2) -> list[str]:
  """Each benchmarked mechanism against its reference oracle (forward, shortest length)."""
  if not checks:
    return []
  h = "#" * level
  lines = [f"{h} Correctness against the reference oracles", "",
           "Forward output of each mechanism against the same computation by the naive reference "
           "(`implementation=\"reference\"`, float32) at the shortest measured length; the oracle is "
           "never timed.", "", "| mechanism | pattern | length | max abs error | max rel error |",
           "|---|---|---|---|---|"]
  for c in checks:
    if "error" in c:
      err = rel = c["error"]
    elif c["max_abs_err"] is None:
      err, rel = "no reference", "-"
    else:
      err, rel = f"{c['max_abs_err']:.2e}", f"{c['max_rel_err']:.2e}"
    lines.append(f"| {c['mechanism']} | {c['pattern']} | {c['seq_len']} | {err} | {rel} |")
  lines.append("")
  return lines


# One style per mechanism (colour, marker, line style), the same in every panel, so that
# overlapping curves (two mechanisms with equal memory) stay distinguishable.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_LINESTYLES = ("-", "--", "-.", ":")


def _styles(names):
  return {n: dict(color=f"C{i % 10}", marker=_MARKERS[i % len(_MARKERS)],
                  linestyle=_LINESTYLES[i % len(_LINESTYLES)]) for i, n in enumerate(names)}


def _offsets(names, spread: float = 0.04):
  """Multiplicative x offsets (log axes) that separate curves drawn at the same lengths."""
  k = len(names)
  return {n: 2 ** (spread * (i - (k - 1) / 2)) for i, n in enumerate(names)}


def _figure_legend(fig, axes, styles, ncol):
  """One legend for the figure, with every mechanism that any panel draws."""
  import matplotlib.lines as mlines
  drawn = {line.get_label() for ax in axes.flat for line in ax.get_lines()}
  handles = [mlines.Line2D([], [], label=n, **st) for n, st in styles.items() if n in drawn]
  fig.legend(handles=handles, loc="lower center", ncol=min(ncol, len(handles)) or 1, fontsize=8,
             frameon=False)
  return handles


def efficiency_figure(records, mode: str, shape: dict | None = None):
  """The figure of one mode: time (median, min-max bars, hollow markers when noisy) and memory
  vs length, a panel per pattern, one shared legend. Needs matplotlib."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  patterns = list(dict.fromkeys(r["pattern"] for r in records))
  mechs = list(dict.fromkeys(r["mechanism"] for r in records))
  styles, offsets = _styles(mechs), _offsets(mechs)
  fig, axes = plt.subplots(2, len(patterns), figsize=(4 * len(patterns), 7.5), squeeze=False)
  for col, pattern in enumerate(patterns):
    for mech in mechs:
      rows = sorted((r for r in records if r["pattern"] == pattern and r["mode"] == mode
                     and r["mechanism"] == mech and "error" not in r), key=lambda r: r["seq_len"])
      if not rows:
        continue
      st = styles[mech]
      xs = [r["seq_len"] * offsets[mech] for r in rows]
      ts = [r["time_ms"] for r in rows]
      lo = [r["time_ms"] - r.get("time_min_ms", r["time_ms"]) for r in rows]
      hi = [r.get("time_max_ms", r["time_ms"]) - r["time_ms"] for r in rows]
      axes[0, col].errorbar(xs, ts, yerr=[lo, hi], label=mech, capsize=2, markersize=5, **st)
      noisy = [(x, t) for x, t, r in zip(xs, ts, rows) if r.get("noisy")]
      if noisy:
        axes[0, col].plot(*zip(*noisy), linestyle="none", marker=st["marker"], markersize=9,
                          markerfacecolor="white", markeredgecolor=st["color"], zorder=3)
      axes[1, col].plot(xs, [r["temp_mib"] for r in rows], label=mech, markersize=5, **st)
    axes[0, col].set_title(pattern)
    for row, label in ((0, "time (ms), median and min-max"), (1, "temp memory (MiB)")):
      ax = axes[row, col]
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("sequence length")
      ax.set_ylabel(label)
      ax.grid(True, alpha=0.3)
  _figure_legend(fig, axes, styles, ncol=len(mechs))
  shape_text = f"; {shape_title(shape)}" if shape else ""
  fig.suptitle(f"attention efficiency ({mode}){shape_text}\n"
               "hollow markers: timed runs spread above 25 %; curves slightly offset in x to stay visible")
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  return fig


def efficiency_plots(records, workdir, shape: dict | None = None) -> list[str]:
  """``efficiency_<mode>.png`` per mode (:func:`efficiency_figure`); none without matplotlib."""
  try:
    import matplotlib.pyplot as plt
  except ImportError:
    return []
  paths = []
  for mode in dict.fromkeys(r["mode"] for r in records):
    fig = efficiency_figure(records, mode, shape)
    path = os.path.join(workdir, f"efficiency_{mode}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths


def quality_section(records, settings: dict, level: int = 2) -> list[str]:
  """MQAR accuracy (and decoding-state size) per mechanism and model width."""
  h = "#" * level
  widths = sorted({r["width"] for r in records})
  lines = [f"- task: MQAR, vocabulary {settings['vocab_size']}, {settings['seq_len']} tokens, "
           f"{settings['num_kv_pairs']} key-value pairs (Zoology's power-law query gaps); "
           f"{settings['num_layers']}-layer LM, {settings['num_heads']} head(s), MLP width 2 x model width",
           f"- training: {settings['steps']} steps of batch {settings['batch_size']}, AdamW, warm-up + cosine; "
           f"learning rate {'swept over ' + str(list(settings['learning_rates'])) + ' (best reported)' if settings['learning_rates'] else 'per width (1e-2 up to width 64, then 1e-2 (64 / width)^1.5)'}",
           f"- accuracy: recall of held-out queries ({settings['eval_batches']} batches); state: numbers in "
           "the decoding state for one sequence (KV cache, window slots or recurrent state)",
           ""]
  lines.append(f"{h} MQAR accuracy")
  lines.append("")
  lines.append("| mechanism | " + " | ".join(f"d={w}: accuracy / state" for w in widths) + " |")
  lines.append("|" + "---|" * (len(widths) + 1))
  for mech in dict.fromkeys(r["mechanism"] for r in records):
    cells = []
    for w in widths:
      r = next((x for x in records if x["mechanism"] == mech and x["width"] == w), None)
      if r is None:
        cells.append("-")
      elif "error" in r:
        cells.append("error")
      else:
        state = "-" if r["state_floats"] is None else f"{r['state_floats']:,}"
        cells.append(f"{r['accuracy']:.3f} / {state}")
    lines.append(f"| {mech} | " + " | ".join(cells) + " |")
  lines.append("")
  errors = [r for r in records if "error" in r]
  if errors:
    lines.append(f"{h} Quality errors")
    lines.append("")
    for r in errors:
      lines.append(f"- {r['mechanism']} / d={r['width']}: {r['error']}")
    lines.append("")
  return lines


def quality_plot(records, workdir, settings: dict | None = None) -> list[str]:
  """``quality_mqar.png``: accuracy vs model width and vs decoding-state size, one legend."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return []
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), squeeze=False)
  mechs = list(dict.fromkeys(r["mechanism"] for r in records))
  styles, offsets = _styles(mechs), _offsets(mechs)
  for mech in mechs:
    rows = sorted((r for r in records if r["mechanism"] == mech and "error" not in r),
                  key=lambda r: r["width"])
    if not rows:
      continue
    axes[0, 0].plot([r["width"] * offsets[mech] for r in rows], [r["accuracy"] for r in rows], label=mech,
                    **styles[mech])
    sized = [r for r in rows if r["state_floats"] is not None]
    axes[0, 1].plot([r["state_floats"] * offsets[mech] for r in sized], [r["accuracy"] for r in sized],
                    label=mech, **styles[mech])
  for ax, label in ((axes[0, 0], "model width"), (axes[0, 1], "decoding state (numbers per sequence)")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel(label)
    ax.set_ylabel("MQAR accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
  _figure_legend(fig, axes, styles, ncol=len(mechs))
  task = ""
  if settings:
    task = (f"\n{settings['num_layers']}-layer LM, {settings['num_heads']} head(s), MQAR {settings['seq_len']} "
            f"tokens, {settings['num_kv_pairs']} pairs, vocab {settings['vocab_size']}, batch {settings['batch_size']}, "
            f"{settings['steps']} steps, float32")
  fig.suptitle("MQAR recall vs model width and state size" + task)
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  path = os.path.join(workdir, "quality_mqar.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return [path]


def write_json(path, payload):
  with open(path, "w") as f:
    json.dump(payload, f, indent=2, default=str)
