"""Synthetic tasks: determinism by (seed, step), the structure each task promises, bad input."""

import numpy as np
import pytest

from experiments import data
from experiments.data import synthetic

TASKS = {
    "mqar": synthetic.MQAR(vocab_size=64, seq_len=48, num_kv_pairs=6),
    "passkey": synthetic.Passkey(seq_len=40, passkey_len=3),
    "selective_copy": synthetic.SelectiveCopy(vocab_size=12, seq_len=40, num_tokens=6),
}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_by_seed_and_step(name):
  task = TASKS[name]
  a, b = task.batch(3, 7, 16), task.batch(3, 7, 16)
  for k in ("inputs", "targets", "weights"):
    np.testing.assert_array_equal(a[k], b[k])
  assert a["inputs"].dtype == np.int32 and a["weights"].dtype == np.float32
  assert a["inputs"].shape == a["targets"].shape == a["weights"].shape == (16, task.seq_len)
  assert a["inputs"].min() >= 0 and a["inputs"].max() < task.vocab_size
  assert not np.array_equal(a["inputs"], task.batch(3, 8, 16)["inputs"])
  assert not np.array_equal(a["inputs"], task.batch(4, 7, 16)["inputs"])


def test_mqar_layout():
  task = TASKS["mqar"]
  n, half = task.num_kv_pairs, task.vocab_size // 2
  b = task.batch(0, 0, 64)
  for x, y, w in zip(b["inputs"], b["targets"], b["weights"]):
    keys, values = x[0:2 * n:2], x[1:2 * n:2]
    assert len(set(keys.tolist())) == n and keys.min() >= 1 and keys.max() < half
    assert values.min() >= half
    pairs = dict(zip(keys.tolist(), values.tolist()))
    scored = np.flatnonzero(w)
    assert len(scored) == n and scored.min() >= 2 * n and np.all((scored - 2 * n) % 2 == 0)
    # Each key is queried exactly once and the target is its value.
    assert sorted(x[scored].tolist()) == sorted(keys.tolist())
    for pos in scored:
      assert y[pos] == pairs[x[pos]]


def test_mqar_gaps_follow_a_power_law():
  task = synthetic.MQAR(vocab_size=64, seq_len=128, num_kv_pairs=4)
  w = task.batch(0, 0, 2000)["weights"]
  gaps = (np.nonzero(w)[1] - 2 * task.num_kv_pairs) // 2
  counts = np.bincount(gaps, minlength=(task.seq_len - 2 * task.num_kv_pairs) // 2)
  # p(g) ~ (g + 1)^(a - 1) with a = 0.01: the first gap is chosen far more often than the last.
  assert counts[0] > 5 * counts[-1] and counts[:5].sum() > counts[-5:].sum()


def test_passkey_answer_is_the_needle():
  task = TASKS["passkey"]
  b = task.batch(1, 2, 32)
  k = task.passkey_len
  for x, y, w in zip(b["inputs"], b["targets"], b["weights"]):
    marker = int(np.flatnonzero(x == task.marker)[0])
    needle = x[marker + 1:marker + 1 + k]
    scored = np.flatnonzero(w)
    assert x[scored[0]] == task.query
    np.testing.assert_array_equal(y[scored], needle)
    assert np.all(needle >= task.digit0)


def test_selective_copy_answer_is_the_data_in_order():
  task = TASKS["selective_copy"]
  b = task.batch(0, 5, 32)
  k = task.num_tokens
  region = task.seq_len - k - 1
  for x, y, w in zip(b["inputs"], b["targets"], b["weights"]):
    data_tokens = x[:region][x[:region] >= 2]
    assert len(data_tokens) == k and x[region] == 1
    np.testing.assert_array_equal(y[np.flatnonzero(w)], data_tokens)


def test_synthetic_source_train_and_eval_streams_differ():
  src = data.make_source({"name": "mqar", "vocab_size": 32, "seq_len": 16, "num_kv_pairs": 2}, seed=0)
  train, evals = src.batch("train", 0, 8), src.batch("eval", 0, 8)
  assert not np.array_equal(train["inputs"], evals["inputs"])
  rows = src.rows("train", 0, 8, 2, 5)
  np.testing.assert_array_equal(rows["inputs"], train["inputs"][2:5])
  assert src.spec(8)["inputs"].shape == (8, 16)


def test_bad_arguments_name_the_field():
  with pytest.raises(ValueError, match="seq_len must be >= 4 \\* num_kv_pairs = 32, got 16"):
    synthetic.MQAR(seq_len=16, num_kv_pairs=8)
  with pytest.raises(ValueError, match="vocab_size must be even"):
    synthetic.MQAR(vocab_size=15)
  with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
    TASKS["passkey"].batch(0, 0, 0)
  with pytest.raises(ValueError, match="step must be >= 0, got -1"):
    TASKS["selective_copy"].batch(0, -1, 2)
  with pytest.raises(ValueError, match="data fields \\['bogus'\\] are not fields of task 'mqar'"):
    data.make_source({"name": "mqar", "bogus": 1}, seed=0)
  with pytest.raises(ValueError, match="data.name must be one of"):
    data.make_source({"name": "imagenet"}, seed=0)
