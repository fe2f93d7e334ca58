"""PowerAttention, the ``"power"`` mixer: softmax attention under
:func:`attn_jax.masks.power_attention` (block distances 0 .. window, powers of two, sink blocks).

The pattern depends on positions only, so it is a static mask and the layer is the softmax
mixer with that mask: every backend of :func:`attn_jax.attention`, and exact decoding from a
:class:`~attn_jax.layers.cache.KVCache` (the mask is evaluated at each step's position).
"""

from __future__ import annotations

import dataclasses

from attn_jax import masks as masks_lib
from attn_jax.layers import cache as cache_lib
from attn_jax.layers import registry
from attn_jax.layers.mixers import softmax

_SHARED = tuple(f.name for f in dataclasses.fields(registry.MixerConfig))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PowerConfig(registry.MixerConfig):
  """PowerAttention (causal; shared fields: :class:`~attn_jax.layers.MixerConfig`).

  Attributes:
    block_size: positions per block.
    window_blocks: blocks of local window, the query's own block included.
    sink_blocks: leading blocks every query sees.
  """

  block_size: int = 64
  window_blocks: int = 1
  sink_blocks: int = 1

  def validate(self):
    super().validate()
    self.check_causal_only()
    self.check_positive("block_size", "window_blocks", allow_none=False)
    if isinstance(self.sink_blocks, bool) or not isinstance(self.sink_blocks, int) or self.sink_blocks < 0:
      raise self.error(f"sink_blocks must be an int >= 0, got {self.sink_blocks!r}")

  def softmax_config(self) -> softmax.SoftmaxConfig:
    """The softmax mixer's config with this mask and the shared fields."""
    mask = masks_lib.power_attention(self.block_size, self.window_blocks, self.sink_blocks)
    return softmax.SoftmaxConfig(mask=mask, **{n: getattr(self, n) for n in _SHARED})


class PowerAttention(softmax.SoftmaxAttention):
  """The softmax mixer under the PowerAttention mask (mixer protocol)."""

  def __init__(self, config: PowerConfig, dim: int, **kw):
    self.power_config = config
    super().__init__(config.softmax_config(), dim, **kw)

  def project(self, x, positions):
    """``x [B, T, C]`` -> rotated ``q``, ``k`` and ``v`` (as the training call computes them)."""
    q, k, v = self._qkv(x)
    return self._rope(q, positions), self._rope(k, positions), v

  def output(self, out):
    """``[B, T, Hq, Dv]`` -> ``[B, T, C]``."""
    return self.proj.o_proj(out)


registry.register(registry.MixerEntry(
    name="power",
    config=PowerConfig,
    layer=PowerAttention,
    family="softmax",
    cache=cache_lib.KVCache,
    uses_rope=True,
    description="PowerAttention: causal blocks at power-of-two block distances plus a local window and "
                "sink blocks (a static mask: O(T log T), exact decoding)",
    paper="Chen et al. 2025, PowerAttention: exponentially scaling of receptive fields for effective "
          "sparse attention",
    quality=(registry.QualityPreset(
        "power", lambda t: dict(block_size=max(2, t.seq_len // 32)),
        description="blocks of seq_len / 32, own block as window, one sink block"),),
    efficiency=(registry.EfficiencyPreset(
        "power64 (xla)", (("implementation", "xla"), ("block_size", 64)), patterns=("causal_self",),
        default=False, quality="power"),),
))
