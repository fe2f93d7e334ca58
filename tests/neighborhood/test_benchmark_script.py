"""Smoke test of experiments/neighborhood_benchmark.py on a tiny configuration."""

import jax.numpy as jnp

from experiments import neighborhood_benchmark as bench


def test_run_config_reports_counts_times_and_flop_bound(monkeypatch):
  monkeypatch.setitem(bench.CONFIGS, "tiny", ((16,), 4, 1, False, 2, 8))
  record = bench.run_config("tiny", jnp.float32, 1, ["fwd"], 1, True)
  # Every query sees exactly 4 of the 16 keys: a quarter of the pairs.
  assert record["flop_bound_speedup"] == 4.0
  assert record["visited_blocks"] == record["full_blocks"] + record["partial_blocks"] > 0
  assert record["neighborhood_fwd_ms"] > 0 and record["dense_fwd_ms"] > 0 and record["speedup_fwd"] > 0
  md = bench.markdown([record], dict(date="d", jax_version="v", platform="p", device="x"))
  assert "| tiny | 16 | 4 | 1 |" in md
  # Causal windows hold fewer pairs; the count is exact (sum over queries of min(i + 1, 4)).
  assert bench._visible_pairs((16,), (4,), (1,), (1,), (True,)) == 1 + 2 + 3 + 4 * 13
