"""The TFDS path on datasets the test writes itself (ArrayRecord files, no download, no
TensorFlow): lm1b-like text and cifar10-like images read through ``tfds.data_source``."""

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from experiments import data
from experiments.configs import cifar10_vit
from experiments.configs import lm1b
from experiments.data import tfds_sources

SENTENCES = [f"sentence {i}: " + "abc " * (i % 5 + 1) for i in range(24)]

with tfds.core.registered.skip_registration():

  class _Lm1b(tfds.core.GeneratorBasedBuilder):
    """lm1b's name, version and features, with a few sentences."""

    name = "lm1b"
    VERSION = tfds.core.Version("1.1.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(SENTENCES), "test": self._generate_examples(SENTENCES[:6])}

    def _generate_examples(self, sentences):
      for i, s in enumerate(sentences):
        yield i, {"text": s}

  class _Cifar10(tfds.core.GeneratorBasedBuilder):
    """cifar10's name, version and features, with random images whose label is their mean
    brightness bucket (so a check can tie labels to pixels)."""

    name = "cifar10"
    VERSION = tfds.core.Version("3.0.2")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "id": tfds.features.Text(), "image": tfds.features.Image(shape=(32, 32, 3)),
          "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(40, 0), "test": self._generate_examples(12, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        label = i % 10
        image = np.full((32, 32, 3), 20 * label, np.uint8) + rng.integers(0, 10, (32, 32, 3), dtype=np.uint8)
        yield i, {"id": str(i), "image": PIL.Image.fromarray(image), "label": label}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  for builder in (_Lm1b, _Cifar10):
    builder(data_dir=str(path), file_format="array_record").download_and_prepare()
  return str(path)


def test_index_shuffle_is_a_keyed_bijection():
  for n in (1, 2, 7, 100, 1000):
    out = tfds_sources.index_shuffle(np.arange(n), n, seed=3)
    assert sorted(out.tolist()) == list(range(n))
  a = tfds_sources.index_shuffle(np.arange(1000), 1000, seed=3)
  assert not np.array_equal(a, np.arange(1000))
  assert not np.array_equal(a, tfds_sources.index_shuffle(np.arange(1000), 1000, seed=4))
  with pytest.raises(ValueError, match="index must be in \\[0, 10\\)"):
    tfds_sources.index_shuffle(10, 10, seed=0)


def test_lm1b_rows_are_packed_byte_tokens(data_dir):
  cfg = lm1b.get_config().data
  cfg.data_dir, cfg.seq_len, cfg.docs_per_row = data_dir, 40, 1
  src = data.make_source(cfg, seed=0)
  assert src.kind == "lm" and src.model_fields == {"vocab_size": 258}
  b = src.batch("train", 2, 4)
  assert b["inputs"].shape == (4, 40) and b["inputs"].dtype == np.int32
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  assert np.all(b["weights"] == 1)
  # Row g starts with the record that the epoch's permutation puts at position g (records are
  # stored in TFDS's own order, so the test reads them back through tfds too).
  train = tfds.data_source("lm1b", split="train", data_dir=data_dir, download=False)
  first = train[int(tfds_sources.index_shuffle(2 * 4 + 1, len(SENTENCES), seed=0))]["text"].decode()
  assert first in SENTENCES
  text = src.tokenizer.decode(b["inputs"][1])
  assert text.startswith(first[:20])
  np.testing.assert_array_equal(src.rows("train", 2, 4, 1, 3)["inputs"], b["inputs"][1:3])
  np.testing.assert_array_equal(src.batch("train", 2, 4)["inputs"], b["inputs"])
  # Eval rows are in record order, from the test split.
  test = tfds.data_source("lm1b", split="test", data_dir=data_dir, download=False)
  assert src.tokenizer.decode(src.batch("eval", 0, 2)["inputs"][0]).startswith(test[0]["text"].decode()[:12])


def test_cifar10_rows_are_scaled_images_with_their_labels(data_dir):
  cfg = cifar10_vit.get_config().data
  cfg.data_dir = data_dir
  src = data.make_source(cfg, seed=0)
  assert src.kind == "classification" and src.num_eval_batches(4) == 3
  b = src.batch("eval", 1, 4)
  assert b["images"].shape == (4, 32, 32, 3) and b["images"].dtype == np.float32
  assert -1 <= b["images"].min() and b["images"].max() <= 1
  # Labels follow brightness in the written data, flipped and cropped or not.
  brightness = ((b["images"] + 1) * 127.5).mean(axis=(1, 2, 3))
  np.testing.assert_array_equal(np.round((brightness - 4.5) / 20).astype(int), b["labels"])
  t = src.batch("train", 3, 8)
  brightness = ((t["images"] + 1) * 127.5).mean(axis=(1, 2, 3))
  np.testing.assert_array_equal(np.round((brightness - 4.5) / 20).astype(int), t["labels"])
  np.testing.assert_array_equal(src.batch("train", 3, 8)["images"], t["images"])


def test_trainer_runs_on_both_tfds_datasets(data_dir):
  from experiments import trainer

  c = cifar10_vit.get_config()
  c.data.data_dir = data_dir
  c.batch_size, c.num_train_steps, c.eval_steps = 4, 2, 1
  c.model.dim, c.model.num_layers, c.model.mlp_dim, c.model.num_heads = 16, 1, 32, 2
  c.model.patch_size = 8
  summary = trainer.train(c, None, show_progress=False)
  assert summary["step"] == 2 and np.isfinite(summary["eval"]["loss"])

  c = lm1b.get_config()
  c.data.data_dir, c.data.seq_len = data_dir, 16
  c.batch_size, c.num_train_steps, c.eval_steps = 4, 2, 1
  c.model.dim, c.model.num_layers, c.model.mlp_dim, c.model.num_heads, c.model.num_kv_heads = 16, 1, 32, 2, 1
  c.model.dtype = "float32"
  summary = trainer.train(c, None, show_progress=False)
  assert summary["step"] == 2 and np.isfinite(summary["eval"]["loss"])


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(ValueError, match="tfds build cifar10 --data_dir=<data_dir> --file_format=array_record"):
    data.make_source({"name": "tfds_image", "tfds_name": "cifar10", "data_dir": str(tmp_path)}, seed=0)
