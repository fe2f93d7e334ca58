"""Compile-check cases of the traced BlockMask on the Pallas GPU kernel, loaded with
``python -m attn_jax.compile_check --cases-module attn_jax.compile_check.traced_cases
--kernels softmax_traced --targets h100``.

The mask is built inside the compiled function from the inputs (pooled block scores and a
top-k), so the kernel is lowered with traced block lists, forward and backward (the dK/dV pass
walks the compressed transposed lists). GPU only: the TPU kernel does not take a traced mask
(its packed step schedule is built on the host).
"""

from __future__ import annotations

from typing import Iterator

from attn_jax.compile_check import cases


def _topk(block_size: int, top_k: int):
  def call(platform, x):
    import attn_jax
    return attn_jax.topk_block_attention(x["q"], x["k"], x["v"], block_size=block_size, top_k=top_k,
                                         config=attn_jax.PallasGpuConfig(interpret=False))
  return call


def _window_scores(block: int, top_k: int):
  """A traced selection under a static sliding window, non-causal rows kept by ``keep``."""
  def call(platform, x):
    import attn_jax
    import jax.numpy as jnp
    from attn_jax import block_mask_traced
    from attn_jax import masks
    q, k, v = x["q"], x["k"], x["v"]
    t = q.shape[1]
    n = -(-t // block)
    pad = n * block - t
    pool = lambda a: jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(a.shape[0], n, block, *a.shape[2:]).mean(2)
    scores = jnp.einsum("bihd,bjhd->bhij", pool(q).astype(jnp.float32), pool(k).astype(jnp.float32))
    mask = masks.sliding_window(4 * block, 4 * block)
    bm = block_mask_traced.from_scores(scores, top_k, q_len=t, kv_len=t, block_q=block, block_kv=block, mask=mask,
                                       keep=masks.sliding_window(0, 0))
    return attn_jax.attention(q, k, v, block_mask=bm, config=attn_jax.PallasGpuConfig(interpret=False))
  return call


def _traced_cases() -> Iterator[cases.Case]:
  t = 1021
  yield cases.Case("softmax_traced", "topk-causal-gqa-d128-bf16", 128, "bfloat16",
                   inputs=(cases.Input("q", (1, t, 8, 128), "bfloat16"), cases.Input("k", (1, t, 2, 128), "bfloat16"),
                           cases.Input("v", (1, t, 2, 128), "bfloat16")),
                   grad=("q", "k", "v"), call=_topk(64, 4), platforms=("gpu",), quick=True,
                   note="topk_block_attention: block 64, top 4 + own block, GQA 8/2, 1021 tokens")
  yield cases.Case("softmax_traced", "topk-causal-d64-f32", 64, "float32",
                   inputs=tuple(cases.Input(n, (2, t, 4, 64), "float32") for n in "qkv"),
                   grad=("q", "k", "v"), call=_topk(32, 8), platforms=("gpu",),
                   note="topk_block_attention: block 32, top 8, batch 2, float32")
  yield cases.Case("softmax_traced", "scores-window-mha-d64-bf16", 64, "bfloat16",
                   inputs=tuple(cases.Input(n, (1, t, 4, 64), "bfloat16") for n in "qkv"),
                   grad=("q", "k", "v"), call=_window_scores(64, 3), platforms=("gpu",),
                   note="from_scores top 3 per query head under a static +-256 window, diagonal kept")


cases.register_family("softmax_traced", _traced_cases)
