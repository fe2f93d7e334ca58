"""The compile check's tables: markdown for people, JSON for tools. Standard library only."""

from __future__ import annotations

import collections
import json
import pathlib

from attn_jax.compile_check import runner


def _kib(n):
  return "" if n is None else f"{n / 1024:.0f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def _versions_lines(meta) -> list[str]:
  lines = [f"- date: {meta['date']}; orchestrating python {meta['python']}, jax "
           f"{meta['running_jax']['jax']}, jaxlib {meta['running_jax']['jaxlib']}"]
  for name, t in meta["targets"].items():
    versions = ", ".join(f"{k} {v}" for k, v in (t.get("versions") or {}).items() if v)
    line = f"- `{name}`: {t['description']}; device kind `{t.get('device_kind')}`; {versions}"
    tools = t.get("cuda_tools") or {}
    for tool, info in sorted(tools.items()):
      line += f"; {tool} {info['version']} at `{info['path']}` ({'ran' if info['ran'] else 'located, never run'})"
    lines.append(line)
  for platform, env in meta["environments"].items():
    lines.append(f"- {platform} compiler environment: {env['origin']}"
                 + (f" (created in {env['setup_s']} s)" if env["created"] else ""))
  lines.append(f"- wall time of the run: {meta['total_s']} s")
  for part in meta.get("merged_from", []):
    lines.append(f"- merged from the run of {part}")
  return lines


def _spill(k):
  return max(k.get("spill_stores") or 0, k.get("spill_loads") or 0)


def headline(run: runner.Run) -> list[str]:
  """Targets x families: compiled / total, and for GPUs the spilling kernels."""
  families = list(dict.fromkeys(r["family"] for r in run.results))
  targets = list(dict.fromkeys(r["target"] for r in run.results))
  rows = ["| target | " + " | ".join(families) + " | project kernels spilling, head dim <= 128 | "
          "head dim 256: spilling kernels (max spill) |",
          "|---|" + "---|" * (len(families) + 2)]
  for t in targets:
    cells = []
    for f in families:
      rs = [r for r in run.results if r["target"] == t and r["family"] == f]
      ok = sum(r["status"] == "compiled" for r in rs)
      cells.append(f"{ok}/{len(rs)} compiled" if rs else "-")
    gpu = any("registers" in k for r in run.results if r["target"] == t for k in r.get("kernels", []))
    if gpu:
      small = {(r["case"], r["mode"], k["name"]) for r in run.results if r["target"] == t and r["head_dim"] <= 128
               for k in r.get("kernels", []) if _spill(k)}
      big = [(k["name"], _spill(k)) for r in run.results if r["target"] == t and r["head_dim"] > 128
             for k in r.get("kernels", []) if _spill(k)]
      big_names = sorted({n for n, _ in big})
      cells.append(str(len(small)) if small else "none")
      cells.append(f"{len(big_names)} kernels ({max(s for _, s in big)} B): {', '.join(big_names)}"
                   if big else "none")
    else:
      cells += ["n/a (TPU)", "n/a (TPU)"]
    rows.append(f"| {t} | " + " | ".join(cells) + " |")
  return rows


def per_kernel(run: runner.Run) -> list[str]:
  """Worst case per (target, kernel, head dim) over the cases that launch it."""
  groups = collections.defaultdict(list)
  for r in run.results:
    for k in r.get("kernels", []):
      groups[(r["target"], k["name"], r["head_dim"])].append((r, k))
  rows = ["| target | kernel | head dim | compiles | max registers | max spill (B) | max shared memory | "
          "max scoped VMEM | max compile s |", "|---|---|---|---|---|---|---|---|---|"]
  for (t, name, d), items in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
    regs = [k.get("registers") for _, k in items if k.get("registers") is not None]
    smem = [k.get("smem_bytes") for _, k in items if k.get("smem_bytes") is not None]
    vmem = [k.get("vmem_bytes") for _, k in items if k.get("vmem_bytes") is not None]
    spill = [_spill(k) for _, k in items if k.get("registers") is not None]
    ok = sum(r["status"] == "compiled" for r, _ in items)
    rows.append(f"| {t} | {name} | {d} | {ok}/{len(items)} | {max(regs) if regs else ''} | "
                f"{max(spill) if spill else ''} | {_kib(max(smem)) if smem else ''} | "
                f"{_kib(max(vmem)) if vmem else ''} | {max(r.get('compile_s', 0) for r, _ in items)} |")
  return rows


