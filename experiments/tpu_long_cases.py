"""Long-context TPU compile cases, a ``--cases-module`` for the compile check::

    python -m attn_jax.compile_check --cases-module experiments.tpu_long_cases \\
        --kernels softmax_long --targets v5e,v6e --tpu-python /work/venvs/tpu/bin/python

Family ``softmax_long``: the flash kernels at the lengths where the old int32 block lists ran out
of TPU scalar memory (``long-*``), and the issue's targets (``target-*``). Batch 1, head dim 128,
bfloat16, default tiling. The reported compile time includes building the BlockMask and the step
schedule on the host (both happen while tracing).
"""

from __future__ import annotations

from attn_jax.compile_check import cases as cases_lib
from attn_jax.compile_check.cases import FWD, FWD_BWD, Case, Input

_D = 128
_DTYPE = "bfloat16"


def _call(mask_fn):
  def call(platform, x):
    import attn_jax
    return attn_jax.attention(x["q"], x["k"], x["v"], mask=mask_fn(),
                              config=attn_jax.PallasTpuConfig(interpret=False))
  return call


def _causal():
  from attn_jax import masks
  return masks.causal()


def _window_4096():
  from attn_jax import masks
  return masks.sliding_window(4095)


def _window_sinks():
  from attn_jax import masks
  return masks.sliding_window(4095) | masks.sink_tokens(4)


def _per_head_windows():
  # Windows of 1k-4k tokens over 32 query heads: four distinct masks, one stored structure each.
  from attn_jax import masks
  return masks.per_head([masks.sliding_window(1024 * (1 + h % 4) - 1) for h in range(32)])


def _causal_window_mix():
  from attn_jax import masks
  return masks.per_head([masks.causal() if h % 2 == 0 else masks.sliding_window(4095) for h in range(16)])


def _case(name, t, heads, mask_fn, modes, note):
  inputs = tuple(Input(n, (1, t, heads, _D), _DTYPE) for n in "qkv")
  return Case("softmax_long", name, _D, _DTYPE, inputs=inputs, grad=("q", "k", "v"), call=_call(mask_fn),
              modes=modes, platforms=("tpu",), note=note)


def _cases():
  both = (FWD, FWD_BWD)
  # Failed on main with "Ran out of memory in memory space smem" (v5e).
  yield _case("long-causal-262k", 262_144, 2, _causal, both, "causal, 262,144 tokens, 2 heads")
  yield _case("long-window4096-1m", 1_048_576, 2, _window_4096, both,
              "sliding window of 4096 tokens, 1,048,576 tokens, 2 heads")
  yield _case("long-perhead32-32k", 32_768, 32, _per_head_windows, both,
              "per-head windows 1k-4k, 32 heads, 32,768 tokens")
  # The targets (item 3).
  yield _case("target-causal-1m", 1_048_576, 1, _causal, both, "causal, 1,048,576 tokens, 1 head")
  yield _case("target-window-sinks-4m", 4_194_304, 1, _window_sinks, (FWD,),
              "window 4095 + 4 sink tokens, 4,194,304 tokens, 1 head")
  yield _case("target-window-sinks-1m", 1_048_576, 1, _window_sinks, (FWD_BWD,),
              "window 4095 + 4 sink tokens, 1,048,576 tokens, 1 head")
  yield _case("target-perhead32-131k", 131_072, 32, _per_head_windows, (FWD,),
              "per-head windows 1k-4k, 32 heads, 131,072 tokens")
  yield _case("target-mix16-65k", 65_536, 16, _causal_window_mix, (FWD_BWD,),
              "16 heads alternating causal / window 4095, 65,536 tokens")


cases_lib.register_family("softmax_long", _cases)


def _host_blockmask_seconds(length: int = 32_768, heads: int = 8, block: int = 1024) -> dict:
  """Seconds to build the BlockMask of a head-dependent ``from_fn`` mask (no analytic bounds:
  every token pair of every head is evaluated, in chunks) at the default v5e blocks."""
  import time
  from attn_jax import block_mask as bm_lib
  from attn_jax import masks
  fn = masks.from_fn(lambda q, k, h: (k <= q) & (k >= q - 1024 * (h + 1)), name="causal window 1k-8k by head")
  start = time.perf_counter()
  bm = bm_lib.make_block_mask(fn, length, length, block, block, num_heads=heads)
  seconds = time.perf_counter() - start
  return dict(length=length, heads=heads, block=block, seconds=round(seconds, 1),
              pairs=heads * length * length, tiles=bm.num_nonempty, structures=bm.num_masks)


if __name__ == "__main__":
  print(_host_blockmask_seconds())
