"""TFDS datasets read by random access from the user's ``data_dir``, without TensorFlow.

``tfds.data_source`` opens a prepared dataset stored as ArrayRecord files and decodes records
with NumPy (images with PIL), so neither reading nor the tests need TensorFlow: the
``tensorflow-datasets`` package alone (no ``tensorflow``) is a dependency. Random access is what
makes the sources stateless: batch ``i`` reads the records a keyed permutation assigns to it.

Prepare a dataset once, on a machine with network access (TFDS's download and preparation
code needs ``pip install tensorflow``)::

    tfds build lm1b --data_dir=$DATA --file_format=array_record
    tfds build cifar10 --data_dir=$DATA --file_format=array_record

Datasets:

* ``tfds_lm`` (e.g. lm1b): the text feature is encoded as UTF-8 bytes (:class:`ByteTokenizer`,
  vocabulary 258: 0 padding, 1 end of document, bytes shifted by 2), documents are packed into
  rows of ``seq_len + 1`` tokens separated by end-of-document tokens. Row ``g`` of the stream
  starts at document ``g * docs_per_row`` of the shuffled order and takes documents until it is
  full (the next rows may repeat some of them). Every position is scored.
* ``tfds_image`` (e.g. cifar10): ``image`` uint8 -> float32 in [-1, 1]; training rows are
  randomly flipped and cropped (4-pixel padding), decided by ``(seed, row)``.

Training order: record ``p`` of the stream is record ``shuffle(p mod n)`` of epoch ``p // n``, a
keyed bijection of ``0 .. n-1`` (a Feistel network with cycle walking), so no permutation of the
whole dataset is ever materialised. Eval rows are read in order.
"""

from __future__ import annotations

import numpy as np