def failures(run: runner.Run) -> list[str]:
  out = []
  for r in run.results:
    if r["status"] != "compiled":
      kernels = ", ".join(k["name"] for k in r.get("kernels", [])) or "not reached"
      out += [f"- `{r['target']}` `{r['case']}` [{r['mode']}], kernels {kernels}, {r.get('stage')} "
              f"({r.get('error_type')}):",
              "", "  ```", *("  " + l for l in r.get("error", "").splitlines()[:12]), "  ```", ""]
  return out or ["none"]


def every_case(run: runner.Run) -> list[str]:
  rows = ["| target | case | mode | status | compile s | kernels |", "|---|---|---|---|---|---|"]
  for r in run.results:
    ks = []
    for k in r.get("kernels", []):
      if k.get("registers") is not None:
        ks.append(f"{k['name']}: {k['registers']} regs, spill {_spill(k)} B, smem {_kib(k.get('smem_bytes'))}")
      elif k.get("vmem_bytes") is not None:
        ks.append(f"{k['name']}: VMEM {_kib(k['vmem_bytes'])}")
    status = "compiled" if r["status"] == "compiled" else f"**failed** ({r.get('stage')})"
    rows.append(f"| {r['target']} | {r['case']} | {r['mode']} | {status} | {r.get('compile_s', '')} | "
                + "; ".join(ks) + " |")
  return rows


def markdown(run: runner.Run, title="Compile check") -> str:
  problems = runner.violations(run)
  lines = [f"# {title}", "", "Deviceless compiles of the project's Pallas kernels through the public API "
           "(`python -m attn_jax.compile_check`): the real TPU (libtpu) and GPU (XLA:GPU + Triton + ptxas) "
           "compilers, no device. Nothing ran, so runtime correctness and timings are not checked here.",
           "", *_versions_lines(run.meta), "",
           "## Headline", "", *headline(run), "",
           f"Check (every compile succeeds; no spill in a project kernel at head dim <= "
           f"{runner.SPILL_FREE_HEAD_DIM} on {', '.join(runner.SPILL_FREE_TARGETS)}): "
           + ("**passed**" if not problems else f"**{len(problems)} problems**"), "",
           "## Per kernel (worst case over the cases)", "", *per_kernel(run), "",
           "## Failures", "", *failures(run), "",
           "## Every compile", "", *every_case(run), ""]
  return "\n".join(lines)


def write(run: runner.Run, out_dir, stem="compile_check") -> tuple[pathlib.Path, pathlib.Path]:
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  md, js = out / f"{stem}.md", out / f"{stem}.json"
  md.write_text(markdown(run))
  js.write_text(json.dumps(dict(meta=run.meta, violations=runner.violations(run), results=run.results),
                           indent=1) + "\n")
  return md, js


def merge(paths) -> runner.Run:
  """One run from the JSON files of several (e.g. the TPU and the GPU targets run apart); for the
  same (target, case, mode), the later file wins."""
  results, meta = {}, None
  for path in paths:
    data = json.loads(pathlib.Path(path).read_text())
    # A later file's compile of the same (target, case, mode) replaces an earlier one (a re-check
    # after a fix).
    results.update({(r["target"], r["case"], r["mode"]): r for r in data["results"]})
    if meta is None:
      meta = dict(data["meta"], targets={}, environments={}, total_s=0.0, merged_from=[])
    meta["targets"].update(data["meta"]["targets"])
    meta["environments"].update(data["meta"]["environments"])
    meta["total_s"] = round(meta["total_s"] + data["meta"]["total_s"], 1)
    meta["merged_from"].append(f"{data['meta']['date']}: {', '.join(data['meta']['targets'])}")
  return runner.Run(list(results.values()), meta)
