"""Synthetic sequence tasks, generated locally and deterministic by seed.

Every task maps ``(seed, step)`` to one batch with a fresh ``numpy`` generator seeded by both,
so a batch depends on nothing but its step: resuming at step ``s`` reproduces exactly the
batches an uninterrupted run would have seen, with no iterator state to save, and every
process of a multi-process run generates the same global batch.

A batch is a dict of ``int32`` arrays in the language-model layout of the trainer:

* ``inputs [B, T]``: the tokens the model reads;
* ``targets [B, T]``: the token expected at each position (the next token);
* ``weights [B, T]``: ``float32``, 1 where the position is scored, 0 elsewhere.

Tasks:

* :class:`MQAR`: multi-query associative recall in the Zoology setting (Arora et al. 2023, used
  by Based and JRT): ``N`` key-value pairs, then the keys again at power-law distributed gaps;
  the model must emit each key's value right after the key.
* :class:`Passkey`: needle in a haystack: a passkey of a few digits hidden at a random depth in
  filler text, asked for at the end (Mohtashami and Jaggi 2023).
* :class:`SelectiveCopy`: Mamba's selective copying: ``K`` data tokens scattered among noise
  tokens must be reproduced, in order, after a separator.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def _rng(seed: int, step: int, salt: int) -> np.random.Generator:
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  return np.random.default_rng([seed, salt, step])


def _check_positive(name, value):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def _as_batch(inputs, targets, weights):
  return dict(inputs=inputs.astype(np.int32), targets=targets.astype(np.int32),
              weights=weights.astype(np.float32))


@dataclasses.dataclass(frozen=True)
class MQAR:
  """Multi-query associative recall (Zoology's ``multiquery_ar``).

  Layout of one sequence of ``seq_len`` tokens: ``k_1 v_1 k_2 v_2 ... k_N v_N`` (the context,
  ``2N`` tokens), then a query region where each of the ``N`` keys appears once, at position
  ``2N + 2 g`` for a gap index ``g`` drawn without replacement from ``p(g) ~ (g + 1)^(a - 1)``
  (a power law: most queries come soon after the context, some far away). The target at a
  query's position is the key's value; every other position is unscored. Keys come from the
  lower half of the vocabulary (token 0 excluded), values from the upper half; keys are distinct
  within a sequence. Non-query positions of the query region hold random tokens
  (``random_non_queries``), so position alone tells the model nothing.

  Attributes:
    vocab_size: even, at least ``2 * (num_kv_pairs + 1)``.
    seq_len: at least ``4 * num_kv_pairs`` (the query region must fit ``N`` queries 2 apart).
    num_kv_pairs: ``N``.
    power_a: the power-law exponent ``a`` (Zoology: 0.01).
  """

  vocab_size: int = 128
  seq_len: int = 64
  num_kv_pairs: int = 8
  power_a: float = 0.01
  random_non_queries: bool = True

  def __post_init__(self):
    _check_positive("vocab_size", self.vocab_size)
    _check_positive("seq_len", self.seq_len)
    _check_positive("num_kv_pairs", self.num_kv_pairs)
    n = self.num_kv_pairs
    if self.vocab_size % 2 or self.vocab_size // 2 - 1 < n:
      raise ValueError(f"vocab_size must be even with vocab_size // 2 - 1 >= num_kv_pairs ({n}) "
                       f"distinct keys, got {self.vocab_size}")
    if self.seq_len < 4 * n:
      raise ValueError(f"seq_len must be >= 4 * num_kv_pairs = {4 * n}, got {self.seq_len}")
    if not 0 < self.power_a <= 1:
      raise ValueError(f"power_a must be in (0, 1], got {self.power_a}")

  def batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
    _check_positive("batch_size", batch_size)
    rng = _rng(seed, step, 1)
    n, t, half = self.num_kv_pairs, self.seq_len, self.vocab_size // 2
    # Distinct keys per row: the first n of a random permutation of 1 .. half-1.
    keys = np.argsort(rng.random((batch_size, half - 1)), axis=1)[:, :n] + 1        # [B, N]
    values = rng.integers(half, self.vocab_size, (batch_size, n))                    # [B, N]
    space = (t - 2 * n) // 2
    p = np.arange(1, space + 1, dtype=np.float64) ** (self.power_a - 1)
    p /= p.sum()
    # Gumbel top-k draws n gap indices without replacement with probabilities p, for all rows
    # at once.
    gaps = np.argsort(-(np.log(p) + rng.gumbel(size=(batch_size, space))), axis=1)[:, :n]
    if self.random_non_queries:
      inputs = rng.integers(0, self.vocab_size, (batch_size, t))
    else:
      inputs = np.zeros((batch_size, t), np.int64)
    inputs[:, 0:2 * n:2] = keys
    inputs[:, 1:2 * n:2] = values
    rows = np.arange(batch_size)[:, None]
    query_pos = 2 * n + 2 * gaps                                                     # [B, N]
    inputs[rows, query_pos] = keys
    targets = np.zeros((batch_size, t), np.int64)
    weights = np.zeros((batch_size, t), np.float32)
    targets[rows, query_pos] = values
    weights[rows, query_pos] = 1.0
    # Unscored positions still get a well-defined target (the next input token).
    unscored = weights == 0
    targets[:, :-1][unscored[:, :-1]] = inputs[:, 1:][unscored[:, :-1]]
    return _as_batch(inputs, targets, weights)


@dataclasses.dataclass(frozen=True)
class Passkey:
  """Passkey retrieval / needle in a haystack.

  Tokens: a haystack of filler text (the tokens ``1 .. num_filler`` repeated from a random
  phase), a *marker* token before the passkey, ``passkey_len`` digit tokens, and at the end a *query* token
  after which the model must emit the digits. The needle sits at a uniformly random depth of
  the haystack. Only the answer digits are scored.

  Vocabulary: filler ``1 .. num_filler``, marker ``num_filler + 1``, query
  ``num_filler + 2``, digits ``num_filler + 3 .. num_filler + 12``.
  """

  seq_len: int = 128
  passkey_len: int = 4
  num_filler: int = 8

  def __post_init__(self):
    _check_positive("seq_len", self.seq_len)
    _check_positive("passkey_len", self.passkey_len)
    _check_positive("num_filler", self.num_filler)
    if self.seq_len < 3 * self.passkey_len + 4:
      raise ValueError(f"seq_len must be >= 3 * passkey_len + 4 = {3 * self.passkey_len + 4}, "
                       f"got {self.seq_len}")

  @property
  def vocab_size(self) -> int:
    return self.num_filler + 13

  @property
  def marker(self) -> int:
    return self.num_filler + 1

  @property
  def query(self) -> int:
    return self.num_filler + 2

  @property
  def digit0(self) -> int:
    return self.num_filler + 3

  def batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
    _check_positive("batch_size", batch_size)
    rng = _rng(seed, step, 2)
    t, k = self.seq_len, self.passkey_len
    # The haystack is filler text with a random phase, so the needle's position cannot be read
    # off the filler pattern.
    phase = rng.integers(0, self.num_filler, (batch_size, 1))
    inputs = (np.arange(t)[None] + phase) % self.num_filler + 1
    digits = rng.integers(0, 10, (batch_size, k)) + self.digit0
    answer_start = t - k - 1                   # the query token sits just before the answer
    inputs[:, answer_start] = self.query
    haystack = answer_start - (k + 1)          # room for marker + digits before the query
    depth = rng.integers(0, haystack + 1, batch_size)
    rows = np.arange(batch_size)[:, None]
    inputs[rows[:, 0], depth] = self.marker
    inputs[rows, depth[:, None] + 1 + np.arange(k)] = digits
    inputs[rows, answer_start + 1 + np.arange(k)] = digits
    targets = np.zeros_like(inputs)
    targets[:, :-1] = inputs[:, 1:]
    weights = np.zeros((batch_size, t), np.float32)
    # Positions answer_start .. answer_start + k - 1 predict the k digits.
    weights[:, answer_start:answer_start + k] = 1.0
    return _as_batch(inputs, targets, weights)


@dataclasses.dataclass(frozen=True)
class SelectiveCopy:
  """Selective copying (Gu and Dao 2023, Mamba section 3.1).

  ``num_tokens`` data tokens placed at random positions of a noise region (token 0) that fills
  the first ``seq_len - num_tokens - 1`` positions, then a separator and ``num_tokens`` answer positions
  where the data tokens must be reproduced in order. Vocabulary: noise 0, separator 1, data
  ``2 .. vocab_size - 1``.
  """

  vocab_size: int = 16
  seq_len: int = 64
  num_tokens: int = 8

  def __post_init__(self):
    _check_positive("vocab_size", self.vocab_size)
    _check_positive("seq_len", self.seq_len)
    _check_positive("num_tokens", self.num_tokens)
    if self.vocab_size < 3:
      raise ValueError(f"vocab_size must be >= 3 (noise, separator, data), got {self.vocab_size}")
    if self.seq_len < 3 * self.num_tokens + 1:
      raise ValueError(f"seq_len must be >= 3 * num_tokens + 1 = {3 * self.num_tokens + 1}, "
                       f"got {self.seq_len}")

  def batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
    _check_positive("batch_size", batch_size)
    rng = _rng(seed, step, 3)
    t, k = self.seq_len, self.num_tokens
    region = t - k - 1
    data = rng.integers(2, self.vocab_size, (batch_size, k))
    pos = np.sort(np.argsort(rng.random((batch_size, region)), axis=1)[:, :k], axis=1)
    inputs = np.zeros((batch_size, t), np.int64)
    rows = np.arange(batch_size)[:, None]
    inputs[rows, pos] = data
    inputs[:, region] = 1
    inputs[:, region + 1:] = data[:, :k]
    targets = np.zeros_like(inputs)
    targets[:, :-1] = inputs[:, 1:]
    weights = np.zeros((batch_size, t), np.float32)
    # The separator predicts the first data token, each answer position the next one; the last
    # answer position has nothing left to predict.
    weights[:, region:region + k] = 1.0
    return _as_batch(inputs, targets, weights)
