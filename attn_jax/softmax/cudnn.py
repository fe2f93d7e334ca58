"""The ``cudnn`` backend: cuDNN's fused flash attention through ``jax.nn.dot_product_attention``.

On an NVIDIA GPU cuDNN is expected to be the fastest kernel for the calls it serves (dense,
causal, causal sliding windows, GQA, bf16/f16): published H100 figures put it at 600-740 TFLOP/s
against 360-420 for Pallas Triton flash kernels; this project's own figures come from
``experiments/gpu_check.py``. It sees the attention problem only through the arguments of
``jax.nn.dot_product_attention`` (identical in jax 0.10 and 0.11): ``is_causal`` (a diagonal
through the top-left corner), ``local_window_size=(left, 0)`` together with ``is_causal`` (a
band ending at that diagonal), per-sequence ``query_seq_lengths`` / ``key_value_seq_lengths``,
and dense ``bias`` / ``mask`` arrays (which this backend never builds: an O(T^2) mask forfeits
the point of a flash kernel). Everything else is refused with ``NotImplementedError`` naming the
feature, so that ``implementation=None`` moves on to the Pallas kernels.

The translation from this project's call to cuDNN's is a pure, host-side function of the static
:class:`~attn_jax.softmax.common.Spec` (:func:`plan`), and :func:`apply` carries it out around any
``implementation`` of ``jax.nn.dot_product_attention``; the tests run it with
``implementation="xla"`` on a CPU against the reference.

How a mask becomes cuDNN's arguments. A mask that is ``full``, ``causal``, ``sliding_window`` or
an intersection (``&``) of them is a band: query ``i`` sees key ``j`` iff
``i + lo <= j <= i + hi`` (``lo`` or ``hi`` possibly unbounded), with the project's alignment
(``offset = kv_len - q_len`` by default: bottom-right) already folded into ``lo`` and ``hi``.
:func:`plan` then

1. keeps only the query rows that see some key (the others return zeros) and the keys some
   query sees (a slice of q and of k/v);
2. drops bounds that no row reaches;
3. moves a remaining upper bound ``hi`` onto the main diagonal by prepending ``hi`` zero query
   rows, whose outputs are discarded: cuDNN's causal mask then coincides with the band's upper
   edge, and ``lo`` becomes ``local_window_size=(hi - lo, 0)``.

A causal call is made only when the padded problem is square (as many query rows as keys):
then top-left and bottom-right alignment coincide, and the result does not depend on which of
the two cuDNN or a future jax applies to unequal lengths. The bottom-right causal cross
attention of KV-cache decoding and chunked prefill maps this way exactly; the query rows it
prepends are extra work, bounded by :attr:`CudnnConfig.max_work_ratio`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
from jax.extend import backend as jax_backend
import jax.numpy as jnp
import numpy as np

from attn_jax import dispatch
from attn_jax import masks as masks_lib
from attn_jax import sharding as sharding_lib
from attn_jax.softmax import common

# cuDNN's flash attention (the only cuDNN path jax uses for bf16/f16 without bias) takes head
# dims that are multiples of 8, up to 256 on Hopper and later and 128 before; jax checks the
# architecture itself at trace time and raises NotImplementedError for the older limit.
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 8
DTYPES = (jnp.bfloat16, jnp.float16)

# Refusals name the project's mask classes by their class name, so that a class added or renamed
# in masks.py only changes the wording of a refusal, never what is served.
_MASK_FEATURES = {
    "SinkTokens": "sink tokens (masks.sink_tokens)",
    "ChunkedCausal": "chunked causal masks (masks.chunked_causal)",
    "PrefixLM": "prefix-LM masks (masks.prefix_lm)",
    "BlockLayout": "block-sparse layouts (masks.block_layout)",
    "FromFn": "arbitrary masks (masks.from_fn)",
    "FromArray": "arbitrary masks (masks.from_array)",
    "NeighborhoodMask": "neighborhood masks",
    "Or": "unions of masks (|)",
    "Not": "negated masks (~)",
}


@dataclasses.dataclass(frozen=True)
class CudnnConfig:
  """Tunables of the ``cudnn`` backend.

  Attributes:
    max_work_ratio: the largest (token pairs cuDNN computes) / (token pairs the mask shows)
      accepted. Mapping a band whose upper edge lies ``s`` keys right of the main diagonal
      (bottom-right causal cross attention with ``kv_len - q_len = s``) prepends ``s`` query rows
      whose work is thrown away; above this ratio the backend refuses, so that dispatch picks
      the Pallas kernel, which computes only the mask's own tiles. The default 1.5 is the
      published H100 speed ratio of cuDNN to a Pallas Triton flash kernel (600-740 against
      360-420 TFLOP/s) with a margin, to be retuned from measured figures; ``float("inf")``
      always takes cuDNN.
  """

  max_work_ratio: float = 1.5

  backend: ClassVar[str] = "cudnn"

  def __post_init__(self):
    r = self.max_work_ratio
    if isinstance(r, bool) or not isinstance(r, (int, float)) or math.isnan(r) or r < 1:
      raise ValueError(f"CudnnConfig.max_work_ratio must be a number >= 1, got {r!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one attention call runs on ``jax.nn.dot_product_attention``.

  Query rows ``[q_start, q_stop)`` and keys ``[kv_start, kv_stop)`` are sliced out (every other
  row sees no key and returns zeros; no query sees any other key); ``pad_q`` zero query rows are
  prepended; the result is ``dot_product_attention(q_padded, k_sliced, v_sliced,
  is_causal=is_causal, local_window_size=None if window is None else (window, 0))`` without its
  first ``pad_q`` rows. ``window`` is only ever set together with ``is_causal``.
  """

  q_start: int
  q_stop: int
  kv_start: int
  kv_stop: int
  pad_q: int
  is_causal: bool
  window: int | None
  useful_pairs: int
  computed_pairs: int

  @property
  def work_ratio(self) -> float:
    return self.computed_pairs / self.useful_pairs


