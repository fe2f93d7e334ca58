"""The case matrix: which calls of the public API the compile check compiles, per kernel family.

A :class:`Case` is one call of a public function (``attn_jax.attention``,
``neighborhood_attention``, ``linear_attention``...) on abstract inputs, with the real kernel
requested explicitly (``interpret=False``), so that tracing on a CPU lowers the kernel for the
target's platform. It is compiled forward only (``"fwd"``) and/or with the gradients of its
inputs (``"fwd+bwd"``, which adds every backward kernel).

A family is a generator of cases registered under a name (``--kernels`` selects families), so
adding a kernel is one function here::

    def _my_cases():
      for d in HEAD_DIMS:
        yield Case("my_family", f"causal-d{d}", head_dim=d, dtype="bfloat16",
                   inputs=(Input("q", (1, 1021, 4, d)), ...), grad=("q", "k", "v"),
                   call=lambda platform, x: ..., platforms=("gpu",))

    register_family("my_family", _my_cases)

(or in a module of its own, loaded with ``--cases-module``).
``call(platform, x)`` receives ``"tpu"`` or ``"gpu"`` and the inputs by name, and returns an
array or a tuple of arrays (summed into the loss of ``"fwd+bwd"``). ``platforms`` limits a case
to the targets that have the kernel (a cuDNN backend: ``("gpu",)``). ``quick=True`` puts a case
in the CI subset (``--quick``).

Shapes are chosen for what the compilers check, not for speed: lengths that are multiples of no
block (1021 is prime), the features that change kernel code (GQA / MQA, a V head dim other than
the QK one, sinks, soft-cap, segment ids, cross lengths, tile-read masks, decay kinds), and head
dims 64 / 128 / 256 in bfloat16, float16 and float32.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Iterator

import numpy as np

FWD = "fwd"
FWD_BWD = "fwd+bwd"
MODES = (FWD, FWD_BWD)
HEAD_DIMS = (64, 128, 256)
DTYPES = ("bfloat16", "float16", "float32")
_SHORT = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


@dataclasses.dataclass(frozen=True)
class Input:
  """An abstract input: name, shape and dtype (``"int32"`` for segment ids)."""

  name: str
  shape: tuple[int, ...]
  dtype: str


@dataclasses.dataclass(frozen=True)
class Case:
  """One compiled call.

  Attributes:
    family: the kernel family (a ``--kernels`` name): ``"softmax"``, ``"neighborhood"``...
    name: unique within the family; the case id is ``family/name``.
    head_dim: the largest head (feature) dim the kernels see, as the user gives it; the spill
      rule (none at head dim <= 128 on H100 / A100) reads it.
    dtype: the dtype of q / k / v.
    inputs: the abstract inputs, in the order they are passed to jit.
    grad: names of the inputs differentiated in ``"fwd+bwd"`` (float inputs only).
    call: ``(platform, {name: array}) -> array or tuple of arrays``.
    modes: ``"fwd"`` and / or ``"fwd+bwd"``.
    platforms: ``"tpu"`` and / or ``"gpu"``.
    quick: part of the CI subset.
    note: what the case covers, for the report.
  """

  family: str
  name: str
  head_dim: int
  dtype: str
  inputs: tuple[Input, ...]
  grad: tuple[str, ...]
  call: Callable[[str, dict], Any]
  modes: tuple[str, ...] = (FWD_BWD,)
  platforms: tuple[str, ...] = ("tpu", "gpu")
  quick: bool = False
  note: str = ""

  @property
  def id(self) -> str:
    return f"{self.family}/{self.name}"

  def __post_init__(self):
    names = [i.name for i in self.inputs]
    if len(set(names)) != len(names):
      raise ValueError(f"case {self.id}: input names repeat: {names}")
    if not set(self.grad) <= set(names):
      raise ValueError(f"case {self.id}: grad names {self.grad} are not all inputs {names}")
    if not self.modes or not set(self.modes) <= set(MODES):
      raise ValueError(f"case {self.id}: modes must be a non-empty subset of {MODES}, got {self.modes}")


_FAMILIES: dict[str, Callable[[], Iterator[Case]]] = {}


def register_family(name: str, generator: Callable[[], Iterator[Case]]) -> None:
  """Adds a family of cases (a ``--kernels`` name); ``generator()`` yields its cases."""
  if name in _FAMILIES:
    raise ValueError(f"kernel family {name!r} is already registered")
  _FAMILIES[name] = generator


def families() -> tuple[str, ...]:
  return tuple(_FAMILIES)


def load_modules(modules) -> None:
  """Imports modules that register more families (``--cases-module``), e.g. a kernel's own
  cases kept beside it, or a test's. The workers import the same modules."""
  for name in modules or ():
    importlib.import_module(name)
  all_cases.cache_clear()


