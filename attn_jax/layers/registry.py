"""The registry of token mixers: one entry per mechanism, read by models, experiments and the benchmark.

A *token mixer* is the sequence-mixing sublayer of a block (softmax attention, a linear
recurrence, a convolution, ...). Each mechanism is one module of :mod:`attn_jax.layers.mixers`
that declares, next to its code, a :class:`MixerEntry`:

* ``config``: a frozen dataclass deriving from :class:`MixerConfig`, with the fields every mixer
  shares (heads, KV heads, head dim, causality, RoPE, backend) plus this mechanism's own fields
  and nothing else. :func:`mixer_config` builds one by name; ``config.replace(...)`` changes it.
  Values are checked in ``__post_init__``, so an invalid config never exists.
* ``layer``: the ``flax.nnx`` module implementing the mixer protocol below.
* ``family``: the :mod:`attn_jax.dispatch` family whose backends ``implementation=`` names
  (None: the mixer calls no dispatched primitive).
* ``cache``: the class of the decoding cache ``init_cache`` returns (None: no decoding).
* ``description``, ``paper``: one line each, for ``--list`` and the table of docs/models.md.
* ``quality`` / ``efficiency``: the benchmark's presets (:class:`QualityPreset`,
  :class:`EfficiencyPreset`).

The mixer protocol (every ``layer`` implements it)::

    layer = Layer(config, dim, *, rngs, dtype, param_dtype, layer_index=0, num_layers=1)

    y = layer(x, *, positions, segment_ids=None, grid=None, **inputs)
        # Training and full recomputation. x, y: [B, T, dim].
        # positions: [B, T] int token positions (or [B, T, n] grid coordinates for n-D RoPE;
        #   a batch of 1 broadcasts). segment_ids: [B, T] int document ids of packed sequences
        #   (state, convolutions and attention must not cross a change of id) or None.
        # grid: the token grid of a ViT (prod(grid) == T, row-major) or None (a sequence).
        # **inputs: any further per-token inputs a model passes (e.g. modality ids); a mixer
        #   ignores the ones it does not know, so new inputs never touch existing mixers.
        # Returns y, or MixerOutput(y, aux_losses) to add auxiliary training losses (e.g. a
        #   mixture-of-heads load-balancing loss): {name: float32 scalar}, already weighted;
        #   the models sum them over layers into their training loss.

    cache = layer.init_cache(batch, max_len, dtype)
        # The empty decoding cache for sequences of up to max_len tokens: any pytree (the
        # caches of attn_jax.layers.cache or the mixer's own registered dataclass), an instance
        # of entry.cache. Raises ValueError if this config cannot decode (non-causal, ...), and
        # NotImplementedError naming the mechanism if it does not decode yet (entry.cache None).

    y, cache = layer.prefill(x, cache, **inputs)
        # The prompt x [B, T, dim] at positions 0 .. T-1 into an empty cache.

    y, cache = layer.decode(x, cache, *, position, **inputs)
        # One token x [B, 1, dim] at `position` (a traced int32 scalar shared by the batch).
        # **inputs of prefill / decode: per-token inputs for those tokens, when the model has
        #   them (models.generate passes none today: a mixer that needs some while decoding
        #   extends generate and the models' prefill / decode to forward them).

  Contract (tested for every entry): prefill followed by decode steps gives the outputs of the
  full call on the whole sequence (up to float tolerance); a causal mixer's output at t does not
  depend on tokens after t (JRT's prefix, read twice, is the documented exception). ``layer_index`` / ``num_layers`` tell the layer its depth (Lightning
  scales its decays by it). Parameters are ``nnx.Param`` with logical axis names
  (:mod:`attn_jax.layers.nn`), so the model zoo's sharding rules place them.

Adding a mechanism: write ``attn_jax/layers/mixers/<name>.py`` with its config, layer and a
``registry.register(MixerEntry(...))`` call; the package imports every module of
``attn_jax/layers/mixers/`` (docs/models.md: "Adding a mechanism").
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

import attn_jax
from attn_jax import dispatch


class UnsupportedConfigError(ValueError):
  """A mixer config that is invalid, or that cannot run here (missing primitive, backend, platform)."""


class MixerOutput(NamedTuple):
  """What a mixer's training call may return instead of ``y``: ``y`` and auxiliary losses."""

  y: jax.Array
  aux_losses: dict


