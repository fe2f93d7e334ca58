"""Shared pieces of the experiments tests: a tiny MQAR config and trainer subprocesses."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
MQAR_CONFIG = str(REPO / "experiments" / "configs" / "mqar.py")

# A 1-layer, width-16 MQAR model: compiles in seconds, and 8 steps are enough to compare runs.
TINY = ("--config.data.vocab_size=16", "--config.data.seq_len=16", "--config.data.num_kv_pairs=2",
        "--config.model.dim=16", "--config.model.mlp_dim=32", "--config.model.num_layers=1",
        "--config.batch_size=4", "--config.num_train_steps=8", "--config.log_every=1",
        "--config.eval_steps=1", "--config.optimizer.warmup_steps=2", "--config.checkpoint.every=2",
        "--config.checkpoint.keep=10")

# Fast compiles (tests/conftest.py's flags) and one CPU device per process.
_XLA_FLAGS = ("--xla_force_host_platform_device_count={n} --xla_backend_optimization_level=0 "
              "--xla_llvm_disable_expensive_passes=true")


def env(devices: int = 1) -> dict:
  e = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  e["XLA_FLAGS"] = _XLA_FLAGS.format(n=devices)
  return e


def parse_config(path, *overrides):
  """Parses a command line as experiments.train does (its own FlagValues and argv)."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["prog", f"--config={path}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def train_cmd(workdir, *overrides) -> list[str]:
  return [sys.executable, "-m", "experiments.train", f"--config={MQAR_CONFIG}", f"--workdir={workdir}",
          *TINY, *overrides]


def run_train(workdir, *overrides, timeout=180) -> subprocess.CompletedProcess:
  return subprocess.run(train_cmd(workdir, *overrides), cwd=REPO, env=env(), capture_output=True,
                        text=True, timeout=timeout)


def start_train(workdir, *overrides) -> subprocess.Popen:
  return subprocess.Popen(train_cmd(workdir, *overrides), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, proc, timeout=120, what="condition"):
  """Polls ``predicate()`` until true; fails if ``proc`` exits first or time runs out."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
    time.sleep(0.05)
  proc.kill()
  raise AssertionError(f"timed out waiting for {what}")


def final(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / "final_metrics.json").read_text())


def metric_lines(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "tensorboard" / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_steps(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "checkpoints"
  if not d.exists():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())