@functools.cache
def all_cases() -> dict[str, Case]:
  """Every registered case by id."""
  out = {}
  for family, gen in _FAMILIES.items():
    for case in gen():
      if case.family != family:
        raise ValueError(f"family {family!r} yielded case {case.id} of another family")
      if case.id in out:
        raise ValueError(f"case id {case.id} is defined twice")
      out[case.id] = case
  return out


def select(kernels=None, match=None, quick=False) -> list[Case]:
  """The cases of the families ``kernels`` (None: all) whose id contains ``match`` (or one of
  its comma-separated parts).

  Raises:
    ValueError: a family name that is not registered (the message lists the valid ones).
  """
  if isinstance(kernels, str):
    kernels = [k.strip() for k in kernels.split(",") if k.strip()]
  if kernels is not None:
    unknown = [k for k in kernels if k not in _FAMILIES]
    if unknown or not kernels:
      raise ValueError(f"kernels must be names among {sorted(_FAMILIES)}, got "
                       f"{', '.join(map(repr, unknown)) if unknown else 'none'}")
  parts = [m for m in (match or "").split(",") if m]
  cases = [c for c in all_cases().values()
           if (kernels is None or c.family in kernels) and (not parts or any(m in c.id for m in parts))
           and (c.quick or not quick)]
  return cases


def _tag(d, dtype):
  return f"d{d}-{_SHORT[dtype]}"


def _tokens(name, b, t, h, d, dtype):
  return Input(name, (b, t, h, d), dtype)


# Softmax attention: the flash kernels (forward, dQ, dK/dV) through attn_jax.attention.


def _softmax_config(platform):
  import attn_jax
  if platform == "tpu":
    return attn_jax.PallasTpuConfig(interpret=False)
  return attn_jax.PallasGpuConfig(interpret=False)


def _attention(mask_fn, *, soft_cap=None, sinks=False, segments=False):
  def call(platform, x):
    import attn_jax
    return attn_jax.attention(
        x["q"], x["k"], x["v"], mask=mask_fn(), sinks=x.get("sinks") if sinks else None,
        logits_soft_cap=soft_cap, q_segment_ids=x.get("q_seg") if segments else None,
        kv_segment_ids=x.get("kv_seg") if segments else None, config=_softmax_config(platform))
  return call


def _causal():
  from attn_jax import masks
  return masks.causal()


def _window_sinks():
  from attn_jax import masks
  return masks.sliding_window(255) | masks.sink_tokens(4)


@functools.cache
def _layout_mask():
  # A fixed random block-sparse layout whose blocks (100 tokens) match no kernel block, so that
  # kernels read precomputed tiles for its partial blocks.
  from attn_jax import masks
  return masks.block_layout(np.random.RandomState(0).rand(11, 11) < 0.5, 100, 100)