def split_output(out) -> tuple[jax.Array, dict]:
  """``(y, aux_losses)`` of a mixer's training call (``{}`` when it returned ``y`` alone)."""
  if isinstance(out, MixerOutput):
    return out.y, dict(out.aux_losses)
  return out, {}


def add_losses(total: dict, new: dict) -> dict:
  """Sums auxiliary losses by name (the models' reduction over layers)."""
  out = dict(total)
  for name, value in new.items():
    out[name] = out[name] + value if name in out else value
  return out


def _entry_of_type(cls) -> "MixerEntry":
  for entry in _REGISTRY.values():
    if entry.config is cls:
      return entry
  raise UnsupportedConfigError(f"{cls.__name__} is not the config of a registered mixer")


def _positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixerConfig:
  """The fields every mixer shares. Subclasses add their mechanism's own fields.

  Attributes:
    num_heads: query heads.
    num_kv_heads: key/value heads (GQA / MQA); None means ``num_heads``. Mixers without grouped
      heads require None or ``num_heads``.
    head_dim: per-head width; None means ``dim // num_heads``.
    causal: token ``t`` sees tokens ``<= t`` only (decoders) or all tokens (encoders, ViT).
    rope: RoPE axes: 0 (none), 1 (sequence), 2 or 3 (per-axis RoPE on token grids). Read by the
      mixers whose entry has ``uses_rope``; the others ignore it.
    rope_theta: RoPE base wavelength.
    implementation: backend of the entry's primitive family (None: the platform's default).
  """

  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int | None = None
  causal: bool = True
  rope: int = 1
  rope_theta: float = 10000.0
  implementation: str | None = None

  def __post_init__(self):
    self.validate()

  @property
  def mixer(self) -> str:
    """The registry name of this config's mechanism."""
    return _entry_of_type(type(self)).name

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  def head_dim_for(self, dim: int) -> int:
    return dim // self.num_heads if self.head_dim is None else self.head_dim

  def replace(self, **changes) -> "MixerConfig":
    """A copy with ``changes``; an unknown field is a ValueError naming the valid ones."""
    _check_field_names(type(self), changes)
    return dataclasses.replace(self, **changes)

  def shared(self) -> dict:
    """The shared fields (heads, head dim, causality, RoPE, backend) as a dict."""
    return {name: getattr(self, name) for name in SHARED_FIELDS}

  def with_mixer(self, name: str, **fields) -> "MixerConfig":
    """The config of mechanism ``name`` with this config's shared fields, and ``fields``."""
    return mixer_config(name, **{**self.shared(), **fields})

  def error(self, message: str) -> UnsupportedConfigError:
    """An :class:`UnsupportedConfigError` prefixed with this config's mechanism."""
    try:
      name = self.mixer
    except UnsupportedConfigError:
      name = type(self).__name__
    return UnsupportedConfigError(f"mixer {name!r}: {message}")

  def check_positive(self, *names: str, allow_none: bool = True) -> None:
    for name in names:
      value = getattr(self, name)
      if value is None and allow_none:
        continue
      if not _positive_int(value):
        raise self.error(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")

  def check_no_grouped_heads(self) -> None:
    """For mixers whose keys and values have as many heads as the queries."""
    if self.kv_heads != self.num_heads:
      raise self.error(f"num_kv_heads must be None or num_heads ({self.num_heads}), got {self.num_kv_heads}")

  def check_causal_only(self) -> None:
    if self.causal is not True:
      raise self.error("is causal only: set causal=True")

  def validate(self) -> None:
    """Checks the field values; subclasses call ``super().validate()`` and add their own."""
    self.check_positive("num_heads", allow_none=False)
    self.check_positive("num_kv_heads", "head_dim")
    if self.num_heads % self.kv_heads:
      raise self.error(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.kv_heads})")
    if not isinstance(self.causal, bool):
      raise self.error(f"causal must be a bool, got {self.causal!r}")
    if self.rope not in (0, 1, 2, 3) or isinstance(self.rope, bool):
      raise self.error(f"rope must be 0, 1, 2 or 3 (RoPE axes), got {self.rope!r}")
    if not isinstance(self.rope_theta, (int, float)) or isinstance(self.rope_theta, bool) or self.rope_theta <= 0:
      raise self.error(f"rope_theta must be a positive float, got {self.rope_theta!r}")
    if self.implementation is not None and not isinstance(self.implementation, str):
      raise self.error(f"implementation must be a backend name or None, got {self.implementation!r}")


SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(MixerConfig))


@dataclasses.dataclass(frozen=True)
class Task:
  """What a quality preset may adapt to: the benchmark task's shape.

  Attributes:
    seq_len: tokens per sequence.
    prefix_len: tokens of context before the first query (MQAR: the key-value pairs), 0 if none.
  """

  seq_len: int
  prefix_len: int = 0


@dataclasses.dataclass(frozen=True)
class QualityPreset:
  """A named way to run the entry in the quality suite (MQAR).

  Attributes:
    name: the suite's row label and ``--quality_mechanisms`` name (unique over the registry).
    fields: ``Task -> {field: value}``, the entry's own fields for that task.
    default: part of the suite's CPU default (keep these cheap).
    description: one line.
    min_heads: the fewest attention heads the preset runs with; the suite uses
      ``max(its num_heads, min_heads)`` (MoH routes among heads, so one head cannot run it).
  """

  name: str
  fields: Callable[[Task], dict] = lambda task: {}
  default: bool = False
  description: str = ""
  min_heads: int = 1


@dataclasses.dataclass(frozen=True)
class EfficiencyPreset:
  """A named way to time the entry's layer in the efficiency suite (CAB patterns).

  Attributes:
    name: row label and ``--mechanisms`` name (unique over the registry).
    fields: the entry's fields (``implementation`` included) as ``((name, value), ...)``.
    patterns: the CAB patterns it has a form for. Cross patterns need the entry's
      ``cross_layer``; self patterns run ``layer``, non-causal ones with ``causal=False``.
    default: part of the suite's default list.
    quality: the quality preset whose MQAR accuracy stands for this one in the benchmark's
      recommendation (None: its quality is not measured).

  The dense baseline that efficiency lengths are measured against is not a preset: it is
  ``jax.nn.dot_product_attention`` (:data:`experiments.efficiency.BASELINE`).
  """

  name: str
  fields: tuple[tuple[str, Any], ...] = ()
  patterns: tuple[str, ...] = ("noncausal_self", "causal_self")
  default: bool = True
  quality: str | None = None


