"""The linear mechanisms' benchmark entries run in the patterns they declare."""

from experiments import efficiency


def test_linear_entries_measure_their_patterns():
  shape = efficiency.Shape(batch=1, heads=2, kv_heads=1, head_dim=8)
  entries = [m for m in efficiency.mechanisms() if m.name in ("linear elu+1 (xla)", "lightning (xla)")]
  assert len(entries) == 2
  for mech in entries:
    assert not mech.supports("causal_cross")
    for pattern in mech.patterns:
      record = efficiency.measure(mech, pattern, 48, "fwd_bwd", shape, repeats=1)
      assert "error" not in record, record
      assert record["time_ms"] > 0 and record["temp_mib"] >= 0
