"""Config files: each loads, documents its command and cost, and takes --config.X overrides; a
mixer and its own fields are selected by name from the registry."""

import pathlib
import re

import pytest
from absl import flags
from flax import nnx

from attn_jax import layers
from experiments import builders
from experiments import compat
from experiments import data
from tests.experiments import helpers

CONFIGS = sorted(p for p in (pathlib.Path(__file__).resolve().parents[2] / "experiments" / "configs").glob("*.py")
                 if p.name not in ("__init__.py", "base.py"))
MQAR = [p for p in CONFIGS if p.stem == "mqar"][0]
_parse = helpers.parse_config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_documents_its_command_and_cost(path):
  text = path.read_text()
  doc = re.match(r'^"""(.*?)"""', text, re.S)
  assert doc, f"{path.name} must start with a docstring"
  assert f"python -m experiments.train --config=experiments/configs/{path.name}" in doc.group(1)
  assert re.search(r"about \d+ (s|min)", doc.group(1)), "the docstring must give the expected cost"
  config = _parse(path)
  assert config.num_train_steps > 0 and config.model.mixer in layers.mixer_names()
  # Every command in the docstring parses.
  for cmd in re.findall(r"python -m experiments\.train (.*?)(?:\n\n|$)", doc.group(1), re.S):
    args = [a for a in cmd.replace("\\\n", " ").split() if a.startswith("--config.")]
    _parse(path, *[a.replace("$DATA", "/data") for a in args])


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.stem.startswith(("lm1b", "cifar10"))],
                         ids=lambda p: p.stem)
def test_synthetic_configs_build_their_model(path):
  config = _parse(path, "--config.model.dim=32", "--config.model.num_layers=1")
  source = data.make_source(config.data, config.seed)
  model = nnx.eval_shape(builders.model_factory(config, source))
  assert model.config.dim == 32 and len(model.blocks) == 1


def test_every_mixer_and_its_fields_are_selectable_on_the_command_line():
  config = _parse(MQAR, "--config.model.mixer=based", "--config.model.mixer_fields.based.window=64",
                  "--config.model.mixer_fields.based.feature_dim=8", "--config.model.num_heads=2")
  schedule = builders.mixer_schedule(config.model)
  assert isinstance(schedule, layers.BasedConfig)
  assert (schedule.window, schedule.feature_dim, schedule.conv_size, schedule.num_heads) == (64, 8, 3, 2)
  assert schedule.causal
  for name in layers.mixer_names():
    assert set(config.model.mixer_fields[name]) == set(layers.registry.cli_fields(name))
    assert isinstance(builders.mixer_schedule(_parse(MQAR, f"--config.model.mixer={name}").model),
                      layers.mixer_entry(name).config)
  # Typed: tuples for per-axis sizes, bools, strings.
  config = _parse(MQAR, "--config.model.mixer=neighborhood", "--config.model.mixer_fields.neighborhood.kernel_size=(3,)",
                  "--config.model.mixer_fields.linear.decay=data", "--config.model.mixer_fields.softmax.learned_sinks=true")
  assert builders.mixer_schedule(config.model).kernel_size == (3,)
  assert config.model.mixer_fields.linear.decay == "data" and config.model.mixer_fields.softmax.learned_sinks is True
  with pytest.raises(flags.IllegalFlagValueError):
    _parse(MQAR, "--config.model.mixer_fields.softmax.window=wide")
  with pytest.raises(AttributeError, match='Did you mean "window"'):
    _parse(MQAR, "--config.model.mixer_fields.softmax.windw=8")


def test_hybrids_cycle_named_mixers():
  config = _parse(MQAR, "--config.model.mixer=short_conv, softmax", "--config.model.mixer_fields.softmax.window=8",
                  "--config.model.mixer_fields.short_conv.conv_size=3")
  conv, attn = builders.mixer_schedule(config.model)
  assert (conv.mixer, conv.conv_size, attn.mixer, attn.window) == ("short_conv", 3, "softmax", 8)


