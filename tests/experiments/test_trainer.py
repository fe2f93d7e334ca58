"""The trainer as a process: exact resume after SIGKILL, save on SIGTERM and on Ctrl-C (SIGINT),
a finished run re-run, stop on a NaN loss, fall back from a damaged checkpoint. Every run is the tiny MQAR model of helpers.TINY (8 steps,
a checkpoint every 2), compared with one uninterrupted run: same final loss, same parameters
bit for bit (their checksum)."""

import json
import pathlib
import shutil
import signal
import struct

import numpy as np
import pytest

from tests.experiments import helpers


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("baseline")
  result = helpers.run_train(workdir)
  assert result.returncode == 0, result.stderr[-4000:]
  summary = helpers.final(workdir)
  assert summary["step"] == 8 and not summary["preempted"]
  assert np.isfinite(summary["last_loss"])
  assert helpers.checkpoint_steps(workdir) == [2, 4, 6, 8]
  # The resolved mixer is printed at the start and recorded; the end names the final metrics.
  assert "mixers (resolved" in result.stderr and "layer 0: mixer_config('softmax'" in result.stderr
  assert result.stdout.strip().splitlines()[-1].startswith("done: step 8/8: train (accuracy")
  return workdir, summary


def _assert_same_run(workdir, baseline_summary):
  summary = helpers.final(workdir)
  assert summary["step"] == 8
  np.testing.assert_allclose(summary["last_loss"], baseline_summary["last_loss"], rtol=1e-6)
  assert summary["params_checksum"] == baseline_summary["params_checksum"]
  return summary


def test_sigkill_and_restart_equals_uninterrupted_run(baseline, tmp_path):
  base_dir, base = baseline
  proc = helpers.start_train(tmp_path, "--config.debug.sleep_per_step=0.4")
  # Kill once checkpoint 4 is complete (Orbax renames a finished checkpoint into place).
  helpers.wait_for(lambda: 4 in helpers.checkpoint_steps(tmp_path), proc, what="checkpoint 4")
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL
  assert not (tmp_path / "final_metrics.json").exists()
  result = helpers.run_train(tmp_path)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "resumed from checkpoint" in result.stderr
  _assert_same_run(tmp_path, base)
  # Every logged step, before the kill and after the restart, has the uninterrupted run's loss.
  first = {m["step"]: m["train/loss"] for m in helpers.metric_lines(base_dir) if "train/loss" in m}
  logged = [m for m in helpers.metric_lines(tmp_path) if "train/loss" in m]
  # Steps logged after checkpoint 4 by the killed run were dropped on resume: each step once.
  assert [m["step"] for m in logged] == list(range(1, 9))
  for m in logged:
    np.testing.assert_allclose(m["train/loss"], first[m["step"]], rtol=1e-6)


def test_sigterm_saves_then_resumes(baseline, tmp_path):
  _, base = baseline
  proc = helpers.start_train(tmp_path, "--config.debug.sleep_per_step=0.4", "--config.checkpoint.every=100")
  helpers.wait_for(lambda: any(m["step"] >= 3 for m in helpers.metric_lines(tmp_path)), proc,
                   what="step 3")
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 143, out[-4000:]
  saved = helpers.checkpoint_steps(tmp_path)
  assert len(saved) == 1 and 3 <= saved[0] < 8, saved
  assert f"SIGTERM: saved checkpoint {saved[0]}" in out
  assert helpers.final(tmp_path)["preempted"]
  result = helpers.run_train(tmp_path, "--config.checkpoint.every=100")
  assert result.returncode == 0, result.stderr[-4000:]
  assert f"resumed from checkpoint {saved[0]}" in result.stderr
  _assert_same_run(tmp_path, base)


def test_ctrl_c_saves_and_exits_130_then_resumes(tmp_path):
  # A sliding window also checks that the typed config the flags built is what is recorded.
  window = ("--config.model.mixer=softmax", "--config.model.mixer_fields.softmax.window=4")
  # Six steps of 1 s left after step 2: room for a slow machine to deliver the signal.
  proc = helpers.start_train(tmp_path, "--config.debug.sleep_per_step=1", "--config.checkpoint.every=100",
                             *window)
  helpers.wait_for(lambda: any(m["step"] >= 2 for m in helpers.metric_lines(tmp_path)), proc,
                   what="step 2")
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 130, out[-4000:]
  assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-4000:]
  (saved,) = helpers.checkpoint_steps(tmp_path)
  assert 2 <= saved < 8 and f"SIGINT: saved checkpoint {saved}" in out
  final = helpers.final(tmp_path)
  assert final["preempted"] and final["signal"] == "SIGINT" and final["step"] == saved
  assert "layer 0: mixer_config('softmax', num_heads=1, window=4)" in out
  (mixer,) = json.loads((tmp_path / "config.json").read_text())["resolved"]["mixers"]
  assert mixer["window"] == 4 and mixer["mixer"] == "softmax" and mixer["num_sink_tokens"] == 0
  result = helpers.run_train(tmp_path, "--config.checkpoint.every=100", *window)
  assert result.returncode == 0, result.stderr[-4000:]
  assert f"resumed from checkpoint {saved}" in result.stderr
  assert helpers.final(tmp_path)["step"] == 8
  assert [m["step"] for m in helpers.metric_lines(tmp_path) if "train/loss" in m] == list(range(1, 9))


