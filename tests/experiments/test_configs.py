"""Config files: each loads, documents its command and cost, and takes --config.X overrides;
the mechanism registry joins the benchmark by registration."""

import pathlib
import re

import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

import attn_jax
from attn_jax import layers
from experiments import builders
from experiments import data
from experiments import mechanisms

CONFIGS = sorted(p for p in (pathlib.Path(__file__).resolve().parents[2] / "experiments" / "configs").glob("*.py")
                 if p.name not in ("__init__.py", "base.py"))


def _parse(path, *overrides):
  """Parses a command line as experiments.train does (its own FlagValues and argv)."""
  argv = ["prog", f"--config={path}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_documents_its_command_and_cost(path):
  text = path.read_text()
  doc = re.match(r'^"""(.*?)"""', text, re.S)
  assert doc, f"{path.name} must start with a docstring"
  assert f"python -m experiments.train --config=experiments/configs/{path.name}" in doc.group(1)
  assert re.search(r"about \d+ (s|min)", doc.group(1)), "the docstring must give the expected cost"
  config = _parse(path)
  assert config.num_train_steps > 0 and config.model.mechanism in mechanisms.names()


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.stem.startswith(("lm1b", "cifar10"))],
                         ids=lambda p: p.stem)
def test_synthetic_configs_build_their_model(path):
  config = _parse(path, "--config.model.dim=32", "--config.model.num_layers=1")
  source = data.make_source(config.data, config.seed)
  model = nnx.eval_shape(builders.model_factory(config, source))
  assert model.config.dim == 32 and len(model.blocks) == 1


def test_overrides_and_errors():
  path = [p for p in CONFIGS if p.stem == "mqar"][0]
  config = _parse(path, "--config.model.dim=96", "--config.model.mechanism=sliding_window",
                  "--config.optimizer.learning_rate=0.003", "--config.data.seq_len=128")
  assert config.model.dim == 96 and config.optimizer.learning_rate == 0.003
  schedule = builders.mixer_schedule(config.model, 128)
  assert schedule.window == 32 and schedule.causal
  config = _parse(path, "--config.model.window=8", "--config.model.mechanism=sliding_window")
  assert builders.mixer_schedule(config.model, 64).window == 8
  with pytest.raises(flags.IllegalFlagValueError):
    _parse(path, "--config.model.dim=wide")
  with pytest.raises(Exception, match="nonexistent"):
    _parse(path, "--config.model.nonexistent=1")
  config = _parse(path, "--config.model.mechanism=nope")
  with pytest.raises(ValueError, match="mechanism must be one of .* got 'nope'"):
    builders.mixer_schedule(config.model, 64)


def test_registry_availability_follows_the_primitives(monkeypatch):
  monkeypatch.delattr(attn_jax, "linear_attention", raising=False)
  assert "linear" in mechanisms.names() and "linear" not in mechanisms.available()
  with pytest.raises(ValueError, match="needs attn_jax.linear_attention"):
    mechanisms.schedule("linear", layers.AttentionConfig(), 64)
  monkeypatch.setattr(attn_jax, "linear_attention", lambda *a, **k: None, raising=False)
  assert "linear" in mechanisms.available(default_only=True)
  for name in ("linear_decay", "linear_window"):
    assert name in mechanisms.available() and name not in mechanisms.available(default_only=True)
  assert {"softmax", "sliding_window"} <= set(mechanisms.available(default_only=True))


def test_registering_a_mechanism(monkeypatch):
  monkeypatch.setattr(mechanisms, "_REGISTRY", dict(mechanisms._REGISTRY))
  mechanisms.register(mechanisms.Entry("tiny_window", lambda base, n: base.replace(window=3)))
  assert "tiny_window" in mechanisms.available(default_only=True)
  assert mechanisms.schedule("tiny_window", layers.AttentionConfig(), 64).window == 3
  with pytest.raises(ValueError, match="entry must be an experiments.mechanisms.Entry"):
    mechanisms.register("tiny_window")
