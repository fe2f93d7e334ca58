"""Training metrics: TensorBoard event files, a JSON-lines log, and a progress display.

TensorBoard files are written with ``tensorboardX`` (no TensorFlow needed); ``metrics.jsonl``
holds the same scalars, one JSON object per write, for scripts and tests. Only process 0 of a
multi-process run writes. ``logdir`` may be a ``gs://`` path (with ``google-cloud-storage`` and
``gcsfs`` installed, as ``launch/tpu_pod.sh`` does); cloud objects cannot be appended to, so
there ``metrics.jsonl`` is rewritten at most once a minute and at the end.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import tqdm
from etils import epath


def _step_of(line: str):
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def last_scalars(logdir: str, prefix: str) -> dict:
  """The last ``metrics.jsonl`` record holding ``prefix`` scalars, without the prefix ({} if none)."""
  path = epath.Path(logdir) / "metrics.jsonl"
  if not path.exists():
    return {}
  for line in reversed(path.read_text().splitlines()):
    try:
      record = json.loads(line)
    except ValueError:
      continue
    found = {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}
    if found:
      return found
  return {}


class Writer:
  """Scalars to ``<logdir>/events.out.tfevents.*`` and ``<logdir>/metrics.jsonl``.

  ``logdir=None`` or ``enabled=False`` writes nothing (benchmark runs, processes other than 0).
  ``resume_step``: the step a run restarts from (0 for a fresh start). Lines of
  ``metrics.jsonl`` logged after it, by a run killed before its next checkpoint, are dropped,
  and TensorBoard is told to hide the events after it (``purge_step``): the resumed run logs
  those steps again, so each step appears once.
  """

  def __init__(self, logdir: str | None, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled and logdir is not None
    self._tb = None
    self._jsonl = None
    self._lines = []
    self._remote = logdir is not None and "://" in str(logdir)
    self._written = 0.0
    if not self.enabled:
      return
    epath.Path(logdir).mkdir(parents=True, exist_ok=True)
    self._jsonl = epath.Path(logdir) / "metrics.jsonl"
    if self._jsonl.exists():
      lines = self._jsonl.read_text().splitlines(keepends=True)
      if resume_step is not None:
        kept = [line for line in lines if (_step_of(line) or 0) <= resume_step]
        if len(kept) != len(lines):
          self._rewrite(kept)
        lines = kept
      if self._remote:
        self._lines = lines
    try:
      import tensorboardX
    except ImportError:
      print("metrics: tensorboardX is not installed (pip install tensorboardX, part of the "
            "'experiments' extra); writing metrics.jsonl only", file=sys.stderr)
    else:
      purge = None if resume_step is None else resume_step + 1
      self._tb = tensorboardX.SummaryWriter(logdir, flush_secs=10, purge_step=purge)

  def _rewrite(self, lines) -> None:
    text = "".join(lines)
    if self._remote:
      self._jsonl.write_text(text)
      return
    # Locally, readers never see a half-written file.
    tmp = self._jsonl.with_name(self._jsonl.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, self._jsonl)

  def scalars(self, step: int, values: dict, prefix: str = "") -> None:
    if not self.enabled:
      return
    values = {f"{prefix}{k}": float(v) for k, v in values.items()}
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)
    line = json.dumps({"step": int(step), **values}) + "\n"
    if not self._remote:
      with self._jsonl.open("a") as f:
        f.write(line)
      return
    self._lines.append(line)
    if time.monotonic() - self._written > 60:
      self._flush_remote()

  def _flush_remote(self):
    self._jsonl.write_text("".join(self._lines))
    self._written = time.monotonic()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None and self._remote:
      self._flush_remote()
    self._tb = self._jsonl = None


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
  """Steps/s, tokens/s and ETA: a tqdm bar on a terminal, plain log lines otherwise.

  Rates are measured between calls of :meth:`update` that carry metrics (the trainer's log
  steps), so they exclude compilation once the first log interval has passed.
  """

  def __init__(self, start_step: int, total_steps: int, tokens_per_step: int, *, enabled: bool = True,
               desc: str = "train", leave: bool = True, interactive: bool | None = None):
    self.total = total_steps
    self.tokens_per_step = tokens_per_step
    self.enabled = enabled
    self.interactive = sys.stderr.isatty() if interactive is None else interactive
    self._last_step, self._last_time = start_step, time.perf_counter()
    self._bar = None
    if enabled and self.interactive:
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
                            leave=leave, dynamic_ncols=True)

  def update(self, step: int, values: dict | None = None) -> dict:
    """Advance to ``step`` (completed steps); with ``values``, report them and return rates."""
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
    if values is None:
      return {}
    now = time.perf_counter()
    steps = step - self._last_step
    elapsed = max(now - self._last_time, 1e-9)
    rates = {"steps_per_sec": steps / elapsed, "tokens_per_sec": steps * self.tokens_per_step / elapsed}
    self._last_step, self._last_time = step, now
    if not self.enabled:
      return rates
    eta = (self.total - step) / rates["steps_per_sec"] if rates["steps_per_sec"] > 0 else math.inf
    shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
    if self._bar is not None:
      self._bar.set_postfix_str(f"{shown} | {rates['tokens_per_sec']:.3g} tok/s")
    else:
      print(f"step {step}/{self.total} {shown} | {rates['steps_per_sec']:.3g} steps/s "
            f"{rates['tokens_per_sec']:.3g} tok/s | ETA {_duration(eta)}", flush=True)
    return rates

  def write(self, message: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(message)
    else:
      print(message, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
