"""Model zoo (imports flax): decoder-only LM, ViT, encoder-decoder; generation and training.

Every model takes its token mixers as typed configs of the mixer registry
(:func:`attn_jax.layers.mixer_config`), so the mechanism is a config choice. Model code uses
logical axis names only; see :mod:`attn_jax.sharding` for the mapping to a device mesh.
"""

from attn_jax.models import encdec
from attn_jax.models import decoding
from attn_jax.models import lm
from attn_jax.models import train
from attn_jax.models import vit
from attn_jax.models.encdec import EncDecConfig, EncoderDecoder
from attn_jax.models.decoding import generate, sample_logits
from attn_jax.models.lm import DecoderLM, LMConfig
from attn_jax.models.vit import ViT, ViTConfig

__all__ = [
    "DecoderLM",
    "EncDecConfig",
    "EncoderDecoder",
    "LMConfig",
    "ViT",
    "ViTConfig",
    "decoding",
    "encdec",
    "generate",
    "lm",
    "sample_logits",
    "train",
    "vit",
]
