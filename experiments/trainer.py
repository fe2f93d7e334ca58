"""The training loop behind ``experiments.train`` and the benchmark's quality suite.

:func:`train` runs ``config.num_train_steps`` steps of the model ``config.model`` describes on the
data ``config.data`` names, sharded on the mesh ``config.mesh`` describes (one device, a host, or
every device of a multi-process run), and with a ``workdir``:

* writes ``config.json``, TensorBoard events and ``metrics.jsonl`` (``workdir/tensorboard``);
* checkpoints every ``config.checkpoint.every`` steps (asynchronously, keeping the last
  ``config.checkpoint.keep``) and resumes from the newest checkpoint that verifies: parameters,
  optimizer state, step, data position and RNG key, so a run killed at any moment and restarted
  computes exactly what an uninterrupted run computes;
* on SIGTERM (a TPU or spot VM preemption notice) or SIGINT (Ctrl-C) finishes the current step,
  saves, and returns with ``preempted`` set (``experiments.train`` then exits with
  :data:`EXIT_PREEMPTED` or :data:`EXIT_INTERRUPTED`); a second Ctrl-C raises
  ``KeyboardInterrupt`` at once, without saving;
* prints the resolved mixer configuration of every layer (the typed registry config that
  ``config.model`` built, every field the mechanism defaults included) and writes it to
  ``config.json`` (``resolved.mixers``);
* on a resume, drops the metrics that the interrupted run logged after its last checkpoint, so
  that every step appears once in ``metrics.jsonl`` (and in TensorBoard);
* on a work directory whose checkpoint is already at ``num_train_steps``, trains nothing and
  returns the finished run's final metrics with ``already_finished`` set;
* stops at the first non-finite loss or gradient with :class:`NonFiniteLossError`, before any
  checkpoint of the damaged state is written, naming the last good checkpoint;
* writes ``final_metrics.json`` at the end.

Metrics are read back from the devices only at log, eval and checkpoint steps, so the loop
dispatches steps without waiting for them; the non-finite check runs on those read-backs, and a
checkpoint is written only once every step before it has been checked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from attn_jax import layers
from attn_jax import models
from attn_jax import sharding
from experiments import builders
from experiments import checkpointing
from experiments import compat
from experiments import data as data_lib
from experiments import metrics as metrics_lib

# 128 + SIGTERM: the conventional status of a process ended by SIGTERM, so supervisors treat a
# preempted run as terminated (and the launch scripts restart it).
EXIT_PREEMPTED = 143
# 128 + SIGINT: what a shell reports for a command stopped with Ctrl-C.
EXIT_INTERRUPTED = 130
EXIT_CODES = {"SIGTERM": EXIT_PREEMPTED, "SIGINT": EXIT_INTERRUPTED}


class NonFiniteLossError(RuntimeError):
  """The loss or the gradient norm became NaN or Inf; the run stopped without saving it."""


class _Preemption:
  """SIGTERM / SIGINT -> a flag the loop polls; multi-process runs agree on the step to stop at.

  A second SIGINT (Ctrl-C pressed again while the step finishes and the checkpoint is written)
  raises ``KeyboardInterrupt``: the user asked to stop now.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, log=None):
    self.requested = False
    self.signal = None
    self._previous = {}
    self._log = log or (lambda msg: None)

  def install(self):
    if threading.current_thread() is not threading.main_thread():
      return  # Python delivers signals to the main thread only; leave the caller's handlers alone.
    self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if self.requested:
      return
    # Set before logging: a second signal can interrupt this handler while it prints.
    self.requested = True
    self.signal = name = signal.Signals(signum).name
    self._log(f"{name}: finishing the current step, then saving a checkpoint"
              + (" (Ctrl-C again stops at once without saving)" if signum == signal.SIGINT else ""))

  def uninstall(self):
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous = {}

  def should_stop(self, step: int, sync_now: bool) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    try:
      # JAX's preemption service (on with jax.distributed) picks one step for every process.
      if multihost_utils.reached_preemption_sync_point(step):
        return True
    except RuntimeError:
      pass
    if sync_now:
      flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
      return bool(np.asarray(flags).any())
    return False


