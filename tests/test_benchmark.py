"""The main job's library parts and its command line, on tiny shapes."""

import json
import os
import subprocess
import sys

import pytest

from experiments import efficiency
from experiments import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_measure_and_efficiency_lengths():
  shape = efficiency.Shape(batch=1, heads=2, kv_heads=1, head_dim=8)
  records = []
  mechs = [m for m in efficiency.mechanisms() if m.supports("causal_cross")]
  assert {m.name for m in mechs} == {"dense (reference)", "flash (xla)"}
  for mech in mechs:
    for n in (32, 64):
      records.append(efficiency.measure(mech, "causal_cross", n, "fwd_bwd", shape, repeats=1))
  for r in records:
    assert "error" not in r, r
    assert r["time_ms"] > 0 and r["temp_mib"] >= 0
    assert r["kv_len"] == r["seq_len"] // 2
  eff = efficiency.efficiency_lengths(records)
  assert {r["mechanism"] for r in eff} == {m.name for m in mechs if not m.baseline}
  md = report.efficiency_markdown(records, eff, report.environment(), vars(shape))
  assert "## causal_cross, fwd_bwd" in md and "efficiency length" in md


def test_efficiency_length_definition():
  base, mech = "dense (reference)", "flash (xla)"
  def rec(m, n, t):
    return dict(mechanism=m, pattern="p", mode="fwd", seq_len=n, time_ms=t, temp_mib=t)
  # Wins at 256 but loses at 512: the efficiency length is the start of the final winning run.
  records = [rec(base, 128, 1), rec(mech, 128, 2), rec(base, 256, 2), rec(mech, 256, 1),
             rec(base, 512, 3), rec(mech, 512, 4), rec(base, 1024, 9), rec(mech, 1024, 5),
             rec(base, 2048, 20), rec(mech, 2048, 6)]
  (row,) = efficiency.efficiency_lengths(records)
  assert row["time_efficiency_length"] == 1024
  records[-1]["time_ms"] = 30
  (row,) = efficiency.efficiency_lengths(records)
  assert row["time_efficiency_length"] is None


def test_command_line_writes_report(tmp_path):
  cmd = [sys.executable, "-m", "experiments.benchmark", "--suite=efficiency", f"--workdir={tmp_path}", "--seq_lens=16,32",
         "--patterns=noncausal_self,causal_cross", "--modes=fwd", "--heads=2", "--head_dim=8",
         "--repeats=1"]
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
  payload = json.loads((tmp_path / "results.json").read_text())
  assert payload["environment"]["jax_version"]
  # Two lengths per (mechanism, pattern) that the mechanism has a form for.
  expected = sum(2 * m.supports(p) for m in efficiency.mechanisms() if m.default
                 for p in ("noncausal_self", "causal_cross"))
  assert len(payload["efficiency"]) == expected
  assert (tmp_path / "report.md").read_text().startswith("# attn_jax efficiency benchmark")


def test_command_line_rejects_unknown_mechanism(tmp_path):
  cmd = [sys.executable, "-m", "experiments.benchmark", f"--workdir={tmp_path}", "--mechanisms=nope"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "--mechanisms: unknown ['nope']" in result.stderr


def test_list_prints_the_registry():
  from attn_jax.layers import registry
  result = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--list"], cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=120)
  lines = result.stdout.splitlines()
  assert lines[0].split()[:4] == ["name", "family", "decode", "cache"] and "backends here (cpu)" in lines[0]
  for entry in registry.entries():
    row = next(line for line in lines if line.startswith(entry.name + " "))
    assert (entry.family or "-") in row and entry.paper in row
    assert (entry.cache.__name__ if entry.cache else "none") in row
    assert ("xla" in row) == (entry.family is not None)
  assert "based: " in result.stdout and "quality presets: based, based_f8 (default)" in result.stdout


def test_efficiency_presets_of_every_entry_run(monkeypatch):
  """Every efficiency preset of the registry measures (one tiny case per preset)."""
  shape = efficiency.Shape(batch=1, heads=2, kv_heads=2, head_dim=8)
  for mech in efficiency.mechanisms():
    pattern = "causal_self" if mech.supports("causal_self") else mech.patterns[0]
    n = 128 if mech.mixer == "neighborhood" else 32  # its preset's kernel of 64 needs 64 tokens
    record = efficiency.measure(mech, pattern, n, "fwd", shape, repeats=1)
    assert "error" not in record, record
    assert record["time_ms"] > 0 and record["mixer"] == mech.mixer


def test_kernel_suite_layouts_and_ideal_ratio():
  from attn_jax import block_mask as bm_lib
  from experiments import kernels
  for case, density in (("sparse_50", 0.5), ("sparse_25", 0.25), ("sparse_12.5", 0.125)):
    mask, causal = kernels.case_mask(case, 1024, (128, 64))
    bm = bm_lib.make_block_mask(mask, 1024, 1024, 128, 64)
    assert not causal and bm.num_partial == 0 and bm.density == pytest.approx(density)
  records = [dict(case="dense_causal", seq_len=8, mode="fwd", density=0.5, xla_ms=10.0),
             dict(case="sparse_25", seq_len=8, mode="fwd", density=0.25, xla_ms=6.0)]
  kernels.add_ideal_ratios(records, None)
  # Dense non-causal time is estimated as 10 / 0.5 = 20 ms; ideal at 25 % is 5 ms.
  assert records[1]["ideal_ratio"] == pytest.approx(1.2)


def test_kernel_suite_command_line(tmp_path):
  cmd = [sys.executable, "-m", "experiments.benchmark", "--suite=kernels", f"--workdir={tmp_path}",
         "--seq_lens=256", "--cases=dense_causal,sparse_50", "--modes=fwd", "--repeats=1"]
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
  payload = json.loads((tmp_path / "results.json").read_text())
  assert [r["case"] for r in payload["kernels"]] == ["dense_causal", "sparse_50"]
  assert all("xla_ms" in r and r["tflops"] > 0 for r in payload["kernels"])
  assert "xla backend only" in (tmp_path / "report.md").read_text()
