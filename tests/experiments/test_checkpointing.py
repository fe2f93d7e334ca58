"""Checkpointer verification in-process: checksum, partial and damaged step directories."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpointing
from tests.experiments import helpers


def _state(scale):
  return {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) * scale,
          "h": jnp.ones((5,), jnp.bfloat16) * scale, "count": jnp.int32(3),
          "rng": jax.random.key_data(jax.random.PRNGKey(1))}


def test_checksum_sees_every_bit():
  s = _state(1.0)
  base = checkpointing.checksum(s)
  assert checkpointing.checksum(_state(1.0)) == base
  flipped = dict(s, w=jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(s["w"], jnp.uint32).at[1, 2].add(1), jnp.float32))
  assert checkpointing.checksum(flipped) != base
  assert checkpointing.checksum(dict(s, count=jnp.int32(4))) != base


def _saved(tmp_path, steps=(2, 4)):
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), every=2, keep=5)
  for step in steps:
    ckpt.save(step, _state(float(step)), {"data_position": step})
  ckpt.wait()
  return ckpt


def _restore(tmp_path, logs):
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), every=2, keep=5)
  restored = ckpt.restore_latest(checkpointing.abstract_like(_state(0.0)), log=logs.append)
  return ckpt, restored


def test_restore_latest_round_trip(tmp_path):
  _saved(tmp_path).close()
  logs = []
  ckpt, (state, meta) = _restore(tmp_path, logs)
  assert meta["step"] == 4 and meta["data_position"] == 4 and not logs
  for k, v in _state(4.0).items():
    np.testing.assert_array_equal(np.asarray(state[k]), np.asarray(v))
  ckpt.close()


@pytest.mark.parametrize("damage", ["missing_meta", "missing_state", "bit_flip", "empty"])
def test_damaged_latest_falls_back(tmp_path, damage):
  _saved(tmp_path).close()
  step_dir = tmp_path / "ckpt" / "4"
  if damage == "missing_meta":
    shutil.rmtree(step_dir / "meta")
  elif damage == "missing_state":
    shutil.rmtree(step_dir / "state")
  elif damage == "bit_flip":
    # Replace checkpoint 4's arrays by checkpoint 2's: every file reads fine, only the
    # checksum recorded in meta can tell.
    shutil.rmtree(step_dir / "state")
    shutil.copytree(tmp_path / "ckpt" / "2" / "state", step_dir / "state")
  else:
    shutil.rmtree(step_dir)
    step_dir.mkdir()
  logs = []
  ckpt, restored = _restore(tmp_path, logs)
  state, meta = restored
  assert meta["step"] == 2
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(2.0)["w"]))
  assert len(logs) == 1 and "checkpoint 4" in logs[0]
  if damage == "bit_flip":
    assert "checksum" in logs[0]
  assert ckpt.all_steps() == [2]
  assert len(list((tmp_path / "ckpt.corrupt").iterdir())) == 1
  ckpt.close()


def test_nothing_usable_restores_nothing(tmp_path):
  _saved(tmp_path, steps=(2,)).close()
  shutil.rmtree(tmp_path / "ckpt" / "2" / "state")
  logs = []
  ckpt, restored = _restore(tmp_path, logs)
  assert restored is None and ckpt.all_steps() == []
  ckpt.close()


def test_keeps_the_last_n(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), every=1, keep=2)
  for step in (1, 2, 3, 4):
    ckpt.save(step, _state(float(step)), {"data_position": step})
  ckpt.close()
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["3", "4"]


def test_bad_arguments():
  with pytest.raises(ValueError, match="every and keep must be >= 1, got every=0, keep=3"):
    checkpointing.Checkpointer("/tmp/unused", every=0, keep=3)


def test_checkpoint_of_another_structure_is_refused_not_quarantined(tmp_path):
  _saved(tmp_path)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), every=2, keep=5)
  other = dict(_state(0.0), w=jnp.zeros((3, 5)), extra=jnp.zeros(2))
  del other["h"]
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match=r"checkpoint 4 .* another model or optimizer: 1 array\(s\) the model has but the "
                           r"checkpoint lacks \(extra\); 1 array\(s\) the checkpoint has but the model lacks "
                           r"\(h\); different shapes: w \(3, 4\) vs \(3, 5\)"):
    ckpt.restore_latest(checkpointing.abstract_like(other))
  assert ckpt.all_steps() == [2, 4] and not (tmp_path / "ckpt.corrupt").exists()
  ckpt.close()


# A checkpoint written by the code before the mixer registry (commit 23f295a): the tiny MQAR
# model with --config.model.mechanism=conv_window (2 layers, short convolution then a window of
# 4), trained 4 steps. tests/experiments/data/pre_registry_mqar holds its checkpoints/, its
# config.json and final_metrics.json (with the checksum of its final parameters).
PRE_REGISTRY = pathlib.Path(__file__).parent / "data" / "pre_registry_mqar"


def _pre_registry_config(*mixer_flags):
  return helpers.parse_config(
      helpers.MQAR_CONFIG, *helpers.TINY, "--config.model.num_layers=2", "--config.num_train_steps=4",
      "--config.checkpoint.every=4", "--config.checkpoint.keep=1", *mixer_flags)


def test_pre_registry_checkpoint_resumes_under_the_equivalent_flags(tmp_path):
  from experiments import compat
  from experiments import trainer
  workdir = tmp_path / "run"
  shutil.copytree(PRE_REGISTRY, workdir)
  old = json.loads((PRE_REGISTRY / "final_metrics.json").read_text())
  flags = compat.legacy_flags("conv_window", seq_len=16)
  assert flags == ["--config.model.mixer=short_conv,softmax", "--config.model.mixer_fields.softmax.window=4"]
  summary = trainer.train(_pre_registry_config(*flags), str(workdir), show_progress=False)
  # Restored at its last step, bit for bit: the parameters' checksum is the one it saved.
  assert summary["step"] == 4 and summary["params_checksum"] == old["params_checksum"]


def test_pre_registry_checkpoint_under_another_model_says_what_changed(tmp_path):
  from experiments import trainer
  workdir = tmp_path / "run"
  shutil.copytree(PRE_REGISTRY, workdir)
  with pytest.raises(checkpointing.IncompatibleCheckpointError) as info:
    trainer.train(_pre_registry_config("--config.model.mixer=softmax"), str(workdir), show_progress=False)
  message = str(info.value)
  assert "checkpoint 4" in message and "written for another model" in message
  assert "blocks/0/mixer/kernel" in message  # the short convolution the softmax model lacks
  assert "before the mixer registry" in message and "model.mechanism='conv_window'" in message
  assert ("--config.model.mixer=short_conv,softmax --config.model.mixer_fields.softmax.window=4" in message)
  # Nothing was moved aside or overwritten: the run can still be resumed correctly.
  assert (workdir / "checkpoints" / "4").is_dir() and not (workdir / "checkpoints.corrupt").exists()
  assert json.loads((workdir / "config.json").read_text())["model"]["mechanism"] == "conv_window"


def test_removed_command_line_flags_say_what_replaced_them(tmp_path):
  result = helpers.run_train(tmp_path, "--config.model.mechanism=linear_decay", timeout=120)
  assert result.returncode != 0
  assert ("the old mechanism 'linear_decay' is now: --config.model.mixer=linear "
          "--config.model.mixer_fields.linear.decay=data") in result.stderr