# Exact classes, not isinstance: a subclass (a causal mask with extra keys, say) may show more
# than its base class's band.
_BAND_CLASSES = (masks_lib.Full, masks_lib.Causal, masks_lib.SlidingWindow)


def _unsupported_mask_feature(mask: masks_lib.Mask) -> str | None:
  """The first part of ``mask`` that is not a band (None if it is one), as words for an error."""
  if type(mask) in _BAND_CLASSES:
    return None
  if type(mask) is masks_lib.And:
    return _unsupported_mask_feature(mask.a) or _unsupported_mask_feature(mask.b)
  if getattr(mask, "depends_on_head", False):
    return f"per-head masks ({mask!r})"
  name = type(mask).__name__
  return f"{_MASK_FEATURES.get(name, f'{name} masks')} ({mask!r})"


def mask_band(mask: masks_lib.Mask, ctx: masks_lib.MaskContext) -> tuple[int | None, int | None]:
  """``(lo, hi)`` with ``mask(i, j) == (i + lo <= j <= i + hi)``; None is an unbounded side.

  Raises NotImplementedError naming the first part of ``mask`` that is not a band.
  """
  feature = _unsupported_mask_feature(mask)
  if feature is not None:
    raise NotImplementedError(
        f"cuDNN takes only full, causal and sliding-window masks and their intersections (&), "
        f"not {feature}")
  return _band(mask, ctx)


def _band(mask, ctx):
  if type(mask) is masks_lib.Full:
    return None, None
  if type(mask) in (masks_lib.Causal, masks_lib.SlidingWindow):
    offset = ctx.default_offset if mask.offset is None else mask.offset
    if type(mask) is masks_lib.Causal:
      return None, offset
    return offset - mask.left, offset + mask.right
  (lo_a, hi_a), (lo_b, hi_b) = _band(mask.a, ctx), _band(mask.b, ctx)
  lo = lo_a if lo_b is None else lo_b if lo_a is None else max(lo_a, lo_b)
  hi = hi_a if hi_b is None else hi_b if hi_a is None else min(hi_a, hi_b)
  return lo, hi


def _band_pairs(rows: np.ndarray, lo: int | None, hi: int | None, num_keys: int) -> int:
  """Visible pairs of query rows ``rows`` against keys ``[0, num_keys)`` under band (lo, hi)."""
  first = np.zeros_like(rows) if lo is None else np.maximum(0, rows + lo)
  last = np.full_like(rows, num_keys - 1) if hi is None else np.minimum(num_keys - 1, rows + hi)
  return int(np.maximum(0, last - first + 1).sum())


