"""Titans, the ``"titans_mac"``, ``"titans_mag"`` and ``"titans_mal"`` mixers (Behrouz et al.
2024, Sec. 4), with the Miras objective and retention options (Behrouz et al. 2025).

A neural memory (a per-head MLP trained at test time by chunked gradient steps with momentum
and weight decay, :func:`attn_jax.mechanisms.neural_memory`) combined with softmax attention:

* ``titans_mac``, memory as context: per segment of ``segment_len`` tokens, the memory's answers
  and the persistent tokens are prepended to attention over the segment, whose output is then
  written into the memory and gated by its answer (Sec. 4.1);
* ``titans_mag``, memory as gate: sliding-window attention (``window``) and the memory read the
  sequence side by side, combined by a gate (Sec. 4.2);
* ``titans_mal``, memory as layer: sliding-window attention reads the memory's output (Sec. 4.3).

The layer holds the parameters of :func:`attn_jax.mechanisms.init_titans` as ``nnx.Param`` with
logical axes and calls :func:`attn_jax.mechanisms.titans_block` on them, so it is exactly the
stage-1 function (tested). Everything trains end to end: the memory's initial weights, its
projections and gates, the persistent tokens and the attention.

Not yet: decoding (MAC's segment recurrence and the memory's partial chunks need a cache of
their own; :func:`attn_jax.mechanisms.neural_memory_step` is the building block) raises
``NotImplementedError``; packed documents (``segment_ids``) are refused.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax import mechanisms
from attn_jax.layers import registry
from attn_jax.layers.mixers import common


@dataclasses.dataclass(frozen=True, kw_only=True)
class _TitansBase(registry.MixerConfig):
  """Fields every Titans variant has (causal; GQA allowed in the attention; ``rope`` unused).

  Attributes:
    memory_heads: heads of the neural memory (None: ``num_heads``).
    memory_dim: key/value width of each memory head (None: the attention's head dim).
    memory_hidden: hidden widths of each head's memory MLP; None: one hidden layer of
      ``2 * memory_dim`` (Titans' deep memory); ``()``: a linear memory.
    num_persistent: learnable persistent-memory tokens (Sec. 3.3).
    lr_scale: the largest inner step size ``theta``.
    chunk_size: tokens whose memory gradients are taken at the same weights (Sec. 3.2).

  Defaults (ours): ``lr_scale=0.01`` (``theta <= lr_scale`` always: it is a sigmoid times it),
  ``chunk_size=4``. Inside a chunk every token's gradient is taken at the chunk's starting
  weights, so a run of equal tokens (selective copy's blanks) adds about
  ``sum_i (1 - eta^i) / (1 - eta)`` steps in one direction without feedback (~9 for 4 tokens at
  the initial momentum ``eta = 0.88``, ~28 for 8, ~80 for 16). Measured on unit-RMS inputs (the
  pre-norm's scale) that are 80 % one repeated token, width 64: chunks of 8 at ``0.02`` diverge
  to inf for memory widths 16 and 64, and the stage-1 block's ``0.1`` with chunks of 16 diverges
  on random tokens too; chunks of 4 at 0.01 or 0.02 stay bounded for widths 16 to 64.
    objective: the attentional bias: ``"l2"`` (Titans), ``"lp"`` (Moneta), ``"huber"`` (Yaad).
    objective_p: exponent of ``"lp"``; huber_delta: threshold of ``"huber"``.
    retention: ``"l2"`` (Titans' weight decay), ``"lq"`` (Moneta), ``"kl"`` (Memora).
    retention_q: exponent of ``"lq"``.
    activation: of the memory MLP (``"silu"``, ``"gelu"``, ``"relu"``).
  """

  memory_heads: int | None = None
  memory_dim: int | None = None
  memory_hidden: tuple[int, ...] | None = None
  num_persistent: int = 4
  lr_scale: float = 0.01
  chunk_size: int = 4
  objective: str = "l2"
  objective_p: float = 3.0
  huber_delta: float = 1.0
  retention: str = "l2"
  retention_q: float = 4.0
  activation: str = "silu"

  VARIANT = ""

  def validate(self):
    super().validate()
    self.check_causal_only()
    self.check_positive("memory_heads", "memory_dim")
    if self.memory_hidden is not None and not isinstance(self.memory_hidden, tuple):
      raise self.error(f"memory_hidden must be a tuple of ints or None, got {self.memory_hidden!r}")
    try:
      self.titans_config(dim=max(1, self.num_heads) * (self.head_dim or 8))
    except ValueError as e:
      raise self.error(str(e)) from None

  def spec(self) -> mechanisms.MemorySpec:
    return mechanisms.MemorySpec(chunk_size=self.chunk_size, objective=self.objective, p=self.objective_p,
                                 huber_delta=self.huber_delta, retention=self.retention, q=self.retention_q,
                                 activation=self.activation)

  def _variant_fields(self) -> dict:
    return {}

  def titans_config(self, dim: int) -> mechanisms.TitansConfig:
    """The stage-1 :class:`~attn_jax.mechanisms.TitansConfig` of this config at model width ``dim``."""
    d = self.head_dim_for(dim)
    dm = self.memory_dim or d
    hidden = (2 * dm,) if self.memory_hidden is None else tuple(self.memory_hidden)
    return mechanisms.TitansConfig(
        variant=self.VARIANT, d_model=dim, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=d,
        memory_heads=self.memory_heads or self.num_heads, memory_dim=dm, memory_hidden=hidden,
        num_persistent=self.num_persistent, lr_scale=self.lr_scale, spec=self.spec(), **self._variant_fields())


@dataclasses.dataclass(frozen=True, kw_only=True)
class TitansMACConfig(_TitansBase):
  """Titans MAC. Attributes: segment_len: attention segment, a multiple of ``chunk_size``."""

  segment_len: int = 32
  VARIANT = "mac"

  def _variant_fields(self):
    return dict(segment_len=self.segment_len)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TitansMAGConfig(_TitansBase):
  """Titans MAG. Attributes: window: sliding-window size of the attention branch."""

  window: int = 32
  VARIANT = "mag"

  def _variant_fields(self):
    return dict(window=self.window)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TitansMALConfig(_TitansBase):
  """Titans MAL. Attributes: window: sliding-window size of the attention on the memory's output."""

  window: int = 32
  VARIANT = "mal"

  def _variant_fields(self):
    return dict(window=self.window)


# Logical axes of each leaf of init_titans' pytree (flattened heads: [E, H * D] splits by head).
_AXES = {
    ("attn", "wq"): ("embed", "heads"), ("attn", "wk"): ("embed", "kv_heads"),
    ("attn", "wv"): ("embed", "kv_heads"), ("attn", "wo"): ("heads", "embed"),
    ("mem", "wq"): ("embed", "heads"), ("mem", "wk"): ("embed", "heads"), ("mem", "wv"): ("embed", "heads"),
    ("mem", "wo"): ("heads", "embed"), ("mem", "gates"): ("embed", None), ("mem", "gates_bias"): (None,),
    ("persistent",): (None, "embed"), ("gate", "y"): ("embed",), ("gate", "m"): ("embed",),
}


def _path_key(path) -> tuple:
  return tuple(getattr(p, "key", getattr(p, "idx", None)) for p in path)


class Titans(nnx.Module):
  """A Titans block (MAC, MAG or MAL by its config; mixer protocol without decoding)."""

  def __init__(self, config: _TitansBase, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    del layer_index, num_layers
    self.config = config
    self.dtype = dtype
    self.block_config = config.titans_config(dim)
    params = mechanisms.init_titans(rngs.params(), self.block_config)
    leaves, self._treedef = jax.tree_util.tree_flatten_with_path(params)
    names = []
    for path, value in leaves:
      key = _path_key(path)
      # The memory's initial MLP weights: [memory_heads, d_in, d_out] per layer.
      axes = ("heads", None, None) if key[:2] == ("mem", "init") else _AXES[key]
      name = "_".join(str(k) for k in key)
      setattr(self, name, nnx.Param(value.astype(param_dtype), logical_axes=axes))
      names.append(name)
    self._names = tuple(names)

  def params(self) -> dict:
    """The parameters as the pytree of :func:`attn_jax.mechanisms.init_titans`."""
    return jax.tree_util.tree_unflatten(self._treedef, [getattr(self, n)[...] for n in self._names])

  def __call__(self, x, *, segment_ids=None, **unused):
    """``x [B, T, C]`` -> ``[B, T, C]`` (:func:`attn_jax.mechanisms.titans_block`)."""
    common.no_segments(self.config.mixer, segment_ids)
    return mechanisms.titans_block(self.params(), x.astype(self.dtype), self.block_config)

  def init_cache(self, batch: int, max_len: int, dtype):
    raise NotImplementedError(
        f"mixer {self.config.mixer!r} does not decode yet (Titans' memory and segment caches are not "
        f"implemented); train or score with the full call")

  def prefill(self, x, cache, **unused):
    return self.init_cache(x.shape[0], x.shape[1], x.dtype)

  def decode(self, x, cache, *, position, **unused):
    return self.init_cache(x.shape[0], 1, x.dtype)


_PAPER = ("Behrouz et al. 2024, Titans: learning to memorize at test time (arXiv:2501.00663); Miras options: "
          "Behrouz et al. 2025, It's all connected (arXiv:2504.13173)")


def _quality(name, window_field, description):
  # CPU scale: the attention span (window, or MAC's segment) a quarter of the task, a multiple of
  # the default chunk of 4 tokens.
  def fields(task: registry.Task):
    return {window_field: max(4, (task.seq_len // 4) // 4 * 4)}
  return (registry.QualityPreset(name, fields, description=description),)


for _name, _cfg, _field, _what in (
    ("titans_mac", TitansMACConfig, "segment_len", "memory as context: per segment, memory answers and persistent "
                                                   "tokens prepended to attention, which is then memorised"),
    ("titans_mag", TitansMAGConfig, "window", "memory as gate: sliding-window attention and the neural memory "
                                              "side by side, combined by a gate"),
    ("titans_mal", TitansMALConfig, "window", "memory as a layer: sliding-window attention over the neural "
                                              "memory's output")):
  registry.register(registry.MixerEntry(
      name=_name,
      config=_cfg,
      layer=Titans,
      family=None,
      cache=None,
      description=f"Titans {_what}; neural memory trained at test time (chunked, momentum, weight decay; "
                  f"Miras objectives and retentions); no decoding yet",
      paper=_PAPER,
      quality=_quality(_name, _field, f"Titans {_name[-3:].upper()}, span seq_len / 4"),
      efficiency=(registry.EfficiencyPreset(_name, patterns=("causal_self",), default=False, quality=_name),),
  ))
