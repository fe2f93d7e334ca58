"""The plumbing of the prepared GPU run (experiments/gpu_check.py) on the CPU, at tiny sizes."""

import dataclasses
import json
import os

from experiments import gpu_check

# Forward only, to keep the CI cost near 20 s (interpret-mode compiles dominate); the full dry run,
# forward + backward, is `python -m experiments.gpu_check --tiny` (about 1.5 minutes).
TINY = dataclasses.replace(
    gpu_check.TINY, seq_lens=(128,), softmax_cases=("causal", "sparse_50"), impls=("pallas_gpu", "cudnn", "xla"),
    neighborhood_tokens=128, neighborhood_window=16, linear_lens=(64,), repeats=1, modes=("fwd",))


def test_priority_order_and_pairs():
  items = gpu_check.plan_items(gpu_check.Settings())
  keys = [it.key for it in items]
  assert len(keys) == len(set(keys))
  # Head dim 128 softmax first, then neighborhood and linear, head dim 64 last.
  sections = [(it.section, it.head_dim) for it in items]
  first_64 = sections.index(("softmax", 64))
  assert all(d == 128 for _, d in sections[:first_64])
  assert max(i for i, (sec, _) in enumerate(sections) if sec != "softmax") < first_64
  # The xla backend stops at 8k; cuDNN and tokamax have no block-sparse form.
  assert not any(it.impl == "xla" and it.seq > 8192 for it in items)
  assert not any(it.case.startswith("sparse") and it.impl in ("cudnn", "tokamax_mosaic") for it in items)
  s = gpu_check.Settings()
  window = gpu_check.Item("softmax", "window_sinks", "pallas_gpu", 4096, 128, "fwd")
  no_sinks = dataclasses.replace(window, impl="cudnn")
  # 1024-key window rows, plus the 4 sink keys for the rows whose window has left them.
  expected = sum(min(i, 1023) + 1 for i in range(4096))
  assert gpu_check.visible_pairs(no_sinks, s) == expected
  assert gpu_check.visible_pairs(window, s) == expected + 4 * (4096 - 1024 - 3) + 6
  sparse = gpu_check.visible_pairs(gpu_check.Item("softmax", "sparse_25", "pallas_gpu", 4096, 128, "fwd"), s)
  assert sparse == 4096 * 4096 // 4


def test_tiny_run_writes_results(tmp_path):
  with open(tmp_path / "gpu_tests.xml", "w") as f:
    f.write('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
            '<testcase classname="tests.gpu.t" name="a"/><testcase classname="tests.gpu.t" name="b">'
            '<failure message="x"/></testcase></testsuite></testsuites>')
  payload = gpu_check.run(TINY, str(tmp_path), budget_s=240, workers=2, bench_dir=str(tmp_path / "bench"))
  records = payload["records"]
  assert payload["tests"]["failed"] == ["tests.gpu.t::b"] and payload["tests"]["tests"] == 3
  timed = [r for r in records.values() if "time_ms" in r]
  assert {r["section"] for r in timed} == {"softmax", "neighborhood", "linear"}
  assert all(r["tflops"] > 0 for r in timed)
  assert any("ideal_ratio" in r for r in timed) and any("speedup_vs_causal_pallas_gpu" in r for r in timed)
  cudnn = [r for r in records.values() if r["impl"] == "cudnn"]
  assert cudnn and all("cuDNN needs an NVIDIA GPU" in r["error"] for r in cudnn)
  for d in (tmp_path, tmp_path / "bench"):
    with open(d / "gpu_check.json") as f:
      assert json.load(f)["timed"] == payload["timed"]
    md = open(d / "gpu_check.md").read()
    assert "## Softmax attention, head dim 16, fwd" in md and "## Linear attention vs dense causal" in md


def test_budget_spent_skips_without_compiling(tmp_path):
  payload = gpu_check.run(TINY, str(tmp_path), budget_s=0.0, workers=1)
  assert payload["timed"] == payload["compiled"] == 0
  assert sorted(payload["skipped"]) == sorted(payload["records"])
  assert "## Skipped (budget)" in open(os.path.join(tmp_path, "gpu_check.md")).read()