def plan(spec: common.Spec, config: CudnnConfig | None = None) -> Plan:
  """The cuDNN call for ``spec``, or NotImplementedError naming what cuDNN cannot do.

  Pure and host-side: depends on the static call description only (no arrays, no device).
  """
  config = CudnnConfig() if config is None else config
  if spec.has_sinks:
    raise NotImplementedError("cuDNN does not support sinks (learned softmax sinks)")
  if spec.logits_soft_cap is not None:
    raise NotImplementedError("cuDNN does not support logits_soft_cap")
  if spec.has_segments:
    raise NotImplementedError(
        "cuDNN does not support segment ids (q_segment_ids / kv_segment_ids): "
        "jax.nn.dot_product_attention expresses only per-sequence valid lengths")
  if spec.return_lse:
    raise NotImplementedError(
        "cuDNN does not support return_lse: jax.nn.dot_product_attention returns the "
        "log-sum-exp rounded to the input dtype and without a gradient")
  if spec.v_head_dim != spec.head_dim:
    raise NotImplementedError(
        f"cuDNN (through jax.nn.dot_product_attention) needs the value head dim to equal the "
        f"query/key head dim, got {spec.v_head_dim} != {spec.head_dim}")
  d = spec.head_dim
  if d % HEAD_DIM_MULTIPLE or d > MAX_HEAD_DIM:
    raise NotImplementedError(
        f"cuDNN does not support head_dim {d}: it takes multiples of {HEAD_DIM_MULTIPLE} up to "
        f"{MAX_HEAD_DIM} (128 before Hopper)")

  lo, hi = mask_band(spec.mask, spec.mask_context)
  tq, tk = spec.q_len, spec.kv_len
  rows = np.arange(tq, dtype=np.int64)
  useful = _band_pairs(rows, lo, hi, tk)
  if useful == 0:
    raise NotImplementedError(f"cuDNN does not support a mask under which no query sees any key "
                              f"({spec.mask!r} for q_len {tq}, kv_len {tk})")
  # Query rows that see at least one key, and the keys that at least one of them sees: row i
  # sees [max(0, i + lo), min(tk - 1, i + hi)], an interval that slides with i, so both ranges
  # are intervals.
  q_first = 0 if hi is None else max(0, -hi)
  q_last = tq - 1 if lo is None else min(tq - 1, tk - 1 - lo)
  k_first = 0 if lo is None else max(0, q_first + lo)
  k_last = tk - 1 if hi is None else min(tk - 1, q_last + hi)
  nq, nk = q_last - q_first + 1, k_last - k_first + 1
  shift = q_first - k_first
  lo = None if lo is None else lo + shift
  hi = None if hi is None else hi + shift
  # Bounds that no row reaches are dropped: the upper one if the first row already sees the last
  # key, the lower one if the last row still sees the first key.
  if hi is not None and hi >= nk - 1:
    hi = None
  if lo is not None and nq - 1 + lo <= 0:
    lo = None

  if hi is None:
    if lo is not None:
      # A window bounded on the left only. jax passes it to cuDNN as local_window_size=(left, 0)
      # without is_causal, and cuDNN then also attends to every later key: the result is
      # silently wrong (https://github.com/jax-ml/jax/pull/39576). It is never requested here.
      raise NotImplementedError(
          "cuDNN does not support a sliding window without a causal upper bound (a window bounded "
          "on the left only); jax's cuDNN path would attend to future keys (jax-ml/jax#39576)")
    plan_ = Plan(q_first, q_last + 1, k_first, k_last + 1, 0, False, None, useful, nq * nk)
  else:
    if nq + hi != nk:
      # The last rows' bands run past the last key (a two-sided window in self attention, a
      # top-left causal mask with q_len > kv_len): the padded problem would have more query rows
      # than keys, where top-left and bottom-right causal alignment differ.
      raise NotImplementedError(
          f"cuDNN does not support {spec.mask!r} for q_len {tq}, kv_len {tk}: the bands of the last "
          f"{nq + hi - nk} query rows run past the last key, which needs a causal call with more "
          f"query rows than keys, where cuDNN's alignment is not pinned down")
    window = None if lo is None else hi - lo
    padded_rows = np.arange(nk, dtype=np.int64)
    computed = _band_pairs(padded_rows, None if window is None else -window, 0, nk)
    plan_ = Plan(q_first, q_last + 1, k_first, k_last + 1, hi, True, window, useful, computed)
  if plan_.work_ratio > config.max_work_ratio:
    raise NotImplementedError(
        f"cuDNN would compute {plan_.work_ratio:.2f}x the token pairs of {spec.mask!r} for q_len "
        f"{tq}, kv_len {tk} (query rows prepended to align the causal diagonal); "
        f"CudnnConfig.max_work_ratio is {config.max_work_ratio}")
  return plan_


