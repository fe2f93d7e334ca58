"""Writes benchmark results as JSON, a markdown report and PNG plots."""

from __future__ import annotations

import datetime
import json
import os
import platform

import jax


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


def header(env, title: str) -> list[str]:
  """Title and environment lines of a report."""
  lines = [f"# {title}", ""]
  lines.append(f"- date: {env['date']}")
  lines.append(f"- device: {env['device']} ({env['platform']}, {env['device_count']} device(s)); "
               f"host {env['host']}, {env['cpu_count']} CPUs")
  lines.append(f"- jax {env['jax_version']}")
  lines.append("")
  return lines


def efficiency_markdown(records, eff_rows, env, shape) -> str:
  """The efficiency suite's report on its own (``--suite=efficiency``)."""
  lines = header(env, "attn_jax efficiency benchmark")
  return "\n".join(lines + efficiency_section(records, eff_rows, shape, level=2))


def efficiency_section(records, eff_rows, shape, level: int = 2) -> list[str]:
  """Tables of time and memory per pattern and mode, and CAB efficiency lengths."""
  h = "#" * level
  lines = []
  lines.append(f"- shape: batch {shape['batch']}, heads {shape['heads']} (kv heads {shape['kv_heads']}), "
               f"head_dim {shape['head_dim']}, {shape['dtype']}; cross patterns use kv_len = seq_len // 2")
  lines.append("- time: median wall-clock ms of the compiled call; memory: XLA compiled temporary "
               "memory in MiB (scratch beyond inputs and outputs)")
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
            cells.append(f"{_fmt(r['time_ms'], 2)} / {_fmt(r['temp_mib'], 1)}")
        lines.append(f"| {mech} | " + " | ".join(cells) + " |")
      lines.append("")
  if eff_rows:
    lines.append(f"{h} CAB efficiency length (vs the dense baseline)")
    lines.append("")
    lines.append("Shortest measured sequence length from which the mechanism is faster (time) or "
                 "needs less temporary memory (memory) than the dense baseline at every longer "
                 "measured length; '-' if it never does within the measured range.")
    lines.append("")
    lines.append("| mechanism | pattern | mode | time | memory |")
    lines.append("|---|---|---|---|---|")
    for r in eff_rows:
      lines.append(f"| {r['mechanism']} | {r['pattern']} | {r['mode']} | "
                   f"{_fmt(r['time_efficiency_length'])} | {_fmt(r['memory_efficiency_length'])} |")
    lines.append("")
  errors = [r for r in records if "error" in r]
  if errors:
    lines.append(f"{h} Errors")
    lines.append("")
    for r in errors:
      lines.append(f"- {r['mechanism']} / {r['pattern']} / {r['mode']} / {r['seq_len']}: {r['error']}")
    lines.append("")
  return lines


def efficiency_plots(records, workdir) -> list[str]:
  """One PNG per mode: time and memory vs length, a panel per pattern. Needs matplotlib."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return []
  paths = []
  patterns = list(dict.fromkeys(r["pattern"] for r in records))
  for mode in dict.fromkeys(r["mode"] for r in records):
    fig, axes = plt.subplots(2, len(patterns), figsize=(4 * len(patterns), 7), squeeze=False)
    for col, pattern in enumerate(patterns):
      for mech in dict.fromkeys(r["mechanism"] for r in records):
        rows = sorted((r for r in records if r["pattern"] == pattern and r["mode"] == mode
                       and r["mechanism"] == mech and "error" not in r), key=lambda r: r["seq_len"])
        if not rows:
          continue
        xs = [r["seq_len"] for r in rows]
        axes[0, col].plot(xs, [r["time_ms"] for r in rows], marker="o", label=mech)
        axes[1, col].plot(xs, [r["temp_mib"] for r in rows], marker="o", label=mech)
      axes[0, col].set_title(pattern)
      for row, label in ((0, "time (ms)"), (1, "temp memory (MiB)")):
        ax = axes[row, col]
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"attention efficiency ({mode})")
    fig.tight_layout()
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


def quality_plot(records, workdir) -> list[str]:
  """``quality_mqar.png``: accuracy vs model width and vs decoding-state size."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return []
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for mech in dict.fromkeys(r["mechanism"] for r in records):
    rows = sorted((r for r in records if r["mechanism"] == mech and "error" not in r),
                  key=lambda r: r["width"])
    if not rows:
      continue
    axes[0].plot([r["width"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=mech)
    sized = [r for r in rows if r["state_floats"] is not None]
    axes[1].plot([r["state_floats"] for r in sized], [r["accuracy"] for r in sized], marker="o", label=mech)
  for ax, label in ((axes[0], "model width"), (axes[1], "decoding state (numbers per sequence)")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel(label)
    ax.set_ylabel("MQAR accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle("MQAR recall vs model width and state size")
  fig.tight_layout()
  path = os.path.join(workdir, "quality_mqar.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return [path]


def write_json(path, payload):
  with open(path, "w") as f:
    json.dump(payload, f, indent=2, default=str)
