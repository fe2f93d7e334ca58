"""HyperAttention, the ``"hyper"`` mixer: sorted angular LSH blocks plus uniformly sampled key
columns, merged by LSE, with the causal recursion (:func:`attn_jax.mechanisms.hyper_attention`).

Our choices: the ``num_projections`` LSH hyperplanes are fixed (drawn from ``seed`` and the layer
index, not trained, as in the paper); the sampled columns come from the same seed unless the
model passes a fresh PRNG key as the input ``hyper_key`` (then each call resamples). Block size
and sample count are capped at the sequence length. A causal sequence whose recursion does not
halve into whole blocks is padded at the end with zero tokens (which no real query sees).

No decoding: HyperAttention approximates the attention matrix of a whole sequence (its sorted
blocks and the causal recursion cut the query axis), which a token-by-token decoder does not
have; the paper applies it to prompts, with exact attention for generation. Not built here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attn_jax import mechanisms
from attn_jax.layers import registry
from attn_jax.layers.mixers import common


@dataclasses.dataclass(frozen=True, kw_only=True)
class HyperConfig(registry.MixerConfig):
  """HyperAttention (shared fields: :class:`~attn_jax.layers.MixerConfig`).

  Attributes:
    block_size: queries per sorted block (capped at the sequence length; it must divide the
      nodes of the causal recursion above ``min_seq_len``).
    sample_size: sampled key columns per node (capped at the key length).
    num_projections: LSH hyperplanes ``r`` (``2^r`` buckets), in ``[1, 30]``.
    min_seq_len: nodes of at most this many queries are exact (None: ``4 * block_size``).
    seed: seed of the hyperplanes and of the default column samples.
  """

  block_size: int = 256
  sample_size: int = 256
  num_projections: int = 7
  min_seq_len: int | None = None
  seed: int = 0

  def validate(self):
    super().validate()
    self.check_positive("block_size", "sample_size", "num_projections", allow_none=False)
    self.check_positive("min_seq_len")
    if self.num_projections > 30:
      raise self.error(f"num_projections must be in [1, 30], got {self.num_projections}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int):
      raise self.error(f"seed must be an int, got {self.seed!r}")


class HyperAttention(common.SparseAttention):
  """Projections, RoPE and :func:`attn_jax.mechanisms.hyper_attention` (mixer protocol)."""

  NO_DECODE = ("HyperAttention approximates a whole sequence's attention (sorted blocks, causal "
               "recursion over the query axis); generation with it is not built")

  def hashing(self, head_dim: int, hyper_key=None):
    """``(projections [D, r], sample key)`` of this layer."""
    c = self.config
    base = jax.random.fold_in(jax.random.PRNGKey(c.seed), self.layer_index)
    projections = jax.random.normal(jax.random.fold_in(base, 0), (head_dim, c.num_projections))
    return projections, jax.random.fold_in(base, 1) if hyper_key is None else hyper_key

  def padded_length(self, seq_len: int) -> int:
    """The length the causal recursion runs on: ``seq_len`` rounded up until every node above
    ``min_seq_len`` halves into whole blocks (``seq_len`` itself when it does)."""
    c = self.config
    bs = min(c.block_size, seq_len)
    min_len = 4 * bs if c.min_seq_len is None else c.min_seq_len
    if not c.causal or seq_len <= min_len:
      return seq_len

    def fits(n):
      while n > min_len:
        if n % 2 or (n // 2) % bs:
          return False
        n //= 2
      return n % bs == 0

    unit = bs
    while not fits(-(-seq_len // unit) * unit):
      unit *= 2
      if unit > 2 * seq_len * bs:
        raise self.config.error(f"no padded length of {seq_len} halves into blocks of {bs} down to "
                                f"min_seq_len={min_len}: set min_seq_len >= block_size")
    return -(-seq_len // unit) * unit

  def attend(self, q, k, v, *, hyper_key=None, **unused):
    c = self.config
    t = q.shape[1]
    projections, key = self.hashing(q.shape[-1], hyper_key)
    # Causal: zero tokens appended at the end are keys no real query sees (every node that
    # holds them holds only padded queries above them), so they change the blocks, not the rows.
    pad = self.padded_length(t) - t
    if pad:
      q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
    out = mechanisms.hyper_attention(q, k, v, projections, key, block_size=min(c.block_size, t),
                                     sample_size=min(c.sample_size, t), causal=c.causal,
                                     min_seq_len=c.min_seq_len, implementation=c.implementation)
    return out[:, :t]


registry.register(registry.MixerEntry(
    name="hyper",
    config=HyperConfig,
    layer=HyperAttention,
    family="softmax",
    cache=None,
    uses_rope=True,
    description="HyperAttention: angular-LSH sorted diagonal blocks + uniformly sampled columns merged by "
                "LSE, causal recursion, exact below min_seq_len; no decoding (whole-sequence approximation)",
    paper="Han et al. 2024, HyperAttention: long-context attention in near-linear time (arXiv:2310.05869)",
    quality=(registry.QualityPreset(
        "hyper", lambda t: dict(block_size=max(4, t.seq_len // 16), sample_size=max(4, t.seq_len // 16),
                                min_seq_len=max(4, t.seq_len // 4)),
        description="blocks and samples of seq_len / 16, exact below seq_len / 4"),),
    efficiency=(registry.EfficiencyPreset(
        "hyper256 (xla)", (("implementation", "xla"), ("block_size", 256), ("sample_size", 256),
                           ("min_seq_len", 1024)), patterns=("causal_self",), default=False, quality="hyper"),),
))
