"""Data sources for the trainer: synthetic tasks (offline) and TFDS datasets (from a data_dir).

Every source is *stateless*: batch ``i`` of a split is a pure function of ``(seed, i)``, so the
data position of a run is its step, a resumed run reads exactly the batches it would have read,
and each process of a multi-process run loads only the rows its devices hold (see
:meth:`Source.rows`). Two kinds of batch exist:

* ``"lm"``: ``inputs [B, T]`` and ``targets [B, T]`` int32 (the next token), ``weights [B, T]``
  float32 (1 where a position is scored);
* ``"classification"``: ``images [B, H, W, C]`` float32 and ``labels [B]`` int32.

:func:`make_source` builds the source a config's ``data`` section names.
"""

from __future__ import annotations

import jax
import numpy as np

from experiments.data import synthetic

SYNTHETIC = {"mqar": synthetic.MQAR, "passkey": synthetic.Passkey,
             "selective_copy": synthetic.SelectiveCopy}
TFDS_KINDS = ("tfds_lm", "tfds_image")

# Eval batches of synthetic tasks come from a disjoint seed stream.
_EVAL_SEED_OFFSET = 1_000_003


class Source:
  """Base class: subclasses implement :meth:`batch` (and may implement :meth:`rows`).

  Attributes:
    kind: ``"lm"`` or ``"classification"``.
    model_fields: what the model needs to know about the data (``vocab_size``; or
      ``image_size``, ``channels``, ``num_classes``).
    tokens_per_example: tokens one example feeds the model (1 for images: throughput is then
      in examples per second).
  """

  kind: str = "lm"
  model_fields: dict = {}
  tokens_per_example: int = 1

  def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
    """Batch ``index`` of ``split`` (``"train"`` or ``"eval"``), the global batch."""
    raise NotImplementedError

  def rows(self, split: str, index: int, batch_size: int, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows ``start:stop`` of :meth:`batch`; sources with random access read only those rows."""
    return {k: v[start:stop] for k, v in self.batch(split, index, batch_size).items()}

  def spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a batch of ``batch_size`` rows."""
    one = self.rows("train", 0, batch_size, 0, 1)
    return {k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype) for k, v in one.items()}

  def num_eval_batches(self, batch_size: int) -> int | None:
    """How many distinct eval batches exist (``None``: unlimited, e.g. generated)."""
    del batch_size
    return None


class SyntheticSource(Source):
  """A task of :mod:`experiments.data.synthetic`; eval batches use a disjoint seed."""

  kind = "lm"

  def __init__(self, task, seed: int):
    self.task = task
    self.seed = int(seed)
    self.model_fields = {"vocab_size": int(task.vocab_size)}
    self.tokens_per_example = int(task.seq_len)

  def batch(self, split, index, batch_size):
    if split not in ("train", "eval"):
      raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    seed = self.seed if split == "train" else self.seed + _EVAL_SEED_OFFSET
    return self.task.batch(seed, index, batch_size)


def make_source(data_config, seed: int) -> Source:
  """The source described by a config's ``data`` section.

  ``data_config.name`` is a synthetic task (``mqar``, ``passkey``, ``selective_copy``; the other
  fields are the task's dataclass fields) or ``tfds_lm`` / ``tfds_image`` (see
  :mod:`experiments.data.tfds_sources`).
  """
  fields = dict(data_config)
  name = fields.pop("name", None)
  if name in SYNTHETIC:
    cls = SYNTHETIC[name]
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f"data fields {unknown} are not fields of task {name!r}; known: {sorted(known)}")
    return SyntheticSource(cls(**fields), seed)
  if name in TFDS_KINDS:
    from experiments.data import tfds_sources
    return tfds_sources.make(name, fields, seed)
  raise ValueError(f"data.name must be one of {sorted(SYNTHETIC) + list(TFDS_KINDS)}, got {name!r}")
