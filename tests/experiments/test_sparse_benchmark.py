"""experiments/sparse_benchmark.py runs: one short length (1024: the top-k preset needs 8 blocks of 128), two mechanisms and the decoding pair."""

from experiments import efficiency
from experiments import sparse_benchmark


def test_sparse_benchmark_measures_and_reports():
  shape = efficiency.Shape(batch=1, heads=2, kv_heads=2, head_dim=16)
  payload = sparse_benchmark.run([1024], 1, ("fwd",), shape, decode_steps=2,
                                 only=["topk_block b128 k8", "power_attention b128"])
  recs = payload["records"]
  assert [r["mechanism"] for r in recs if r["mode"] == "fwd"] == [
      "flash causal", "topk_block b128 k8", "power_attention b128"]
  assert sum(r["mode"] == "decode" for r in recs) == 2
  for r in recs:
    assert "error" not in r, r
    assert r["time_ms"] > 0 and r["temp_mib"] >= 0
  md = sparse_benchmark.markdown(payload)
  assert "| topk_block b128 k8 |" in md and "| recycled decode (2 steps) |" in md and "jax" in md
