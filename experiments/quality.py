"""The benchmark's quality suite: MQAR recall accuracy vs model width and recurrent state size.

For every quality preset of the mixer registry (:func:`attn_jax.layers.registry.quality_presets`:
an entry's name, e.g. ``based``, or a named variant, e.g. ``sliding_window``) and every model
width, a small decoder LM (``experiments/configs/mqar.py``: 2 layers, 1 head) is trained from
scratch on multi-query associative recall (Zoology's setting,
:class:`experiments.data.synthetic.MQAR`) and evaluated on held-out sequences. Reported per cell:

* ``accuracy``: the fraction of queries whose value the model predicts (argmax) correctly;
* ``state_floats``: the size of the model's decoding state for one sequence of the task's
  length, in numbers: its key/value cache for softmax attention (all positions; ``window`` slots
  for a sliding window), its recurrent state for linear attention, its convolution window for a
  short convolution, all three for Based. Zoology and Based plot recall against this quantity: a
  mechanism can only recall what its state holds.

Each cell is one run of :func:`experiments.trainer.train`, so any cell can be reproduced with
``python -m experiments.train --config=experiments/configs/mqar.py`` and the overrides recorded
in the results (``overrides``).
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import numpy as np
from flax import nnx

from attn_jax.layers import registry
from experiments import builders
from experiments import data as data_lib
from experiments import trainer
from experiments.configs import mqar as mqar_config


@dataclasses.dataclass(frozen=True)
class Settings:
  """Task and training budget of the suite (defaults: the embedded CPU default; :meth:`zoology`:
  Zoology / Based's setting, for an accelerator).

  ``learning_rates`` empty: one run per cell at :func:`default_learning_rate`; otherwise a sweep
  whose best run (by eval accuracy) is reported, as Zoology does.
  """

  widths: tuple[int, ...] = (16, 32, 64)
  steps: int = 400
  batch_size: int = 32
  seq_len: int = 64
  num_kv_pairs: int = 8
  vocab_size: int = 128
  num_layers: int = 2
  num_heads: int = 1
  learning_rates: tuple[float, ...] = ()
  eval_batches: int = 8
  seed: int = 0
  implementation: str = ""

  @classmethod
  def zoology(cls, **changes) -> "Settings":
    """Zoology / Based's MQAR setting: widths 64 to 512, 256 tokens, 64 key-value pairs,
    vocabulary 8192, 2 layers, learning rates swept over ``logspace(-4, -2, 4)`` with the best
    kept. Zoology trains on 100k fixed examples for up to 64 epochs with batch 256; here every
    step draws a fresh batch of 256, 20k steps (5.1M sequences)."""
    return dataclasses.replace(
        cls(widths=(64, 128, 256, 512), steps=20_000, batch_size=256, seq_len=256, num_kv_pairs=64,
            vocab_size=8192, learning_rates=(1e-4, 4.6e-4, 2.2e-3, 1e-2), eval_batches=12), **changes)

  @property
  def task(self) -> registry.Task:
    """What quality presets adapt to: the sequence length and the context (the key-value pairs)."""
    return registry.Task(seq_len=self.seq_len, prefix_len=2 * self.num_kv_pairs)


SETTINGS = {"cpu": Settings(), "zoology": Settings.zoology()}


def default_learning_rate(width: int) -> float:
  """1e-2 up to width 64, then ``1e-2 * (64 / width)^1.5`` (wider models need smaller steps)."""
  return 1e-2 * min(1.0, (64 / width) ** 1.5)


def default_presets() -> tuple[str, ...]:
  """The quality presets of the CPU default (``default=True``) whose mixers can run here."""
  return tuple(n for n, (e, p) in registry.quality_presets().items() if p.default and e.is_available)


def preset_overrides(preset: str, settings: Settings) -> dict:
  """The ``--config.model.*`` overrides that select quality preset ``preset`` for ``settings``."""
  presets = registry.quality_presets()
  if preset not in presets:
    raise ValueError(f"quality preset must be one of {sorted(presets)}, got {preset!r}")
  entry, p = presets[preset]
  fields = p.fields(settings.task)
  cli = registry.cli_fields(entry.name)
  bad = sorted(set(fields) - set(cli))
  if bad:
    raise ValueError(f"quality preset {preset!r} sets {bad}, which a command line cannot set (its fields "
                     f"must be among {sorted(cli)} so that every cell can be rerun with experiments.train)")
  out = {"model.mixer": entry.name}
  out.update({f"model.mixer_fields.{entry.name}.{k}": v for k, v in fields.items()})
  return out


def cell_overrides(settings: Settings, preset: str, width: int, learning_rate: float) -> dict:
  """The ``--config.X=value`` overrides of ``configs/mqar.py`` that give one cell."""
  return {
      "seed": settings.seed,
      "data.vocab_size": settings.vocab_size,
      "data.seq_len": settings.seq_len,
      "data.num_kv_pairs": settings.num_kv_pairs,
      "batch_size": settings.batch_size,
      "num_train_steps": settings.steps,
      "log_every": max(1, settings.steps // 8),
      "eval_steps": settings.eval_batches,
      **preset_overrides(preset, settings),
      "model.dim": width,
      "model.mlp_dim": 2 * width,
      "model.num_layers": settings.num_layers,
      "model.num_heads": settings.num_heads,
      "model.implementation": settings.implementation,
      "optimizer.learning_rate": learning_rate,
      "optimizer.warmup_steps": max(1, settings.steps // 10),
      "checkpoint.every": 0,
  }


def make_config(overrides: dict):
  config = mqar_config.get_config()
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def state_floats(config) -> int:
  """Numbers in the decoding state of ``config``'s model for one sequence (see module doc)."""
  source = data_lib.make_source(config.data, config.seed)
  make_model = builders.model_factory(config, source)
  cache = jax.eval_shape(lambda: make_model().init_cache(1, source.tokens_per_example))
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(cache)
                 if np.issubdtype(x.dtype, np.floating)))


def parameter_count(config) -> int:
  source = data_lib.make_source(config.data, config.seed)
  model = nnx.eval_shape(builders.model_factory(config, source))
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def run_cell(settings: Settings, mechanism: str, width: int, *, show_progress: bool = False) -> dict:
  """Trains and evaluates one (quality preset ``mechanism``, width) cell; a failure is recorded,
  not raised."""
  lrs = settings.learning_rates or (default_learning_rate(width),)
  record = dict(mechanism=mechanism, mixer=registry.quality_presets()[mechanism][0].name, width=width)
  runs = []
  for lr in lrs:
    overrides = cell_overrides(settings, mechanism, width, lr)
    config = make_config(overrides)
    start = time.perf_counter()
    try:
      summary = trainer.train(config, None, show_progress=show_progress,
                              desc=f"{mechanism} d={width} lr={lr:.2g}", leave_progress=False)
    except Exception as e:  # A mechanism that cannot train here is reported, not fatal.
      runs.append(dict(learning_rate=lr, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
      continue
    runs.append(dict(learning_rate=lr, accuracy=summary["eval"]["accuracy"], loss=summary["eval"]["loss"],
                     train_seconds=time.perf_counter() - start, overrides=overrides))
  good = [r for r in runs if "error" not in r]
  if not good:
    record.update(error=runs[-1]["error"], runs=runs)
    return record
  best = max(good, key=lambda r: r["accuracy"])
  config = make_config(best["overrides"])
  record.update(best)
  try:
    state = state_floats(config)
  except Exception as e:  # A mechanism without a decoding cache still has an accuracy.
    state = None
    record["state_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  record.update(state_floats=state, params=parameter_count(config), runs=runs)
  return record
