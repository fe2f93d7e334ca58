"""metrics.Writer on a resume: metrics logged after the resumed checkpoint are dropped."""

import json

from experiments import metrics


def _steps(path):
  return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_drops_lines_after_the_checkpoint_and_reads_back_the_last_train_metrics(tmp_path):
  w = metrics.Writer(str(tmp_path), resume_step=0)
  for step in range(1, 7):
    w.scalars(step, {"loss": 10.0 - step, "accuracy": step / 10}, prefix="train/")
  w.scalars(6, {"accuracy": 0.9}, prefix="eval/")
  w.close()
  path = tmp_path / "metrics.jsonl"
  assert _steps(path) == [1, 2, 3, 4, 5, 6, 6]
  assert metrics.last_scalars(str(tmp_path), "train/") == {"loss": 4.0, "accuracy": 0.6}
  assert metrics.last_scalars(str(tmp_path), "eval/") == {"accuracy": 0.9}
  # Killed after checkpoint 4 with steps 5 and 6 logged: the restart logs them again, once.
  w = metrics.Writer(str(tmp_path), resume_step=4)
  assert _steps(path) == [1, 2, 3, 4]
  for step in (5, 6):
    w.scalars(step, {"loss": 1.0}, prefix="train/")
  w.close()
  assert _steps(path) == [1, 2, 3, 4, 5, 6]
  # Without a resume step (a reader, not a run) nothing is dropped.
  metrics.Writer(str(tmp_path)).close()
  assert _steps(path) == [1, 2, 3, 4, 5, 6]
  assert metrics.last_scalars(str(tmp_path / "missing"), "train/") == {}