@dataclasses.dataclass(frozen=True)
class MixerEntry:
  """One mechanism of the registry (see the module docstring for each field's role).

  Attributes:
    name: registry key.
    config: the :class:`MixerConfig` subclass of the mechanism.
    layer: the nnx layer (mixer protocol).
    family: :mod:`attn_jax.dispatch` family that ``implementation=`` selects backends of.
    cache: class of the decoding cache (None: the mechanism does not decode).
    description: one line: what it computes.
    paper: one line: the paper (authors, year, title or arXiv id).
    requires: names that must exist on ``attn_jax`` (the primitives the layer calls).
    uses_rope: the layer applies ``config.rope``.
    cross_layer: an nnx layer for cross attention to an encoder memory (encoder-decoders), built
      as ``cross_layer(config, dim, rngs=..., memory_dim=..., dtype=..., param_dtype=...)``.
    quality, efficiency: benchmark presets.
    check: ``(config, platform) -> None``, raising :class:`UnsupportedConfigError` for a config
      that is valid but cannot run on ``platform`` ("cpu", "gpu", "tpu").
  """

  name: str
  config: type
  layer: type
  family: str | None
  cache: type | None
  description: str
  paper: str
  requires: tuple[str, ...] = ()
  uses_rope: bool = False
  cross_layer: type | None = None
  quality: tuple[QualityPreset, ...] = ()
  efficiency: tuple[EfficiencyPreset, ...] = ()
  check: Callable[[MixerConfig, str], None] | None = None

  @property
  def fields(self) -> tuple[str, ...]:
    """The mechanism's own fields (the shared ones excluded), in declaration order."""
    return tuple(f.name for f in dataclasses.fields(self.config) if f.name not in SHARED_FIELDS)

  @property
  def is_available(self) -> bool:
    return not self.missing()

  def missing(self) -> list[str]:
    """The required ``attn_jax`` names this installation lacks."""
    return [n for n in self.requires if getattr(attn_jax, n, None) is None]

  def backends_here(self, platform: str | None = None) -> tuple[str, ...]:
    """Backends of the family that can run on ``platform`` (Pallas kernels of the other
    accelerator excluded; on a CPU, Pallas kernels run in interpret mode)."""
    if self.family is None:
      return ()
    platform = platform or dispatch.current_platform()
    return tuple(b for b in dispatch.backends(self.family) if _backend_runs_on(b, platform))


_REGISTRY: dict[str, MixerEntry] = {}


def register(entry: MixerEntry) -> MixerEntry:
  """Adds ``entry``; its name, config class and preset names must be new. Returns it."""
  if not isinstance(entry, MixerEntry):
    raise ValueError(f"entry must be a MixerEntry, got {type(entry).__name__}")
  if entry.name in _REGISTRY:
    raise ValueError(f"a mixer named {entry.name!r} is already registered")
  if not (isinstance(entry.config, type) and issubclass(entry.config, MixerConfig)):
    raise ValueError(f"mixer {entry.name!r}: config must be a MixerConfig subclass, got {entry.config!r}")
  if not dataclasses.is_dataclass(entry.config) or not entry.config.__dataclass_params__.frozen:
    raise ValueError(f"mixer {entry.name!r}: config {entry.config.__name__} must be a frozen dataclass")
  if any(e.config is entry.config for e in _REGISTRY.values()):
    raise ValueError(f"mixer {entry.name!r}: config {entry.config.__name__} already belongs to another entry")
  for kind in ("quality", "efficiency"):
    taken = {p.name for e in _REGISTRY.values() for p in getattr(e, kind)}
    for preset in getattr(entry, kind):
      if preset.name in taken:
        raise ValueError(f"mixer {entry.name!r}: {kind} preset name {preset.name!r} is already used")
      taken.add(preset.name)
  for preset in entry.efficiency:
    _check_field_names(entry.config, dict(preset.fields))
  _REGISTRY[entry.name] = entry
  return entry


def unregister(name: str) -> None:
  """Removes an entry (tests that register a temporary mixer clean up with it)."""
  _REGISTRY.pop(name, None)


def mixer_names() -> tuple[str, ...]:
  """Every registered mechanism, in registration order."""
  return tuple(_REGISTRY)


def get(name: str) -> MixerEntry:
  """The entry called ``name``; a ValueError lists the valid names."""
  if name not in _REGISTRY:
    raise UnsupportedConfigError(f"mixer must be one of {sorted(_REGISTRY)}, got {name!r}")
  return _REGISTRY[name]


def entries() -> tuple[MixerEntry, ...]:
  return tuple(_REGISTRY.values())


def entry_of(config: MixerConfig) -> MixerEntry:
  if not isinstance(config, MixerConfig):
    raise UnsupportedConfigError(
        f"a mixer config must be a MixerConfig (from attn_jax.layers.mixer_config(name, ...)), got "
        f"{type(config).__name__}")
  return _entry_of_type(type(config))


