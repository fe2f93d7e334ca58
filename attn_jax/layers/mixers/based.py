"""Based's three token mixers in one layer, the ``"based"`` mixer.

``xc = x + short_conv(x)`` (causal depthwise, width ``conv_size``); then the sum of a
normalised Taylor linear attention on ``feature_dim``-wide queries and keys
(:func:`attn_jax.mechanisms.based_linear_attention`: global, constant state) and causal softmax
attention over the last ``window`` tokens (local, exact), followed by the output projection.
(The Based paper interleaves these mixers across layers; here they sit side by side so that one
layer, and one registry entry, has all three.)

Decoding keeps a :class:`BasedCache`: the convolution's last ``conv_size - 1`` inputs, the
linear state ``[B, H, 1 + f + f^2, Dv + 1]`` and a rolling KV cache of ``window`` slots, so its
size does not grow with the generation: Based's recall-throughput trade-off is set by
``feature_dim`` and ``window``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import attn_jax
from attn_jax import masks as masks_lib
from attn_jax import mechanisms
from attn_jax.layers import cache as cache_lib
from attn_jax.layers import nn
from attn_jax.layers import registry
from attn_jax.layers.mixers import common
from attn_jax.layers.mixers import linear
from attn_jax.layers.mixers import short_conv


@dataclasses.dataclass(frozen=True, kw_only=True)
class BasedConfig(registry.MixerConfig):
  """Based (causal; no GQA; ``rope`` is not used).

  Attributes:
    feature_dim: width of the linear attention's queries and keys per head (Based: 16, giving
      ``1 + 16 + 256 = 273`` Taylor features).
    window: tokens of the local softmax attention (the query and the ``window - 1`` before it).
    conv_size: width of the short convolution.
    chunk_size: chunk size of the linear attention (None: the backend's default).
  """

  feature_dim: int = 16
  window: int = 64
  conv_size: int = 3
  chunk_size: int | None = None

  def validate(self):
    super().validate()
    self.check_causal_only()
    self.check_no_grouped_heads()
    self.check_positive("feature_dim", "window", "conv_size", allow_none=False)
    self.check_positive("chunk_size")


@dataclasses.dataclass(frozen=True)
class BasedCache:
  """Based's decoding state: ``conv [B, conv_size - 1, C]`` (the last inputs), ``state`` (the
  Taylor linear attention's ``[B, H, F, Dv + 1]``) and ``window`` (a rolling KV cache)."""

  conv: jax.Array
  state: jax.Array
  window: cache_lib.KVCache


jax.tree_util.register_dataclass(BasedCache, data_fields=["conv", "state", "window"], meta_fields=[])


class BasedAttention(nnx.Module):
  """Short convolution + Taylor linear attention + sliding-window softmax (mixer protocol)."""

  def __init__(self, config: BasedConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    del layer_index, num_layers
    self.config = config
    h, d, f = config.num_heads, config.head_dim_for(dim), config.feature_dim
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    dense = lambda width: nn.Dense(dim, (h, width), in_axes=("embed",), out_axes=("heads", "head_dim"), **kw)
    self.lin_q, self.lin_k, self.lin_v = dense(f), dense(f), dense(d)
    self.win_q, self.win_k, self.win_v = dense(d), dense(d), dense(d)
    # Zero: the layer starts as if without the convolution, which it learns to use.
    self.conv = nnx.Param(jnp.zeros((config.conv_size, dim), param_dtype), logical_axes=("conv", "embed"))
    self.out = nn.Dense((h, d), dim, in_axes=("heads", "head_dim"), out_axes=("embed",), **kw)
    self.mask = masks_lib.sliding_window(config.window - 1)

  def _conv(self, x, history=None, segment_ids=None):
    return x + mechanisms.short_conv(x, self.conv[...].astype(self.dtype), history=history,
                                     segment_ids=segment_ids)

  def _linear_qkv(self, xc):
    return common.heads(self.lin_q, xc), common.heads(self.lin_k, xc), common.heads(self.lin_v, xc)

  def _window_qkv(self, xc):
    return common.heads(self.win_q, xc), common.heads(self.win_k, xc), common.heads(self.win_v, xc)

  def _linear(self, q, k, v, **kw):
    c = self.config
    return mechanisms.based_linear_attention(q, k, v, chunk_size=c.chunk_size, implementation=c.implementation,
                                             **kw)

  def _out(self, linear_out, local_out):
    return self.out(linear_out + local_out.astype(linear_out.dtype))

  def __call__(self, x, *, segment_ids=None, **unused):
    """``x [B, T, C]`` -> ``[B, T, C]``; ``segment_ids`` keep packed documents apart in all three."""
    xc = self._conv(x, segment_ids=segment_ids)
    lin = self._linear(*self._linear_qkv(xc), segment_ids=segment_ids)
    local = attn_jax.attention(*self._window_qkv(xc), mask=self.mask, q_segment_ids=segment_ids,
                               kv_segment_ids=segment_ids)
    return self._out(lin, local)

  def init_cache(self, batch: int, max_len: int, dtype) -> BasedCache:
    del max_len
    c = self.config
    d = self.lin_v.kernel[...].shape[-1]
    features = 1 + c.feature_dim + c.feature_dim ** 2
    return BasedCache(
        conv=jnp.zeros((batch, c.conv_size - 1, self.conv[...].shape[1]), dtype),
        state=jnp.zeros((batch, c.num_heads, features, d + 1), jnp.float32),
        window=cache_lib.KVCache.create(batch, 0, c.num_heads, d, d, dtype, window=c.window))

  def prefill(self, x, cache: BasedCache, **unused):
    xc = self._conv(x, history=cache.conv)
    lin, state = self._linear(*self._linear_qkv(xc), initial_state=cache.state, return_final_state=True)
    q, k, v = self._window_qkv(xc)
    local = attn_jax.attention(q, k, v, mask=self.mask)
    new = BasedCache(short_conv.advance(cache.conv, x), state, cache.window.fill(k, v).constrained())
    return self._out(lin, local), new

  def decode(self, x, cache: BasedCache, *, position, **unused):
    position = jnp.asarray(position, jnp.int32)
    xc = self._conv(x, history=cache.conv)
    q, k, v = self._linear_qkv(xc)
    state, lin = linear.step_fn("based")(cache.state, q[:, 0], k[:, 0], v[:, 0], feature_map="taylor",
                                         normalize=True)
    wq, wk, wv = self._window_qkv(xc)
    window = cache.window.append(wk, wv, position).constrained()
    local = common.attend_cache(wq, window.k, window, position, self.mask)
    new = BasedCache(short_conv.advance(cache.conv, x), state, window)
    return self._out(lin[:, None], local), new


registry.register(registry.MixerEntry(
    name="based",
    config=BasedConfig,
    layer=BasedAttention,
    family="linear",
    cache=BasedCache,
    requires=(linear.PRIMITIVE,),
    description="short convolution + second-order Taylor linear attention + sliding-window softmax "
                "(implementation= selects the linear part's backend)",
    paper="Arora et al. 2024, Simple linear attention language models balance the recall-throughput "
          "tradeoff (arXiv:2402.18668)",
    quality=(
        registry.QualityPreset("based", lambda t: dict(window=max(4, t.seq_len // 8)),
                               description="Based: Taylor linear attention (feature dim 16), window "
                                           "seq_len / 8, convolution of width 3"),
        # The paper sweeps the feature dim (8 to 24) along its recall-throughput curve; 8 (73
        # Taylor features) costs a third of 16's CPU time, which keeps the CPU default short.
        registry.QualityPreset("based_f8", lambda t: dict(window=max(4, t.seq_len // 8), feature_dim=8),
                               default=True, description="Based with feature dim 8, the smallest of the "
                                                         "paper's sweep (the CPU default's Based)"),
    ),
    efficiency=(registry.EfficiencyPreset("based (xla)", (("implementation", "xla"),), patterns=("causal_self",),
                                          default=False, quality="based"),),
))
