"""The compile check in CI: the real TPU and GPU compilers, on this CPU-only machine.

Runs ``python -m attn_jax.compile_check`` as a user would, which creates its cached compiler
environments on a clean machine (a libtpu venv and a CUDA-plugin venv, about 20 s each from
the package index) and compiles the quick subset (every kernel family, forward and backward) for
TPU v5e, H100 and A100. It fails on any compile error and on any register spill of a project
kernel at head dim <= 128 on H100 / A100.
"""

import json
import pathlib
import subprocess
import sys

from attn_jax.compile_check import cases as cases_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
TARGETS = ("v5e", "h100", "a100")


def _run(*args, out):
  cmd = [sys.executable, "-m", "attn_jax.compile_check", "--out", str(out), *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3000)


def test_quick_subset_compiles_without_spills(tmp_path):
  proc = _run("--quick", "--targets", ",".join(TARGETS), out=tmp_path)
  assert (tmp_path / "compile_check.json").exists(), proc.stdout[-5000:] + proc.stderr[-5000:]
  report = json.loads((tmp_path / "compile_check.json").read_text())
  got = {(r["target"], r["case"], r["mode"]) for r in report["results"] if r["status"] == "compiled"}
  quick = [c for c in cases_lib.select(quick=True)]
  assert {c.family for c in quick} == set(cases_lib.families())
  assert all(cases_lib.FWD_BWD in c.modes for c in quick)
  want = {(t, c.id, m) for t in TARGETS for c in quick for m in c.modes}
  assert got == want
  for r in report["results"]:
    assert r["kernels"], r  # the project's kernels were found in the compiled program
    if r["target"] != "v5e":
      assert all(k["registers"] and k["smem_bytes"] is not None for k in r["kernels"]), r
      # XLA ran the pip-installed ptxas, never a CUDA toolkit's.
      ptxas = r["cuda_tools"]["ptxas"]
      assert ptxas["ran"] and "site-packages/nvidia/cuda_nvcc" in ptxas["path"], ptxas
    else:
      assert all(k["vmem_bytes"] for k in r["kernels"]), r
  spills = {}
  for r in report["results"]:
    if r["target"] in ("h100", "a100") and r["head_dim"] <= 128:
      for k in r["kernels"]:
        if k["spill_stores"] or k["spill_loads"]:
          spills[(r["target"], r["case"], k["name"])] = max(k["spill_stores"], k["spill_loads"])
  assert not spills, spills
  # The tool's own verdict: no compile error, no spill.
  assert report["violations"] == [] and proc.returncode == 0, report["violations"]


def test_a_rejected_kernel_is_reported_with_the_compilers_message(tmp_path):
  proc = _run("--cases-module", "tests.compile_check.broken_cases", "--kernels", "broken",
              "--targets", "v5e,a100", out=tmp_path)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stdout + proc.stderr
  assert "a100 broken/too-big [fwd] (kernels broken_gpu): compile failed: RESOURCE_EXHAUSTED: Shared " \
         "memory size limit exceeded" in proc.stderr
  assert "v5e broken/too-big [fwd]: lower failed: The Pallas TPU lowering currently requires" in proc.stderr