def _check_field_names(cls, fields: dict) -> None:
  valid = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(fields) - set(valid))
  if unknown:
    try:
      name = _entry_of_type(cls).name
    except UnsupportedConfigError:
      name = cls.__name__
    own = [f for f in valid if f not in SHARED_FIELDS]
    raise UnsupportedConfigError(
        f"mixer {name!r} has no field(s) {unknown}; its fields are {own} and the shared "
        f"{list(SHARED_FIELDS)}")


def mixer_config(name: str, **fields) -> MixerConfig:
  """The typed config of mechanism ``name`` with ``fields`` set (the others at their defaults).

  Raises:
    ValueError (:class:`UnsupportedConfigError`): unknown mechanism, unknown or misspelt field
      (the message names the mechanism and its valid fields), or an invalid value.
  """
  entry = get(name)
  _check_field_names(entry.config, fields)
  return entry.config(**fields)


def _backend_runs_on(backend: str, platform: str) -> bool:
  # A Pallas kernel runs on its own platform, or on a CPU in interpret mode; never on the other
  # accelerator. cuDNN has no interpret mode: it needs the GPU.
  for kernel_platform in ("tpu", "gpu"):
    if backend == f"pallas_{kernel_platform}":
      return platform in (kernel_platform, "cpu")
  if backend == "cudnn":
    return platform == "gpu"
  return True


def check(config: MixerConfig, platform: str | None = None) -> MixerEntry:
  """Raises :class:`UnsupportedConfigError` if ``config`` cannot run on ``platform`` (default:
  this one): a missing primitive, an unavailable backend or the entry's own platform rule."""
  entry = entry_of(config)
  missing = entry.missing()
  if missing:
    raise UnsupportedConfigError(
        f"mixer {entry.name!r} needs attn_jax.{', attn_jax.'.join(missing)}, which this installation lacks")
  platform = platform or dispatch.current_platform()
  impl = config.implementation
  if impl is not None:
    available = dispatch.backends(entry.family) if entry.family else ()
    if impl not in available:
      raise UnsupportedConfigError(
          f"mixer {entry.name!r}: implementation={impl!r} is not available in this installation "
          f"(available: {sorted(available)})")
    if impl == "cudnn" and platform != "gpu":
      raise UnsupportedConfigError(
          f"mixer {entry.name!r}: implementation='cudnn' needs an NVIDIA GPU, platform is {platform!r}")
    if not _backend_runs_on(impl, platform):
      raise UnsupportedConfigError(
          f"mixer {entry.name!r}: implementation={impl!r} cannot run on platform {platform!r}")
  if entry.check is not None:
    entry.check(config, platform)
  return entry


def build(config: MixerConfig, dim: int, *, rngs, dtype=None, param_dtype=None, layer_index: int = 0,
          num_layers: int = 1, platform: str | None = None):
  """Checks ``config`` (:func:`check`) and builds its layer for model width ``dim``."""
  entry = check(config, platform)
  hd = config.head_dim_for(dim)
  if hd < 1:
    raise config.error(f"head_dim must be >= 1: dim {dim} // num_heads {config.num_heads} = {hd}; set head_dim")
  if entry.uses_rope and config.rope and hd % (2 * config.rope):
    raise config.error(f"head_dim ({hd}) must be divisible by 2 * rope = {2 * config.rope} for "
                       f"{config.rope}-D RoPE")
  return entry.layer(config, dim, rngs=rngs, dtype=dtype or jnp.float32,
                     param_dtype=param_dtype or jnp.float32, layer_index=layer_index,
                     num_layers=num_layers)


def build_cross(config: MixerConfig, dim: int, *, rngs, memory_dim: int | None = None, dtype=None,
                param_dtype=None):
  """Builds the cross-attention layer of ``config``'s mechanism (encoder-decoders)."""
  entry = check(config)
  if entry.cross_layer is None:
    with_cross = [e.name for e in _REGISTRY.values() if e.cross_layer is not None]
    raise config.error(f"has no cross-attention form; mixers with one: {with_cross}")
  return entry.cross_layer(config, dim, rngs=rngs, memory_dim=memory_dim, dtype=dtype or jnp.float32,
                           param_dtype=param_dtype or jnp.float32)


