"""The mixer registry: every entry decodes exactly and trains; typed configs and their errors; the
protocol's extension points (auxiliary losses, extra inputs, a mixer registered from outside)."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn_jax
from attn_jax import dispatch
from attn_jax import layers
from attn_jax import masks
from attn_jax import models
from attn_jax.layers import registry
from tests import tolerances

REQUIRED = ("softmax", "neighborhood", "short_conv", "linear", "lightning", "based", "jrt", "retnet",
            "lightnet", "aaren", "gla")
PROMPT, NEW = 8, 5


# Blocks, spans and budgets smaller than the test sequences (13 tokens), so that the content-
# dependent sparse mixers select among several blocks rather than degenerate to dense attention.
# Recycled Attention recycles the whole cache here (its decoding is then exact); its own test
# compares sparser decoding with its oracle.
TINY = dict(block_topk=dict(block_size=4, top_k=1), hyper=dict(block_size=4, sample_size=4),
            landmark=dict(block_size=4), power=dict(block_size=2), routing=dict(num_clusters=2),
            superlinear=dict(span_size=4, top_k=1), dynamic_mask=dict(block_size=4),
            core_context=dict(group_size=2, local_window=4), dhsa=dict(chunk_size=4, budget=4, block_q=4, block_kv=4),
            recycled=dict(stride=2, top_k=PROMPT + NEW))


def _tiny_lm(name, **fields):
  """A 1-layer, width-32 LM of mixer ``name`` (2 heads; a window shorter than the test sequence)."""
  fields = dict(num_heads=2, **TINY.get(name, {}), **fields)
  if "window" in registry.get(name).fields and "window" not in fields:
    fields["window"] = 4
  return models.lm.tiny(num_layers=1, schedule=layers.mixer_config(name, **fields))


def test_registry_has_every_mechanism_built_so_far():
  assert set(REQUIRED) <= set(layers.mixer_names())
  for name in layers.mixer_names():
    entry = layers.mixer_entry(name)
    assert entry.description and entry.paper and entry.config.__dataclass_params__.frozen
    assert layers.mixer_config(name).mixer == name


def test_every_module_of_the_mixers_package_is_a_registered_mechanism():
  import pkgutil
  from attn_jax.layers import mixers
  modules = {m.name for m in pkgutil.iter_modules(mixers.__path__)} - {"common"}
  registered = {registry.get(n).layer.__module__.rsplit(".", 1)[1] for n in layers.mixer_names()}
  assert modules == registered


DECODING = tuple(n for n in layers.mixer_names() if layers.mixer_entry(n).cache is not None)


@pytest.mark.parametrize("name", sorted(set(layers.mixer_names()) - set(DECODING)))
def test_mixers_without_a_cache_say_they_do_not_decode(name):
  # An entry without a cache says so in its description, and generation names it with a reason.
  assert "no decoding" in layers.mixer_entry(name).description
  model = models.DecoderLM(_tiny_lm(name), rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match=f"mixer '{name}' does not decode( yet)?[:(]? .+"):
    models.generate(model, jnp.zeros((1, PROMPT), jnp.int32), max_new_tokens=1)


@pytest.mark.parametrize("name", DECODING)
def test_generate_with_cache_equals_full_recomputation(name):
  cfg = _tiny_lm(name)
  model = models.DecoderLM(cfg, rngs=nnx.Rngs(0))
  prompt = jax.random.randint(jax.random.PRNGKey(1), (2, PROMPT), 0, cfg.vocab_size)
  tokens, logits, cache = models.generate(model, prompt, max_new_tokens=NEW, return_logits=True,
                                          return_cache=True)
  full = jax.jit(lambda t: model(t))(jnp.concatenate([prompt, tokens[:, :-1]], axis=1))
  tolerances.assert_close(logits, full[:, PROMPT - 1:], jnp.float32, f"{name}: decode vs full")
  assert isinstance(cache[0], layers.mixer_entry(name).cache)


@pytest.mark.parametrize("name", layers.mixer_names())
def test_tiny_lm_trains_one_step(name):
  cfg = _tiny_lm(name)
  model = models.DecoderLM(cfg, rngs=nnx.Rngs(0))
  # Non-parameter state (Routing's EMA centroids) is traced with the parameters, as in
  # models.train, so that a mixer may update it inside the step (flax refuses to mutate a
  # variable from an outer trace).
  graphdef, params, state = nnx.split(model, nnx.Param, ...)
  batch = {"tokens": jax.random.randint(jax.random.PRNGKey(2), (2, 13), 0, cfg.vocab_size)}

  @jax.jit
  def step(params):
    loss, (grads, _) = jax.value_and_grad(lambda ps: nnx.merge(graphdef, *ps).loss(batch))((params, state))
    return loss, grads, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

  loss, grads, new_params = step(params)
  assert np.isfinite(float(loss)) and float(loss) > 0
  mixer_grads = grads["blocks"][0]["mixer"]
  leaves = jax.tree_util.tree_leaves_with_path(mixer_grads)
  assert leaves, f"{name}: the mixer has no parameters"
  for path, g in leaves:
    g = np.asarray(g)
    # Finite, and every mixer parameter takes part (a zero gradient would be a dead branch).
    assert np.isfinite(g).all() and np.abs(g).max() > 0, f"{name}{jax.tree_util.keystr(path)}"
  assert np.isfinite(float(step(new_params)[0]))


@pytest.mark.parametrize("name", layers.mixer_names())
def test_every_parameter_has_logical_axes_for_sharding(name):
  """The model zoo's sharding rules place a mixer's parameters by their logical axis names, so
  every parameter names one per dimension, and per-head projections split over heads."""
  layer = nnx.eval_shape(lambda: layers.build_mixer(layers.mixer_config(name, num_heads=4), 32, rngs=nnx.Rngs(0)))
  heads_split = 0
  for path, param in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
    axes = param.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == len(param.get_value().shape), (name, path, axes)
    heads_split += "heads" in axes or "kv_heads" in axes or "mlp" in axes
  assert heads_split >= 2, name


def test_mixer_config_errors_name_the_mechanism_and_its_fields():
  with pytest.raises(ValueError, match=r"mixer must be one of \[.*'softmax'.*\], got 'flash9'"):
    layers.mixer_config("flash9")
  with pytest.raises(ValueError, match=re.escape("mixer 'based' has no field(s) ['windw']; its fields are "
                                                 "['feature_dim', 'window', 'conv_size', 'chunk_size']")):
    layers.mixer_config("based", windw=8)
  with pytest.raises(ValueError, match=r"mixer 'linear' has no field\(s\) \['window'\]"):
    layers.mixer_config("linear").replace(window=8)
  with pytest.raises(ValueError, match=r"mixer 'gla': is causal only"):
    layers.mixer_config("gla", causal=False)
  cfg = layers.mixer_config("softmax", window=8)
  assert isinstance(cfg, layers.SoftmaxConfig) and cfg.window == 8 and cfg.mixer == "softmax"
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.window = 4
  assert hash(cfg) == hash(layers.SoftmaxConfig(window=8)) and cfg == layers.SoftmaxConfig(window=8)
  # Per-axis lists become tuples: configs stay hashable (jit caches on them).
  assert layers.mixer_config("neighborhood", kernel_size=[3, 3]).kernel_size == (3, 3)


@pytest.mark.parametrize("name,fields,match", [
    ("softmax", dict(num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
    ("softmax", dict(window=0), "window must be a positive int"),
    ("softmax", dict(rolling_cache=True), "rolling_cache=True needs a causal sliding window"),
    ("softmax", dict(rope_in_cache="relative"), "rope_in_cache must be one of"),
    ("softmax", dict(causal=False, chunk_size=4), "needs causal=True"),
    ("softmax", dict(mask="causal"), "mask must be an attn_jax.masks.Mask"),
    ("softmax", dict(shard_map=True, mask=masks.from_fn(lambda q, k, h: k <= q + h)), "must not depend on the head"),
    ("softmax", dict(rope=4), "rope must be 0, 1, 2 or 3"),
    ("short_conv", dict(causal=False), "causal convolution"),
    ("linear", dict(decay="slow"), "decay must be one of"),
    ("linear", dict(feature_map=3), "feature_map must be a name or a function"),
    ("neighborhood", dict(kernel_size=0), "kernel_size must be a positive int"),
    ("neighborhood", dict(num_heads=4, num_kv_heads=2), "num_kv_heads must be None or num_heads"),
    ("lightning", dict(version=3), "version must be 1 or 2"),
    ("based", dict(feature_dim=0), "feature_dim must be a positive int"),
    ("gla", dict(expand_k=0.0), "expand_k must be a positive float"),
])
def test_invalid_values_fail_when_the_config_is_made(name, fields, match):
  with pytest.raises(layers.UnsupportedConfigError, match=f"mixer '{name}': .*{match}"):
    layers.mixer_config(name, **fields)


def test_head_dim_and_rope_fail_at_construction():
  with pytest.raises(layers.UnsupportedConfigError, match="divisible by 2 \\* rope = 4"):
    layers.build_mixer(layers.mixer_config("softmax", rope=2, head_dim=6), 32, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="schedule\\[1\\] must be a mixer config"):
    layers.expand_schedule((layers.mixer_config("softmax"), {"mixer": "softmax"}), 2)


@pytest.mark.parametrize("name,primitive", [("linear", "linear_attention"), ("based", "linear_attention"),
                                            ("neighborhood", "neighborhood_attention")])
def test_missing_primitive_fails_at_model_construction(monkeypatch, name, primitive):
  monkeypatch.delattr(attn_jax, primitive, raising=False)
  cfg = models.lm.tiny(schedule=(layers.mixer_config(name, num_heads=4), layers.mixer_config("softmax")))
  with pytest.raises(layers.UnsupportedConfigError,
                     match=f"mixer '{name}' needs attn_jax.{primitive}, which this installation lacks"):
    models.DecoderLM(cfg, rngs=nnx.Rngs(0))


def test_backend_that_cannot_run_here_fails_at_construction(monkeypatch):
  with pytest.raises(layers.UnsupportedConfigError,
                     match="implementation='pallas_nope' is not available in this installation"):
    models.DecoderLM(models.lm.tiny(schedule=layers.mixer_config("softmax", implementation="pallas_nope")),
                     rngs=nnx.Rngs(0))
  with pytest.raises(layers.UnsupportedConfigError, match="mixer 'aaren': implementation='xla' is not available"):
    registry.check(layers.mixer_config("aaren", implementation="xla"))
  # A GPU kernel on a TPU host (registered here as a stand-in: the platform rule is the registry's).
  monkeypatch.setitem(dispatch._REGISTRY.setdefault("softmax", {}), "pallas_gpu", lambda *a, **k: None)
  cfg = layers.mixer_config("softmax", implementation="pallas_gpu")
  with pytest.raises(layers.UnsupportedConfigError, match="cannot run on platform 'tpu'"):
    registry.check(cfg, platform="tpu")
  registry.check(cfg, platform="gpu")
  registry.check(cfg, platform="cpu")  # interpret mode
  assert "pallas_gpu" not in layers.mixer_entry("softmax").backends_here("tpu")
  # cuDNN has no interpret mode: it needs the GPU.
  cfg = layers.mixer_config("softmax", implementation="cudnn")
  for platform in ("cpu", "tpu"):
    with pytest.raises(layers.UnsupportedConfigError, match="implementation='cudnn' needs an NVIDIA GPU"):
      registry.check(cfg, platform=platform)
    assert "cudnn" not in layers.mixer_entry("softmax").backends_here(platform)
  registry.check(cfg, platform="gpu")
  assert "cudnn" in layers.mixer_entry("softmax").backends_here("gpu")


def test_removed_flat_config_says_what_replaced_it():
  with pytest.raises(AttributeError, match=r"AttentionConfig no longer exists: .*mixer_config\('softmax'"):
    layers.AttentionConfig  # noqa: B018
  with pytest.raises(AttributeError, match="replaced by the mixer registry"):
    layers.mechanisms  # noqa: B018


def test_cli_fields_are_the_mechanisms_own_typed_fields():
  assert registry.cli_fields("softmax")["window"] is int
  assert "mask" not in registry.cli_fields("softmax")  # set from Python only
  assert registry.cli_fields("neighborhood")["kernel_size"] is object  # an int or a tuple literal
  for name in layers.mixer_names():
    assert not set(registry.cli_fields(name)) & set(registry.SHARED_FIELDS)


# A mixer defined outside the package, as the next mechanisms will be: it uses an extra per-token
# input (a gate per token) and returns an auxiliary loss, and joins through one registration.


@dataclasses.dataclass(frozen=True, kw_only=True)
class _GatedIdentityConfig(registry.MixerConfig):
  aux_weight: float = 0.5


@dataclasses.dataclass(frozen=True, kw_only=True)
class _OtherConfig(registry.MixerConfig):
  pass


class _GatedIdentity(nnx.Module):
  def __init__(self, config, dim, *, rngs, dtype, param_dtype, layer_index=0, num_layers=1):
    self.config = config
    self.layer_index = layer_index
    self.w = layers.Dense(dim, dim, in_axes=("embed",), out_axes=("embed",), rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype)

  def __call__(self, x, *, positions, token_gate=None, **unused):
    y = self.w(x) if token_gate is None else self.w(x) * token_gate[..., None]
    return layers.MixerOutput(y, {"toy": self.config.aux_weight * jnp.mean(y.astype(jnp.float32) ** 2)})

  def init_cache(self, batch, max_len, dtype):
    raise ValueError("no decoding")


@pytest.fixture
def toy_mixer():
  registry.register(registry.MixerEntry(
      name="toy", config=_GatedIdentityConfig, layer=_GatedIdentity, family=None, cache=None,
      description="test mixer", paper="-",
      quality=(registry.QualityPreset("toy_q"),), efficiency=(registry.EfficiencyPreset("toy_e"),)))
  yield
  registry.unregister("toy")


def test_a_mixer_registered_elsewhere_joins_models_with_aux_losses_and_inputs(toy_mixer):
  assert "toy" in layers.mixer_names()
  cfg = models.lm.tiny(num_layers=3, schedule=(layers.mixer_config("toy", aux_weight=2.0),
                                               layers.mixer_config("softmax", num_heads=4)))
  model = models.DecoderLM(cfg, rngs=nnx.Rngs(0))
  assert [b.mixer.layer_index for b in model.blocks if isinstance(b.mixer, _GatedIdentity)] == [0, 2]
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 6), 0, cfg.vocab_size)

  @jax.jit
  def run(tokens, gate):
    logits, aux = model(tokens[:, :-1], return_aux=True)
    gated = model(tokens[:, :-1], token_gate=gate)
    return logits, aux, model.loss({"tokens": tokens}), gated

  logits, aux, loss, gated = run(tokens, jnp.zeros((2, 5)))
  assert set(aux) == {"toy"} and float(aux["toy"]) > 0
  # The loss adds the auxiliary losses of both toy layers (summed under one name) to the
  # cross-entropy.
  ce = jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
  np.testing.assert_allclose(loss, ce + aux["toy"], rtol=1e-5)
  # Extra inputs reach the mixers that take them; the others ignore them.
  assert not np.allclose(gated, logits)
  with pytest.raises(ValueError, match="config AarenConfig already belongs to another entry"):
    registry.register(dataclasses.replace(registry.get("toy"), name="toy2", config=layers.AarenConfig))
  with pytest.raises(ValueError, match="quality preset name 'toy_q' is already used"):
    registry.register(dataclasses.replace(registry.get("toy"), name="toy2", config=_OtherConfig))
  with pytest.raises(ValueError, match="already registered"):
    registry.register(registry.get("toy"))


def test_readme_table_is_the_registry():
  import pathlib
  readme = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "models.md").read_text()
  table = re.search(r"<!-- mixer-table -->\n(.*?)\n<!-- /mixer-table -->", readme, re.S)
  assert table, "docs/models.md must hold the registry table between <!-- mixer-table --> markers"
  assert table.group(1).strip() == registry.markdown_table().strip(), (
      "The mixer table of docs/models.md is out of date: paste attn_jax.layers.registry.markdown_table()")