from experiments import data as data_lib

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray, key: int) -> np.ndarray:
  """A 64-bit integer hash of ``x`` (uint64) under ``key`` (splitmix64's finaliser)."""
  with np.errstate(over="ignore"):
    z = (x + np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return z ^ (z >> np.uint64(31))


def index_shuffle(index, n: int, seed: int, rounds: int = 4) -> np.ndarray:
  """A pseudo-random permutation of ``0 .. n-1`` applied to ``index`` (array or int).

  A balanced Feistel network permutes the smallest ``2^(2h) >= n`` integers; values that land
  outside ``0 .. n-1`` are permuted again (cycle walking) until they land inside, which keeps the
  map a bijection of ``0 .. n-1``.
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  shape = np.shape(index)
  idx = np.atleast_1d(np.asarray(index, dtype=np.uint64))
  if np.any(idx >= np.uint64(n)):
    raise ValueError(f"index must be in [0, {n}), got {index}")
  half = max(1, (int(n - 1).bit_length() + 1) // 2)
  mask = np.uint64((1 << half) - 1)
  keys = [int(k) for k in np.random.default_rng([seed, 11]).integers(0, 2**62, rounds)]

  def permute(x):
    left, right = x >> np.uint64(half), x & mask
    for k in keys:
      left, right = right, left ^ (_mix(right, k) & mask)
    return (left << np.uint64(half)) | right

  out = permute(idx)
  outside = out >= np.uint64(n)
  while np.any(outside):
    out[outside] = permute(out[outside])
    outside = out >= np.uint64(n)
  return out.astype(np.int64).reshape(shape)


class ByteTokenizer:
  """UTF-8 bytes as tokens: 0 padding, 1 end of document, byte ``b`` -> ``b + 2``."""

  pad_id = 0
  eos_id = 1
  vocab_size = 258

  def encode(self, text) -> np.ndarray:
    raw = text if isinstance(text, bytes) else str(text).encode("utf-8")
    return np.frombuffer(raw, np.uint8).astype(np.int32) + 2

  def decode(self, tokens) -> str:
    tokens = np.asarray(tokens)
    return bytes((tokens[tokens >= 2] - 2).astype(np.uint8).tolist()).decode("utf-8", "replace")


def open_split(name: str, split: str, data_dir: str | None):
  """``tfds.data_source`` for a prepared ArrayRecord dataset; never downloads."""
  import tensorflow_datasets as tfds

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises several types for a missing or unusable dataset.
    raise ValueError(
        f"cannot open TFDS dataset {name!r} split {split!r} in data_dir={data_dir!r} "
        f"({type(e).__name__}: {e}). Prepare it once as ArrayRecord files: "
        f"tfds build {name.split(':')[0]} --data_dir=<data_dir> --file_format=array_record") from e


class _TFDSSource(data_lib.Source):
  def __init__(self, fields: dict, seed: int):
    self.name = fields.pop("tfds_name")
    self.data_dir = fields.pop("data_dir", None) or None
    self.train_split = fields.pop("train_split", "train")
    self.eval_split = fields.pop("eval_split", "test")
    self.seed = int(seed)
    self._splits = {"train": open_split(self.name, self.train_split, self.data_dir),
                    "eval": open_split(self.name, self.eval_split, self.data_dir)}
    for split, ds in self._splits.items():
      if len(ds) == 0:
        raise ValueError(f"TFDS dataset {self.name!r} split {split!r} is empty")

  def _record(self, split: str, stream_position: int):
    ds = self._splits[split]
    n = len(ds)
    if split == "train":
      epoch, pos = divmod(stream_position, n)
      return ds[int(index_shuffle(pos, n, self.seed + epoch))]
    return ds[stream_position % n]

  def batch(self, split, index, batch_size):
    return self.rows(split, index, batch_size, 0, batch_size)


class TFDSLanguageModel(_TFDSSource):
  """Packed byte-level language modelling on a text dataset (lm1b by default)."""

  kind = "lm"

  def __init__(self, fields: dict, seed: int):
    fields = dict(fields)
    self.seq_len = int(fields.pop("seq_len", 256))
    self.docs_per_row = int(fields.pop("docs_per_row", 1))
    self.text_key = fields.pop("text_key", "text")
    if self.seq_len < 1 or self.docs_per_row < 1:
      raise ValueError(f"seq_len and docs_per_row must be >= 1, got {self.seq_len}, {self.docs_per_row}")
    super().__init__(fields, seed)
    if fields:
      raise ValueError(f"unknown tfds_lm data fields {sorted(fields)}")
    self.tokenizer = ByteTokenizer()
    self.model_fields = {"vocab_size": self.tokenizer.vocab_size}
    self.tokens_per_example = self.seq_len

  def _row(self, split, row):
    need = self.seq_len + 1
    out = np.empty(need, np.int32)
    filled, position = 0, row * self.docs_per_row
    while filled < need:
      record = self._record(split, position)
      position += 1
      if self.text_key not in record:
        raise ValueError(f"TFDS dataset {self.name!r} has no feature {self.text_key!r}; "
                         f"features: {sorted(record)}")
      doc = np.append(self.tokenizer.encode(record[self.text_key]), self.tokenizer.eos_id)
      take = min(len(doc), need - filled)
      out[filled:filled + take] = doc[:take]
      filled += take
    return out

  def rows(self, split, index, batch_size, start, stop):
    rows = np.stack([self._row(split, index * batch_size + r) for r in range(start, stop)])
    return dict(inputs=rows[:, :-1], targets=rows[:, 1:],
                weights=np.ones((stop - start, self.seq_len), np.float32))


class TFDSImageClassification(_TFDSSource):
  """Image classification (cifar10 by default), images scaled to [-1, 1]."""

  kind = "classification"

  def __init__(self, fields: dict, seed: int):
    fields = dict(fields)
    self.image_size = tuple(int(s) for s in fields.pop("image_size", (32, 32)))
    self.channels = int(fields.pop("channels", 3))
    self.num_classes = int(fields.pop("num_classes", 10))
    self.augment = bool(fields.pop("augment", True))
    self.image_key = fields.pop("image_key", "image")
    self.label_key = fields.pop("label_key", "label")
    super().__init__(fields, seed)
    if fields:
      raise ValueError(f"unknown tfds_image data fields {sorted(fields)}")
    self.model_fields = {"image_size": self.image_size, "channels": self.channels,
                         "num_classes": self.num_classes}
    self.tokens_per_example = 1

  def _example(self, split, row):
    record = self._record(split, row)
    image = np.asarray(record[self.image_key])
    expected = self.image_size + (self.channels,)
    if image.shape != expected:
      raise ValueError(f"TFDS dataset {self.name!r}: image shape {image.shape}, expected {expected} "
                       f"(data.image_size, data.channels)")
    if split == "train" and self.augment:
      rng = np.random.default_rng([self.seed, 7, row])
      if rng.random() < 0.5:
        image = image[:, ::-1]
      padded = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect")
      dy, dx = rng.integers(0, 9, 2)
      image = padded[dy:dy + expected[0], dx:dx + expected[1]]
    return image.astype(np.float32) / 127.5 - 1.0, int(record[self.label_key])

  def rows(self, split, index, batch_size, start, stop):
    examples = [self._example(split, index * batch_size + r) for r in range(start, stop)]
    return dict(images=np.stack([e[0] for e in examples]),
                labels=np.asarray([e[1] for e in examples], np.int32))

  def num_eval_batches(self, batch_size):
    return max(1, len(self._splits["eval"]) // batch_size)


def make(kind: str, fields: dict, seed: int) -> data_lib.Source:
  if "tfds_name" not in fields:
    raise ValueError(f"data.name={kind!r} needs data.tfds_name (e.g. 'lm1b' or 'cifar10')")
  if kind == "tfds_lm":
    return TFDSLanguageModel(fields, seed)
  return TFDSImageClassification(fields, seed)