def quality_presets() -> dict[str, tuple[MixerEntry, QualityPreset]]:
  """Every quality preset by name, with its entry. An entry without presets runs as itself."""
  out = {}
  for entry in _REGISTRY.values():
    for preset in entry.quality or (QualityPreset(entry.name),):
      out[preset.name] = (entry, preset)
  return out


def efficiency_presets() -> dict[str, tuple[MixerEntry, EfficiencyPreset]]:
  """Every efficiency preset by name, with its entry."""
  return {p.name: (e, p) for e in _REGISTRY.values() for p in e.efficiency}


def _cli_type(annotation):
  """The ml_collections type of a field that the command line can set, or None."""
  origin = typing.get_origin(annotation)
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  if origin in (typing.Union, types.UnionType) and len(args) == 1:
    annotation = args[0]
  if annotation in (int, float, bool, str):
    return annotation
  if annotation is typing.Any or typing.get_origin(annotation) is tuple:
    return object  # Python literals: ints or tuples (per-axis sizes)
  return None


@functools.lru_cache(maxsize=None)
def _type_hints(cls):
  return typing.get_type_hints(cls)


def cli_fields(name: str) -> dict[str, type]:
  """The mechanism's own fields that a command line can set (ints, floats, bools, strings and
  Python literals), with their types. Masks and functions are set from Python only."""
  entry = get(name)
  hints = _type_hints(entry.config)
  out = {}
  for field in entry.fields:
    t = _cli_type(hints[field])
    if t is not None:
      out[field] = t
  return out


def markdown_table() -> str:
  """The table of mechanisms in docs/models.md (it must equal this; a test checks)."""
  rows = ["| `mixer_config(name)` | what | paper | own fields | decoding cache | family |",
          "|---|---|---|---|---|---|"]
  for e in _REGISTRY.values():
    fields = ", ".join(f"`{f}`" for f in e.fields) or "-"
    cache = f"`{e.cache.__name__}`" if e.cache is not None else "none"
    rows.append(f"| `{e.name}` | {e.description} | {e.paper} | {fields} | {cache} | {e.family or '-'} |")
  return "\n".join(rows)


def listing(platform: str | None = None) -> str:
  """A plain-text table of the registry (``python -m experiments.benchmark --list``): name, family,
  decoding cache, the backends that can run here, paper; then each entry's description and presets."""
  platform = platform or dispatch.current_platform()
  head = ("name", "family", "decode cache", f"backends here ({platform})", "paper")
  rows = []
  for e in _REGISTRY.values():
    backends = ", ".join(b + (" (interpret)" if b.startswith("pallas") and platform == "cpu" else "")
                         for b in e.backends_here(platform)) or "- (plain jnp in the layer)"
    if e.missing():
      backends = "unavailable: needs attn_jax." + ", attn_jax.".join(e.missing())
    rows.append((e.name, e.family or "-", e.cache.__name__ if e.cache else "none (no decoding)", backends, e.paper))
  widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head) - 1)]
  fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1]
  lines = [fmt(head), fmt(tuple("-" * len(h) for h in head))] + [fmt(r) for r in rows]
  for e in _REGISTRY.values():
    quality = ", ".join(p.name + (" (default)" if p.default else "")
                        for p in e.quality or (QualityPreset(e.name),))
    efficiency = ", ".join(f"'{p.name}'" + (" (default)" if p.default else "") for p in e.efficiency) or "-"
    lines += ["", f"{e.name}: {e.description}", f"  fields: {', '.join(e.fields) or '-'}",
              f"  quality presets: {quality}", f"  efficiency presets: {efficiency}"]
  return "\n".join(lines)