def _softmax_cases() -> Iterator[Case]:
  # A covering design rather than the full cross product: every head dim in every dtype (causal),
  # and each feature group at every head dim in bfloat16, and in float32 where registers are
  # tightest (the groups that add tiles to the kernels' live state: soft-cap, segments, tiles).
  for d in HEAD_DIMS:
    for dtype in DTYPES:
      tag = _tag(d, dtype)
      t = 1021
      yield Case("softmax", f"causal-mha-{tag}", d, dtype,
                 inputs=tuple(_tokens(n, 1, t, 4, d, dtype) for n in "qkv"), grad=("q", "k", "v"),
                 call=_attention(_causal), modes=MODES if (d, dtype) == (128, "bfloat16") else (FWD_BWD,),
                 quick=(d, dtype) == (64, "float32"), note="causal, 4 heads, 1021 tokens")
      if dtype == "float16":
        continue  # f16 takes the bf16 code paths.
      dv = 128 if d == 64 else d // 2
      tq, tk = 777, 1533
      yield Case("softmax", f"cross-gqa-all-{tag}", d, dtype,
                 inputs=(_tokens("q", 2, tq, 8, d, dtype), _tokens("k", 2, tk, 2, d, dtype),
                         _tokens("v", 2, tk, 2, dv, dtype), Input("sinks", (8,), "float32"),
                         Input("q_seg", (2, tq), "int32"), Input("kv_seg", (2, tk), "int32")),
                 grad=("q", "k", "v", "sinks"),
                 call=_attention(_causal, soft_cap=30.0, sinks=True, segments=True),
                 quick=(d, dtype) == (128, "bfloat16"),
                 note=f"causal cross 777 x 1533, GQA 8/2, Dv={dv}, sinks, soft-cap, segment ids")
      yield Case("softmax", f"layout-tiles-{tag}", d, dtype,
                 inputs=tuple(_tokens(n, 1, 1100, 2, d, dtype) for n in "qkv"), grad=("q", "k", "v"),
                 call=_attention(_layout_mask, soft_cap=20.0),
                 note="block-sparse layout read as precomputed tiles, soft-cap, 1100 tokens")
      if dtype == "bfloat16":
        yield Case("softmax", f"window-sinks-mqa-{tag}", d, dtype,
                   inputs=(_tokens("q", 1, 2049, 4, d, dtype), _tokens("k", 1, 2049, 1, d, dtype),
                           _tokens("v", 1, 2049, 1, d, dtype), Input("sinks", (4,), "float32")),
                   grad=("q", "k", "v", "sinks"), call=_attention(_window_sinks, sinks=True),
                   note="window 255 + 4 sink tokens, learned sinks, MQA 4/1, 2049 tokens")


register_family("softmax", _softmax_cases)


# Neighborhood attention (1-D / 2-D / 3-D) on the flash kernels with the permuted-grid mask.


def _neighborhood(kernel_size, *, dilation=1, stride=1, causal=False, sinks=False, extra=False):
  def call(platform, x):
    import attn_jax
    config = attn_jax.NeighborhoodConfig(attention_config=_softmax_config(platform))
    return attn_jax.neighborhood_attention(
        x["q"], x["k"], x["v"], kernel_size, stride, dilation, causal,
        sinks=x.get("sinks") if sinks else None,
        additional_keys=x.get("ak") if extra else None, additional_values=x.get("av") if extra else None,
        config=config)
  return call


