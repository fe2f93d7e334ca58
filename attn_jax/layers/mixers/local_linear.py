"""Local Linear Attention, the ``"local_linear"`` mixer (Zuo et al. 2025, Sec. 3).

Per query, a kernel-weighted local *linear* regression of the values on the keys, evaluated at
the query (softmax attention is the local constant fit):
``o_i = v_bar - C_kv^T (C_kk + (2 lam / Z) I)^{-1} (k_bar - q_i)``, computed from moments that
one ``attn_jax.attention`` call returns (:func:`attn_jax.mechanisms.local_linear_attention`,
``O(T (D^2 + D Dv))`` memory). ``ridge`` is the paper's ``lambda``: large, softmax attention;
small, a sharper local regression. Cost grows with ``head_dim^2``: use small heads.

No RoPE: the fit regresses on ``k_j - q_i``, which rotations by different positions would
distort. Not yet: decoding (a KV cache of keys and values plus one moment call per step)
raises ``NotImplementedError``; packed documents (``segment_ids``) are refused.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from attn_jax import masks as masks_lib
from attn_jax import mechanisms
from attn_jax.layers import registry
from attn_jax.layers.mixers import common


@dataclasses.dataclass(frozen=True, kw_only=True)
class LocalLinearConfig(registry.MixerConfig):
  """Local Linear Attention (GQA allowed; causal or not; ``rope`` unused).

  Attributes:
    ridge: the regression's ``lambda > 0``.
  """

  ridge: float = 1.0

  def validate(self):
    super().validate()
    r = self.ridge
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0:
      raise self.error(f"ridge must be a positive float, got {r!r}")


class LocalLinearAttention(nnx.Module):
  """Local linear attention (mixer protocol without decoding)."""

  def __init__(self, config: LocalLinearConfig, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, layer_index: int = 0, num_layers: int = 1):
    del layer_index, num_layers
    self.config = config
    self.proj = common.Projections(config, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.mask = masks_lib.causal() if config.causal else masks_lib.full()

  def __call__(self, x, *, segment_ids=None, **unused):
    """``x [B, T, C]`` -> ``[B, T, C]``."""
    common.no_segments("local_linear", segment_ids)
    q, k, v = self.proj.qkv(x)
    o = mechanisms.local_linear_attention(q, k, v, ridge=float(self.config.ridge), mask=self.mask,
                                          implementation=self.config.implementation)
    return self.proj.o_proj(o)

  def init_cache(self, batch: int, max_len: int, dtype):
    raise NotImplementedError("mixer 'local_linear' does not decode yet (a step would need the moments of "
                              "its cached keys and values); use the full call")


registry.register(registry.MixerEntry(
    name="local_linear",
    config=LocalLinearConfig,
    layer=LocalLinearAttention,
    family="softmax",
    cache=None,
    description="local linear attention: per query, a kernel-weighted ridge regression of values on keys "
                "(interpolates softmax and linear attention), moments from one attention call; no decoding yet",
    paper="Zuo et al. 2025, Local linear attention: an optimal interpolation of linear and softmax attention "
          "for test-time regression",
    quality=(registry.QualityPreset("local_linear", description="local linear attention, ridge 1"),),
    efficiency=(registry.EfficiencyPreset("local_linear (xla)", (("implementation", "xla"),),
                                          patterns=("causal_self",), default=False, quality="local_linear"),),
))