def _state_shardings(setup, mesh):
  replicated = NamedSharding(mesh, PartitionSpec())
  return {"params": setup.param_shardings, "opt_state": setup.opt_shardings, "rng": replicated}


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _make_step(setup, tx, loss_fn, batch_shardings, state_shardings, nonfinite_at_step: int):
  graphdef, mesh, rules = setup.graphdef, setup.mesh, setup.rules

  def step(state, batch, step_index):
    rng, _ = jax.random.split(jax.random.wrap_key_data(state["rng"]))
    with sharding.use_rules(mesh, rules):
      (loss, aux), grads = jax.value_and_grad(
          lambda p: loss_fn(nnx.merge(graphdef, p), batch), has_aux=True)(state["params"])
    if nonfinite_at_step >= 0:
      # Fault injection for testing the non-finite guard (config.debug.nonfinite_at_step).
      poison = jnp.where(step_index == nonfinite_at_step, jnp.nan, 1.0)
      loss = loss * poison
      grads = jax.tree.map(lambda g: g * poison, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "opt_state": opt_state, "rng": jax.random.key_data(rng)}
    return new, {"loss": loss, "grad_norm": _global_norm(grads), **aux}

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def _make_eval(setup, loss_fn, batch_shardings):
  graphdef, mesh, rules = setup.graphdef, setup.mesh, setup.rules

  def evaluate(params, batch):
    with sharding.use_rules(mesh, rules):
      loss, aux = loss_fn(nnx.merge(graphdef, params), batch)
    return {"loss": loss, **aux}

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(evaluate, in_shardings=(setup.param_shardings, batch_shardings),
                 out_shardings=replicated)


def put_batch(source, split: str, index: int, batch_size: int, spec, shardings):
  """Global batch ``index`` of ``split`` as sharded arrays; each process loads only the rows its
  devices hold (rows are loaded once per process even when several devices share them)."""
  loaded = {}

  def rows(idx):
    start, stop, _ = idx[0].indices(batch_size)
    if (start, stop) not in loaded:
      loaded[(start, stop)] = source.rows(split, index, batch_size, start, stop)
    return loaded[(start, stop)]

  return {k: jax.make_array_from_callback(
      spec[k].shape, shardings[k], lambda idx, k=k: np.asarray(rows(idx)[k][(slice(None),) + tuple(idx[1:])],
                                                               spec[k].dtype))
          for k in spec}


def _mean(records):
  keys = records[0].keys()
  return {k: float(np.mean([float(r[k]) for r in records])) for k in keys}


def evaluate(eval_fn, params, source, config, spec, shardings) -> dict:
  """Mean eval metrics over ``config.eval_steps`` batches (fewer if the split is smaller)."""
  n = config.eval_steps
  available = source.num_eval_batches(config.batch_size)
  if available is not None:
    n = min(n, available)
  results = [eval_fn(params, put_batch(source, "eval", i, config.batch_size, spec, shardings))
             for i in range(n)]
  return _mean(jax.device_get(results))


def _write_json(path, payload):
  path = epath.Path(path)
  text = json.dumps(payload, indent=2, default=str)
  if "://" in str(path):
    path.write_text(text)
    return
  # Locally, readers (tests, scripts watching a run) never see a half-written file.
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def _mixer_name(config_obj) -> str | None:
  """The registry name of a typed mixer config, or None for any other object."""
  return config_obj.mixer if isinstance(config_obj, layers.MixerConfig) else None


def _fields(config_obj) -> dict:
  """A mixer config's fields (one level: masks and other objects stay objects), led by its
  registry name under ``mixer``."""
  if dataclasses.is_dataclass(config_obj):
    name = _mixer_name(config_obj)
    head = {} if name is None else {"mixer": name}
    return {**head, **{f.name: getattr(config_obj, f.name) for f in dataclasses.fields(config_obj)}}
  return dict(vars(config_obj)) if hasattr(config_obj, "__dict__") else {"value": config_obj}


def _layer_configs(model_config) -> list:
  if hasattr(model_config, "layer_configs"):
    return list(model_config.layer_configs())
  schedule = model_config.schedule
  return list(schedule if isinstance(schedule, tuple) else (schedule,))


def resolved_mixers(model_config) -> list[dict]:
  """The typed mixer config of every layer of a built model's config (``LMConfig`` /
  ``ViTConfig``), as dicts (``mixer``: the registry name, then every field): what the trainer
  actually runs, after the registry's defaults and the task's length resolved ``config.model``
  (e.g. the window the ``sliding_window`` preset chose)."""
  return [_fields(c) for c in _layer_configs(model_config)]


def _non_default(config_obj) -> dict:
  if not dataclasses.is_dataclass(config_obj):
    return _fields(config_obj)
  out = {}
  for f in dataclasses.fields(config_obj):
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
    value = getattr(config_obj, f.name)
    if value != default:
      out[f.name] = value
  return out