def test_overrides_and_errors():
  config = _parse(MQAR, "--config.model.dim=96", "--config.optimizer.learning_rate=0.003",
                  "--config.data.seq_len=128")
  assert config.model.dim == 96 and config.optimizer.learning_rate == 0.003
  schedule = builders.mixer_schedule(config.model)
  assert isinstance(schedule, layers.SoftmaxConfig) and schedule.window is None and schedule.causal
  with pytest.raises(flags.IllegalFlagValueError):
    _parse(MQAR, "--config.model.dim=wide")
  with pytest.raises(Exception, match="nonexistent"):
    _parse(MQAR, "--config.model.nonexistent=1")
  with pytest.raises(ValueError, match="mixer must be one of .* got 'nope'"):
    builders.mixer_schedule(_parse(MQAR, "--config.model.mixer=nope").model)
  with pytest.raises(ValueError, match="mixer 'based': window must be a positive int"):
    builders.mixer_schedule(_parse(MQAR, "--config.model.mixer=based",
                                   "--config.model.mixer_fields.based.window=0").model)
  with pytest.raises(ValueError, match="model.mixer must be a mixer name or names joined by commas"):
    builders.mixer_schedule(_parse(MQAR, "--config.model.mixer=softmax,,linear").model)


def test_removed_flags_are_explained():
  message = compat.scan_argv(["--config=x.py", "--config.model.mechanism=sliding_window_sinks"])
  assert "--config.model.mixer=softmax --config.model.mixer_fields.softmax.window=<max(4, seq_len // 4)> " \
         "--config.model.mixer_fields.softmax.num_sink_tokens=4" in message
  assert "window=12" in compat.scan_argv(["--config.model.window=12"])
  assert compat.scan_argv(["--config.model.mixer=softmax"]) is None
  # Every old name maps to flags the new command line accepts.
  for old in ("softmax", "sliding_window", "sliding_window_sinks", "chunked", "conv_window", "linear",
              "linear_decay", "linear_window", "neighborhood"):
    flags_ = compat.legacy_flags(old, seq_len=64)
    builders.mixer_schedule(_parse(MQAR, *flags_).model)


def test_every_quality_preset_builds_its_cell():
  """The quality suite can run any entry: each preset's cell parses as experiments.train would
  (its overrides are command-line flags), builds its model and sizes its decoding state."""
  from attn_jax.layers import registry
  from experiments import quality
  settings = quality.Settings(seq_len=32, num_kv_pairs=4, vocab_size=32)
  presets = registry.quality_presets()
  assert set(layers.mixer_names()) <= set(presets) and "based_f8" in quality.default_presets()
  for name, (entry, _) in presets.items():
    overrides = quality.cell_overrides(settings, name, 16, 1e-2)
    config = _parse(MQAR, *[f"--config.{k}={v}" for k, v in overrides.items()])
    assert config.model.mixer == entry.name
    model = nnx.eval_shape(builders.model_factory(config, data.make_source(config.data, config.seed)))
    assert isinstance(model.blocks[0].mixer, entry.layer)
    if entry.cache is not None:
      assert quality.state_floats(config) > 0, name
    else:  # No decoding form (issue 14's sparse mixers): the suite records the reason instead.
      with pytest.raises(NotImplementedError, match=f"mixer '{entry.name}' does not decode"):
        quality.state_floats(config)
  with pytest.raises(ValueError, match="quality preset must be one of"):
    quality.preset_overrides("nope", settings)


def test_zoology_setting_is_the_papers_mqar():
  """--mqar_setting=zoology: Zoology / Based's MQAR (widths 64-512, 256 tokens, 64 key-value
  pairs, vocabulary 8192), whose cells build (the run itself needs an accelerator)."""
  from experiments import quality
  z = quality.SETTINGS["zoology"]
  assert (z.widths, z.seq_len, z.num_kv_pairs, z.vocab_size, z.num_layers) == ((64, 128, 256, 512), 256, 64, 8192, 2)
  assert len(z.learning_rates) == 4 and min(z.learning_rates) == 1e-4 and max(z.learning_rates) == 1e-2
  overrides = quality.cell_overrides(z, "based", 512, z.learning_rates[0])
  config = _parse(MQAR, *[f"--config.{k}={v}" for k, v in overrides.items()])
  source = data.make_source(config.data, config.seed)
  assert source.tokens_per_example == 256 and source.model_fields["vocab_size"] == 8192
  model = nnx.eval_shape(builders.model_factory(config, source))
  assert model.config.dim == 512 and isinstance(model.blocks[0].mixer, layers.BasedAttention)