def test_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path):
  proc = helpers.start_train(tmp_path, "--config.debug.sleep_per_step=30", "--config.checkpoint.every=100")
  # The trainer owns SIGINT once it prints the mixers; its first step then takes 30 s or more
  # (compilation, then the injected sleep), so both Ctrl-Cs land before anything is saved.
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if "mixers (resolved" in line:
      break
  proc.send_signal(signal.SIGINT)
  for line in proc.stdout:
    seen.append(line)
    if "finishing the current step" in line:
      break
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=60)
  out = "".join(seen) + out
  assert proc.returncode == 130, out[-4000:]
  assert "Traceback" not in out
  assert "interrupted: stopped without saving" in out and helpers.checkpoint_steps(tmp_path) == []


def test_rerunning_a_finished_run_says_so_with_its_final_metrics(baseline, tmp_path):
  base_dir, base = baseline
  workdir = tmp_path / "run"
  shutil.copytree(base_dir, workdir)
  lines_before = helpers.metric_lines(workdir)
  result = helpers.run_train(workdir)
  assert result.returncode == 0, result.stderr[-4000:]
  last = result.stdout.strip().splitlines()
  assert last[-2].startswith(f"already finished: {workdir} holds a run trained to step 8"), result.stdout
  accuracy = base["eval"]["accuracy"]
  assert last[-1].startswith("Final metrics: train (accuracy") and f"eval (accuracy {accuracy:.4g}" in last[-1]
  assert helpers.final(workdir)["params_checksum"] == base["params_checksum"]
  assert helpers.metric_lines(workdir) == lines_before          # nothing trained, nothing logged
  # A run stopped after its last checkpoint but before its final metrics: evaluated again.
  (workdir / "final_metrics.json").unlink()
  result = helpers.run_train(workdir)
  assert result.returncode == 0 and "already finished" in result.stdout, result.stderr[-4000:]
  again = helpers.final(workdir)
  assert again["step"] == 8 and again["params_checksum"] == base["params_checksum"]
  np.testing.assert_allclose(again["eval"]["accuracy"], accuracy)
  np.testing.assert_allclose(again["train"]["loss"], base["train"]["loss"], rtol=1e-6)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  result = helpers.run_train(tmp_path, "--config.debug.nonfinite_at_step=5")
  assert result.returncode == 1
  assert "non-finite loss at step 5 (loss nan" in result.stderr
  assert "the last good checkpoint is step 4" in result.stderr
  assert helpers.checkpoint_steps(tmp_path) == [2, 4]
  assert not (tmp_path / "final_metrics.json").exists()


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(baseline, tmp_path):
  base_dir, base = baseline
  workdir = tmp_path / "run"
  shutil.copytree(base_dir, workdir)
  (workdir / "final_metrics.json").unlink()
  # Truncate the largest data file of checkpoint 8: a write cut short on a filesystem without
  # atomic renames.
  files = [p for p in (workdir / "checkpoints" / "8").rglob("*") if p.is_file()]
  victim = max(files, key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:100])
  result = helpers.run_train(workdir)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "checkpoint 8 cannot be read" in result.stderr
  assert "resumed from checkpoint 6" in result.stderr
  assert [p.name.split("-")[0] for p in (workdir / "checkpoints.corrupt").iterdir()] == ["8"]
  _assert_same_run(workdir, base)
  assert helpers.checkpoint_steps(workdir) == [2, 4, 6, 8]


def _tensorboard_scalars(path):
  """(tag, step, value) of every scalar in a TFRecord file of TensorBoard Event protos."""
  from tensorboardX.proto import event_pb2

  data, pos, out = path.read_bytes(), 0, []
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
    pos += 12 + length + 4              # length, its CRC, the record, its CRC
    out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return out


def test_progress_lines_and_tensorboard_events(baseline):
  workdir, _ = baseline
  (events,) = (pathlib.Path(workdir) / "tensorboard").glob("events.out.tfevents.*")
  scalars = _tensorboard_scalars(events)
  losses = {step: value for tag, step, value in scalars if tag == "train/loss"}
  jsonl = {m["step"]: m["train/loss"] for m in helpers.metric_lines(workdir) if "train/loss" in m}
  assert sorted(losses) == list(range(1, 9))
  np.testing.assert_allclose([losses[s] for s in range(1, 9)], [jsonl[s] for s in range(1, 9)], rtol=1e-6)
  assert {"train/tokens_per_sec", "train/learning_rate", "eval/accuracy"} <= {t for t, _, _ in scalars}
  lines = helpers.metric_lines(workdir)
  assert [m["step"] for m in lines if "train/loss" in m] == list(range(1, 9))
  assert all(m["train/tokens_per_sec"] > 0 and m["train/steps_per_sec"] > 0 for m in lines if "train/loss" in m)
  assert any("eval/accuracy" in m for m in lines)