def describe_mixers(model_config) -> str:
  """One line per run of identical layers, as the call that builds them:
  ``layers 0-1: mixer_config('softmax', window=16)``, with the fields that differ from the
  mechanism's defaults."""
  layers_ = _layer_configs(model_config)
  lines, start = [], 0
  for i in range(1, len(layers_) + 1):
    if i == len(layers_) or layers_[i] != layers_[start]:
      c = layers_[start]
      args = [f"{k}={v!r}" for k, v in _non_default(c).items()]
      name = _mixer_name(c)
      call = (f"mixer_config({', '.join([repr(name)] + args)})" if name is not None
              else f"{type(c).__name__}({', '.join(args)})")
      which = f"layer {start}" if i - start == 1 else f"layers {start}-{i - 1}"
      lines.append(f"  {which}: {call}")
      start = i
  return "mixers (resolved; fields at their defaults omitted, config.json has them all):\n" + "\n".join(lines)


def _read_json(path):
  path = epath.Path(path)
  try:
    return json.loads(path.read_text()) if path.exists() else None
  except ValueError:
    return None


def train(config, workdir: str | None = None, *, show_progress: bool = True, desc: str = "train",
          leave_progress: bool = True) -> dict:
  """Trains as ``config`` says; returns a summary dict (final step, last train metrics, eval
  metrics, ``preempted`` and the ``signal`` that stopped the run, ``already_finished`` when the
  work directory held a finished run).

  Without ``workdir`` nothing is written (no checkpoints, no metrics files): the benchmark's use.

  Raises:
    NonFiniteLossError: a NaN/Inf loss or gradient; checkpoints written before it are kept.
  """
  is_main = jax.process_index() == 0
  source = data_lib.make_source(config.data, config.seed)
  make_model = builders.model_factory(config, source)
  total_steps = int(config.num_train_steps)
  tx, schedule = builders.optimizer(config.optimizer, total_steps)
  mesh = sharding.make_mesh(**dict(config.mesh))
  setup = models.train.init(make_model, tx, mesh=mesh)
  spec = source.spec(config.batch_size)
  batch_sh = models.train.batch_shardings(spec, mesh, setup.rules)
  state_sh = _state_shardings(setup, mesh)
  loss_fn = builders.loss_fn(source.kind)
  step_fn = _make_step(setup, tx, loss_fn, batch_sh, state_sh, int(config.debug.nonfinite_at_step))
  eval_fn = _make_eval(setup, loss_fn, batch_sh)
  rng = jax.device_put(jax.random.key_data(jax.random.PRNGKey(config.seed)), state_sh["rng"])
  state = {"params": setup.params, "opt_state": setup.opt_state, "rng": rng}

  ckpt = None
  start = 0
  log = lambda msg: print(msg, file=sys.stderr, flush=True) if is_main else None
  model_config = nnx.merge(setup.graphdef, setup.params).config
  preemption = _Preemption(log)
  if workdir is not None:
    # From here on a Ctrl-C or SIGTERM is a request to stop cleanly, never a traceback.
    preemption.install()
    try:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      log(describe_mixers(model_config))
      if config.checkpoint.every > 0:
        ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                          every=config.checkpoint.every, keep=config.checkpoint.keep,
                                          async_save=config.checkpoint.async_save)
        try:
          restored = ckpt.restore_latest(checkpointing.abstract_like(state), log=log)
        except checkpointing.IncompatibleCheckpointError as e:
          raise checkpointing.IncompatibleCheckpointError(f"{e}{compat.workdir_hint(workdir)}") from None
        if restored is not None:
          state, meta = restored
          start = int(meta["data_position"])
          log(f"resumed from checkpoint {meta['step']} (data position {start})")
      # Written after the restore, so that a refused resume leaves the run's own config.json;
      # ``resolved`` is what the run actually builds.
      if is_main:
        _write_json(os.path.join(workdir, "config.json"),
                    {**json.loads(config.to_json_best_effort()),
                     "resolved": {"mixers": resolved_mixers(model_config)}})
      if start >= total_steps:
        summary = _finished(workdir, start, state, eval_fn, source, config, spec, batch_sh, is_main)
        preemption.uninstall()
        if ckpt is not None:
          ckpt.close()
        return summary
    except BaseException:
      preemption.uninstall()
      if ckpt is not None:
        ckpt.close()
      raise
  writer = metrics_lib.Writer(os.path.join(workdir, "tensorboard") if workdir else None, enabled=is_main,
                              resume_step=start if workdir else None)
  progress = metrics_lib.Progress(start, total_steps, config.batch_size * source.tokens_per_example,
                                  enabled=show_progress and is_main, desc=desc, leave=leave_progress)

  pending = []          # (step index, device metrics) not yet read back
  window = []           # host metrics since the last log line
  last = {}
  last_loss = None
  last_eval = {}
  preempted = False
  last_saved = start

  def check_pending():
    """Reads back pending metrics; raises at the first non-finite one."""
    nonlocal pending, last_loss
    host = jax.device_get([m for _, m in pending])
    for (index, _), values in zip(pending, host):
      if not (math.isfinite(float(values["loss"])) and math.isfinite(float(values["grad_norm"]))):
        pending = []
        good = ckpt.all_steps() if ckpt is not None else []
        where = (f"the last good checkpoint is step {good[-1]} in {ckpt.directory}" if good
                 else "no checkpoint was written")
        raise NonFiniteLossError(
            f"non-finite loss at step {index} (loss {float(values['loss'])}, grad norm "
            f"{float(values['grad_norm'])}); stopping without saving this state: {where}. "
            "Lower optimizer.learning_rate or raise optimizer.warmup_steps, then resume.")
      window.append({k: float(v) for k, v in values.items()})
      last_loss = float(values["loss"])
    pending = []

  try:
    step = start
    while step < total_steps:
      batch = put_batch(source, "train", step, config.batch_size, spec, batch_sh)
      state, step_metrics = step_fn(state, batch, jnp.int32(step))
      pending.append((step, step_metrics))
      step += 1
      if config.debug.sleep_per_step > 0:
        time.sleep(config.debug.sleep_per_step)
      log_now = step % config.log_every == 0 or step == total_steps
      save_now = ckpt is not None and ckpt.should_save(step)
      eval_now = step == total_steps or (config.eval_every > 0 and step % config.eval_every == 0)
      stop = preemption.should_stop(step, sync_now=log_now)
      if log_now or save_now or eval_now or stop:
        check_pending()
      if log_now and window:
        last = _mean(window)
        last["learning_rate"] = float(schedule(step - 1))
        rates = progress.update(step, {k: last[k] for k in ("loss", "accuracy") if k in last})
        writer.scalars(step, {**last, **rates}, prefix="train/")
        window = []
      else:
        progress.update(step)
      if eval_now:
        last_eval = evaluate(eval_fn, state["params"], source, config, spec, batch_sh)
        writer.scalars(step, last_eval, prefix="eval/")
        progress.write(f"eval at step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in last_eval.items()))
      if ckpt is not None and (save_now or stop):
        ckpt.save(step, state, {"data_position": step}, force=stop)
        last_saved = step
      if stop:
        preempted = True
        name = preemption.signal or "SIGTERM"    # another process's signal in a multi-process run
        if window:
          # The steps since the last log line would otherwise never be logged.
          last = _mean(window)
          last["learning_rate"] = float(schedule(step - 1))
          writer.scalars(step, last, prefix="train/")
          window = []
        if ckpt is not None:
          ckpt.wait()
          log(f"{name}: saved checkpoint {step} in {ckpt.directory}; run the same command to resume")
        else:
          log(f"{name} at step {step}: checkpoints are off (checkpoint.every=0), nothing saved")
        break
    if ckpt is not None and not preempted and last_saved != step:
      check_pending()
      ckpt.save(step, state, {"data_position": step}, force=True)
  finally:
    progress.close()
    preemption.uninstall()
    if ckpt is not None:
      ckpt.close()
    writer.close()

  # The checksum identifies the final parameters bit for bit (resume tests compare it).
  summary = {"step": step, "last_loss": last_loss, "train": last, "eval": last_eval,
             "preempted": preempted, "params_checksum": checkpointing.checksum(state["params"]),
             "processes": jax.process_count(), "devices": jax.device_count()}
  if preempted:
    summary["signal"] = preemption.signal or "SIGTERM"
  if workdir is not None and is_main:
    _write_json(os.path.join(workdir, "final_metrics.json"), summary)
  return summary


def _finished(workdir, step, state, eval_fn, source, config, spec, batch_sh, is_main) -> dict:
  """The summary of a run whose checkpoint is already at (or past) ``num_train_steps``.

  The finished run's ``final_metrics.json`` when it matches the checkpoint; otherwise (the run
  was stopped after its last checkpoint but before writing them) the restored parameters are
  evaluated and the last logged train metrics are read back, and the file is written.
  """
  previous = _read_json(os.path.join(workdir, "final_metrics.json"))
  checksum = checkpointing.checksum(state["params"])
  if (isinstance(previous, dict) and previous.get("step") == step and not previous.get("preempted")
      and previous.get("params_checksum") == checksum):
    return {**previous, "already_finished": True}
  train_metrics = metrics_lib.last_scalars(os.path.join(workdir, "tensorboard"), "train/")
  summary = {"step": step, "last_loss": train_metrics.get("loss"), "train": train_metrics,
             "eval": evaluate(eval_fn, state["params"], source, config, spec, batch_sh),
             "preempted": False, "params_checksum": checksum,
             "processes": jax.process_count(), "devices": jax.device_count()}
  if is_main:
    _write_json(os.path.join(workdir, "final_metrics.json"), summary)
  return {**summary, "already_finished": True}
