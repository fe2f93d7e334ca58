"""launch/local.py: two processes joined by jax.distributed train the tiny MQAR model."""

import subprocess
import sys

from tests.experiments import helpers


def test_local_launcher_runs_two_processes(tmp_path):
  cmd = [sys.executable, "launch/local.py", "--num_processes=2", "--",
         f"--config={helpers.MQAR_CONFIG}", f"--workdir={tmp_path}", *helpers.TINY,
         "--config.num_train_steps=4"]
  result = subprocess.run(cmd, cwd=helpers.REPO, env=helpers.env(), capture_output=True, text=True,
                          timeout=240)
  assert result.returncode == 0, result.stdout[-6000:]
  assert "[0] attn_jax train: explicit start, 2 process(es), 2 cpu device(s)" in result.stdout
  assert "[1] " in result.stdout
  summary = helpers.final(tmp_path)
  assert summary["processes"] == 2 and summary["devices"] == 2 and summary["step"] == 4
  # Both processes wrote their shards of the same checkpoints.
  assert helpers.checkpoint_steps(tmp_path) == [2, 4]


def test_local_launcher_reports_a_failing_process(tmp_path):
  cmd = [sys.executable, "launch/local.py", "--num_processes=2", "--",
         f"--config={helpers.MQAR_CONFIG}", f"--workdir={tmp_path}", "--config.model.mixer=nope"]
  result = subprocess.run(cmd, cwd=helpers.REPO, env=helpers.env(), capture_output=True, text=True,
                          timeout=240)
  assert result.returncode != 0
  assert "mixer must be one of" in result.stdout
