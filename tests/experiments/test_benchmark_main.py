"""The main job end to end on a tiny setting: quality (MQAR) + efficiency, report, JSON, PNGs."""

import json
import subprocess
import sys

from tests.experiments import helpers


def test_main_job_writes_quality_and_efficiency(tmp_path):
  cmd = [sys.executable, "-m", "experiments.benchmark", f"--workdir={tmp_path}",
         "--quality_mechanisms=softmax,sliding_window,based", "--mqar_widths=8,16", "--mqar_steps=3",
         "--mqar_seq_len=16", "--mqar_kv_pairs=2", "--mqar_vocab=16", "--mqar_batch=4",
         "--mqar_eval_batches=1", "--mqar_layers=1", "--seq_lens=16,32", "--patterns=causal_self",
         "--modes=fwd", "--heads=2", "--head_dim=8", "--repeats=1"]
  result = subprocess.run(cmd, cwd=helpers.REPO, env=helpers.env(), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  payload = json.loads((tmp_path / "results.json").read_text())
  quality = payload["quality"]["records"]
  assert [(r["mechanism"], r["width"]) for r in quality] == [
      ("softmax", 8), ("softmax", 16), ("sliding_window", 8), ("sliding_window", 16), ("based", 8), ("based", 16)]
  for r in quality:
    assert "error" not in r, r
    assert 0 <= r["accuracy"] <= 1 and r["params"] > 0
    assert r["overrides"]["model.mixer"] == r["mixer"]
  state = {(r["mechanism"], r["width"]): r["state_floats"] for r in quality}
  # Dense attention caches every position: 1 layer x (K + V) x 16 tokens x width; the window
  # (16 // 4 = 4 tokens) caches 4 slots.
  assert state[("softmax", 16)] == 2 * 16 * 16 and state[("sliding_window", 16)] == 2 * 4 * 16
  # Based (1 head of width 16, feature dim 16, window 16 // 8 = 4 < 4 -> 4, conv 3): the
  # convolution's 2 inputs, the Taylor state (1 + 16 + 256) x (16 + 1), 4 window slots of K and V.
  assert state[("based", 16)] == 2 * 16 + 273 * 17 + 2 * 4 * 16
  from experiments import efficiency
  defaults = [m for m in efficiency.mechanisms() if m.default]
  n_mechs = sum(m.supports("causal_self") for m in defaults)
  assert n_mechs >= 3
  # One record per (mechanism, seq_len) for the single pattern and mode asked for.
  assert len(payload["efficiency"]) == 2 * n_mechs and payload["efficiency_lengths"]
  assert {r["mechanism"] for r in payload["efficiency"]} == {m.name for m in defaults if m.supports("causal_self")}
  assert efficiency.baseline_name() in {r["mechanism"] for r in payload["efficiency"]}
  # The recommendation: one row per length, its picks among the comparable mechanisms.
  standing = payload["quality_standing"]
  assert standing["measured"] and standing["width"] == 16
  assert standing["mechanisms"]["lightning (xla)"]["accuracy"] is None      # lightning not trained here
  assert standing["mechanisms"]["flash (xla)"]["quality"] == "softmax"
  comparable = {n for n, m in standing["mechanisms"].items() if m["comparable"]}
  assert [r["seq_len"] for r in payload["recommendation"]] == [16, 32]
  for row in payload["recommendation"]:
    assert row["fastest"] in comparable and row["least_memory"] in comparable
  assert all(r["runs"] >= 3 for r in payload["efficiency"])
  assert payload["cost"]["wall_s"] > 0
  md = (tmp_path / "report.md").read_text()
  assert md.startswith("# attn_jax attention benchmark")
  sections = [line for line in md.splitlines() if line.startswith("## ")]
  assert sections[0] == "## Recommendation: which attention for my pattern and length", sections
  assert "## Quality: multi-query associative recall (MQAR)" in md and "| sliding_window |" in md
  assert "### causal_self, fwd" in md and "CAB efficiency lengths" in md
  assert "### Correctness against the reference oracles" in md
  for png in ("quality_mqar.png", "efficiency_fwd.png"):
    data = (tmp_path / png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
