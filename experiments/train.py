r"""Trains a model of the zoo: flags -> ml_collections config -> :func:`experiments.trainer.train`.

    python -m experiments.train --config=experiments/configs/mqar.py --workdir=/tmp/mqar \
        [--config.model.mixer=based --config.model.mixer_fields.based.window=16 \
         --config.num_train_steps=2000 ...]

``--config.model.mixer`` is any name of the mixer registry (``python -m experiments.benchmark
--list``), or names joined by commas for a hybrid; ``--config.model.mixer_fields.<name>.<field>``
sets that mechanism's own fields.

Multi-process runs join with ``--coordinator_address/--num_processes/--process_id`` (the local
launcher), by themselves under SLURM, or with ``--distributed=jax`` on Cloud TPU pods (see
``launch/README.md``). A run that
finds checkpoints in ``--workdir`` resumes from the newest good one; one whose checkpoint is
already at ``num_train_steps`` says so and prints the finished run's final metrics. Exit status:
0 when done (or already done), 1 on a non-finite loss or a checkpoint of another model in
``--workdir``, 143 after saving on SIGTERM, 130 after saving on Ctrl-C (SIGINT; a second Ctrl-C
stops at once without saving, also 130).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path of an ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard files.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for hand-launched multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "jax", "none"],
    "How to join a multi-process run. auto: the coordinator flags, ATTN_JAX_* variables, SLURM or "
    "a GKE TPU slice (attn_jax.sharding.initialize_distributed), else one process. jax: "
    "jax.distributed.initialize() with JAX's own cluster detection (Cloud TPU VM pods, found "
    "through the metadata server; SLURM; MPI). none: always one process.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every checkpoint step at INFO; --verbosity=0 brings that back.
    logging.set_verbosity(logging.WARNING)
  from attn_jax import sharding

  import jax

  # Must run before anything touches the devices.
  if _DISTRIBUTED.value == "jax":
    jax.distributed.initialize()
    how = "jax"
  elif _DISTRIBUTED.value == "auto":
    how = sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  else:
    how = "single"

  from experiments import trainer

  if jax.process_index() == 0:
    print(f"attn_jax train: {how} start, {jax.process_count()} process(es), "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s)", flush=True)
  from experiments import checkpointing

  try:
    summary = trainer.train(_CONFIG.value, _WORKDIR.value)
  except (trainer.NonFiniteLossError, checkpointing.IncompatibleCheckpointError) as e:
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  except KeyboardInterrupt:
    # A second Ctrl-C (or one before the trainer took over the signal): stop without a traceback.
    # The trainer's own clean-up has run as the exception left it; os._exit skips the interpreter's
    # shutdown, where a background thread that the interrupt cut short (Orbax's start-up clean-up
    # of temporary directories) would print one. A save cut short leaves only a temporary
    # directory, which the next start removes.
    print("interrupted: stopped without saving; the last checkpoint in --workdir (if any) is kept",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(trainer.EXIT_INTERRUPTED)
  if summary["preempted"]:
    sys.exit(trainer.EXIT_CODES.get(summary.get("signal"), trainer.EXIT_PREEMPTED))
  if jax.process_index() == 0:
    print(final_message(summary, int(_CONFIG.value.num_train_steps), _WORKDIR.value), flush=True)


def _metrics(values: dict) -> str:
  return ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, (int, float))) or "not logged"


def final_message(summary: dict, total_steps: int, workdir: str) -> str:
  """What a finished run prints: its step, final train and eval metrics, and where they are."""
  if summary.get("already_finished"):
    head = (f"already finished: {workdir} holds a run trained to step {summary['step']} "
            f"(num_train_steps {total_steps}); nothing to train. Raise --config.num_train_steps to train "
            "further, or use another --workdir.\nFinal metrics")
  else:
    head = f"done: step {summary['step']}/{total_steps}"
  return (f"{head}: train ({_metrics(summary.get('train') or {})}); eval ({_metrics(summary.get('eval') or {})}); "
          f"in {workdir}/final_metrics.json")


if __name__ == "__main__":
  from experiments import compat

  # The removed flags would only get a generic "no such field" from the flag parser.
  legacy = compat.scan_argv(sys.argv[1:])
  if legacy:
    sys.exit(f"ERROR: {legacy}")
  app.run(main)
