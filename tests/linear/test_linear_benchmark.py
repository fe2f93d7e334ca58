"""The linear-attention benchmark script's library part, on tiny shapes."""

from experiments import efficiency
from experiments import linear_benchmark


def test_run_and_markdown(monkeypatch):
  monkeypatch.setitem(linear_benchmark.CONFIGS, "tiny", (1, 2, 8, "float32", (32, 128)))
  payload = linear_benchmark.run("tiny", repeats=1, modes=("fwd",))
  assert {(r["mechanism"], r["seq_len"]) for r in payload["records"]} == {
      (m.name, n) for m in linear_benchmark.MECHANISMS for n in (32, 128)}
  for r in payload["records"]:
    assert "error" not in r, r
  md = linear_benchmark.markdown(payload)
  assert "## fwd" in md and "| 128 |" in md and efficiency.MODES[1] not in md.split("## fwd")[1]