def _neighborhood_cases() -> Iterator[Case]:
  # The flash kernels with the neighborhood predicate and tile-sized blocks: each rank at every
  # head dim in bfloat16, and the 2-D case (GQA, sinks, extra keys) in float32 as well.
  for d in HEAD_DIMS:
    for dtype in ("bfloat16", "float32"):
      tag = _tag(d, dtype)
      shape = (45, 61)
      yield Case("neighborhood", f"2d-{tag}", d, dtype,
                 inputs=(Input("q", (1, *shape, 4, d), dtype), Input("k", (1, *shape, 2, d), dtype),
                         Input("v", (1, *shape, 2, d), dtype), Input("sinks", (4,), "float32"),
                         Input("ak", (1, 7, 2, d), dtype), Input("av", (1, 7, 2, d), dtype)),
                 grad=("q", "k", "v", "sinks", "ak", "av"),
                 call=_neighborhood((7, 9), stride=(1, 2), sinks=True, extra=True),
                 quick=(d, dtype) == (128, "bfloat16"),
                 note="2-D 45 x 61, window 7 x 9, stride (1, 2), GQA 4/2, sinks, 7 extra keys")
      if dtype == "float32":
        continue
      yield Case("neighborhood", f"1d-{tag}", d, dtype,
                 inputs=tuple(Input(n, (1, 1021, 4, d), dtype) for n in "qkv"), grad=("q", "k", "v"),
                 call=_neighborhood(31, dilation=2, causal=True),
                 note="1-D, 1021 tokens, window 31, dilation 2, causal")
      shape = (10, 18, 22)
      yield Case("neighborhood", f"3d-{tag}", d, dtype,
                 inputs=(Input("q", (1, *shape, 4, d), dtype), Input("k", (1, *shape, 1, d), dtype),
                         Input("v", (1, *shape, 1, d), dtype)),
                 grad=("q", "k", "v"), call=_neighborhood((3, 5, 7), causal=(True, False, False)),
                 note="3-D 10 x 18 x 22, window 3 x 5 x 7, causal in time, MQA 4/1")


register_family("neighborhood", _neighborhood_cases)


# Linear attention: the chunked kernels (forward, dQ, dK/dV; scalar and per-channel decays).

DECAYS = ("none", "fixed", "step", "channel")


def _linear_config(platform):
  import attn_jax
  if platform == "tpu":
    return attn_jax.LinearPallasTpuConfig(interpret=False)
  return attn_jax.LinearPallasGpuConfig(interpret=False)


def _linear(*, normalize=False):
  def call(platform, x):
    import attn_jax
    out = attn_jax.linear_attention(
        x["q"], x["k"], x["v"], log_decay=x.get("decay"), initial_state=x.get("s0"),
        segment_ids=x.get("seg"), normalize=normalize, return_final_state=True,
        config=_linear_config(platform))
    return out
  return call


def _decay_input(decay, b, t, h, d):
  if decay == "none":
    return ()
  shape = {"fixed": (h,), "step": (b, t, h), "channel": (b, t, h, d)}[decay]
  return (Input("decay", shape, "float32"),)


def _linear_cases() -> Iterator[Case]:
  # Every decay kind at every head dim in bfloat16 and float32 (float16 once per decay kind, at
  # head dim 128); GQA with segments, an initial state and Dv != D at head dims 64 (with the
  # normaliser's extra value column) and 128.
  for d in HEAD_DIMS:
    for dtype in DTYPES:
      tag = _tag(d, dtype)
      for decay in DECAYS:
        if dtype == "float16" and d != 128:
          continue
        t, h = 1021, 4
        inputs = tuple(_tokens(n, 1, t, h, d, dtype) for n in "qkv") + _decay_input(decay, 1, t, h, d)
        yield Case("linear", f"{decay}-mha-{tag}", d, dtype, inputs=inputs,
                   grad=tuple(i.name for i in inputs), call=_linear(),
                   quick=(d, dtype) == (128, "bfloat16") and decay in ("fixed", "channel"),
                   note=f"decay {decay}, 4 heads, 1021 tokens, final state")
        if dtype != "bfloat16" or d == 256:
          continue
        dv = d // 2
        normalize = d == 64
        vs = dv + 1 if normalize else dv
        b, t = 2, 777
        inputs = (_tokens("q", b, t, 4, d, dtype), _tokens("k", b, t, 2, d, dtype),
                  _tokens("v", b, t, 2, dv, dtype), Input("s0", (b, 2, d, vs), "float32"),
                  Input("seg", (b, t), "int32")) + _decay_input(decay, b, t, 2, d)
        yield Case("linear", f"{decay}-gqa-segments-{tag}", d, dtype, inputs=inputs,
                   grad=tuple(i.name for i in inputs if i.name != "seg"), call=_linear(normalize=normalize),
                   note=(f"decay {decay}, GQA 4/2, Dv={dv}, segment ids, initial state, 777 tokens"
                         + (", normalize" if normalize else "")))


register_family("linear", _linear_cases)