# What attention() passes as jax.nn.dot_product_attention's implementation. Tests on a CPU set it
# to "xla", which computes the same masks (jax's own cuDNN tests compare the two).
_JAX_IMPLEMENTATION = "cudnn"


def apply(plan_: Plan, q, k, v, *, scale: float, implementation: str = "cudnn"):
  """Runs ``plan_`` on ``jax.nn.dot_product_attention(implementation=implementation)``.

  Args:
    q: ``[B, Tq, Hq, D]``; k, v: ``[B, Tk, Hkv, D]``.

  Returns:
    ``[B, Tq, Hq, D]`` in the dtype of ``q``; rows outside ``[q_start, q_stop)`` are zero.
  """
  tq = q.shape[1]
  qs = q[:, plan_.q_start:plan_.q_stop]
  if plan_.pad_q:
    qs = jnp.pad(qs, ((0, 0), (plan_.pad_q, 0), (0, 0), (0, 0)))
  ks, vs = k[:, plan_.kv_start:plan_.kv_stop], v[:, plan_.kv_start:plan_.kv_stop]
  out = jax.nn.dot_product_attention(
      qs, ks, vs, scale=scale, is_causal=plan_.is_causal,
      local_window_size=None if plan_.window is None else (plan_.window, 0),
      implementation=implementation)
  out = out[:, plan_.pad_q:]
  return jnp.pad(out, ((0, 0), (plan_.q_start, tq - plan_.q_stop), (0, 0), (0, 0)))


def _check_nvidia_gpu() -> None:
  platform = dispatch.current_platform()
  if platform != "gpu":
    raise NotImplementedError(f"cuDNN needs an NVIDIA GPU; jax's default backend here is {platform!r}")
  version = str(getattr(jax_backend.get_backend(), "platform_version", "")).lower()
  if "rocm" in version:
    raise NotImplementedError("cuDNN needs an NVIDIA GPU; this GPU runs ROCm")


def _check_sequence_unsharded() -> None:
  # Under the project's sharding rules (attn_jax.sharding.use_rules), XLA partitions the cuDNN
  # call with jax's custom partitioning, which takes batch and head sharding but raises at
  # compile time for a sharded sequence; the Pallas kernels then serve the call instead.
  active = sharding_lib.current()
  if active is None:
    return
  mesh, rules = active
  axes = [a for a in rules.mesh_axes("seq") if mesh.shape.get(a, 1) > 1]
  if axes:
    raise NotImplementedError(f"cuDNN does not support a sequence sharded over mesh axes {axes} "
                              f"(jax's cuDNN partitioning takes batch and head sharding only)")


def attention(q, k, v, sinks, q_segment_ids, kv_segment_ids, block_mask=None, *, spec: common.Spec,
              config: CudnnConfig | None = None):
  """The ``cudnn`` backend of :func:`attn_jax.attention` (see the module docstring).

  Returns ``(out [B, Tq, Hq, D], None)``: the log-sum-exp is refused in :func:`plan`.
  """
  del sinks, q_segment_ids, kv_segment_ids  # plan() refuses calls that have them.
  if block_mask is not None:
    raise NotImplementedError("a traced block_mask (cuDNN takes no per-row block lists)")
  if config is not None and not isinstance(config, CudnnConfig):
    raise ValueError(f"config must be a CudnnConfig for the cudnn backend, got {type(config).__name__}")
  plan_ = plan(spec, config)
  if jnp.dtype(q.dtype) not in [jnp.dtype(t) for t in DTYPES]:
    raise NotImplementedError(f"cuDNN flash attention takes bfloat16 or float16 inputs, got {q.dtype}")
  _check_sequence_unsharded()
  _check_nvidia_gpu()
  try:
    out = apply(plan_, q, k, v, scale=spec.scale, implementation=_JAX_IMPLEMENTATION)
  except NotImplementedError as e:
    # jax's own trace-time checks: head dims above 128 before Hopper, and under differentiation
    # odd sequence lengths ("Unsupported sequence length Q 1, KV 4096" in jax 0.10 and 0.11).
    # (Caught before RuntimeError, of which NotImplementedError is a subclass.)
    raise NotImplementedError(f"jax's cuDNN path refused the call: {e}") from e
  except RuntimeError as e:
    # jax raises RuntimeError when its CUDA plugin finds no cuDNN library: on such a machine the
    # call cannot be served, and dispatch must move on to the Pallas kernel.
    if "cudnn" not in str(e).lower():
      raise
    raise NotImplementedError(f"cuDNN is not usable in this installation: {e}") from e
  return out, None
