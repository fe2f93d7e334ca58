"""Autoregressive generation with per-layer decoding caches: greedy, temperature, top-k, top-p.

Works with any model that has ``init_cache(batch, max_len)``, ``prefill(tokens, cache, **inputs)
-> (logits, cache)`` and ``decode(token, cache, *, position) -> (logits, cache)``
(:class:`~attn_jax.models.lm.DecoderLM`, :class:`~attn_jax.models.encdec.EncoderDecoder`).
The prompt is prefilled in one call through ``attn_jax.attention`` (the chunked / flash path of
the platform); the new tokens come from a ``lax.scan`` of single-token steps, so the whole
generation is one compiled program. Every layer's cache is the pytree its mechanism chose: a
rolling KV cache keeps ``num_sink_tokens + window`` slots, a linear layer a fixed-size state, so
their memory does not grow with the number of generated tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax import sharding


def _check_sampling(temperature, top_k, top_p):
  if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
    raise ValueError(f"temperature must be a float >= 0 (0 is greedy), got {temperature!r}")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
  if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
    raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def sample_logits(logits, rng, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None):
  """Draws one token per row of ``logits [B, V]``.

  ``temperature == 0`` is greedy (argmax). Otherwise the logits are divided by the temperature,
  restricted to the ``top_k`` largest, then to the smallest set whose probability reaches
  ``top_p`` (nucleus; the most likely token is always kept), and sampled.

  Returns:
    ``[B]`` int32 tokens.
  """
  _check_sampling(temperature, top_k, top_p)
  logits = logits.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k is not None and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p is not None and top_p < 1:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is below top_p: the first token always stays.
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = before < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, neg)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "return_logits", "mesh", "rules"))
def _generate(graphdef, state, prompt, rng, inputs, *, max_len, max_new_tokens, temperature, top_k,
              top_p, return_logits, mesh, rules):
  if mesh is None:
    return _generate_body(graphdef, state, prompt, rng, inputs, max_len, max_new_tokens, temperature,
                          top_k, top_p, return_logits)
  with sharding.use_rules(mesh, rules):
    return _generate_body(graphdef, state, prompt, rng, inputs, max_len, max_new_tokens, temperature,
                          top_k, top_p, return_logits)


def _generate_body(graphdef, state, prompt, rng, inputs, max_len, max_new_tokens, temperature, top_k,
                   top_p, return_logits):
  model = nnx.merge(graphdef, state)
  b, t = prompt.shape
  cache = model.init_cache(b, max_len)
  logits, cache = model.prefill(prompt, cache, **inputs)
  last = logits[:, -1]
  rng, sub = jax.random.split(rng)
  first = sample_logits(last, sub, temperature=temperature, top_k=top_k, top_p=top_p)

  def step(carry, i):
    token, cache, rng = carry
    logits, cache = model.decode(token, cache, position=t + i)
    rng, sub = jax.random.split(rng)
    nxt = sample_logits(logits, sub, temperature=temperature, top_k=top_k, top_p=top_p)
    return (nxt, cache, rng), (nxt, logits if return_logits else None)

  (_, cache, _), (tokens, step_logits) = jax.lax.scan(
      step, (first, cache, rng), jnp.arange(max_new_tokens - 1, dtype=jnp.int32))
  tokens = jnp.concatenate([first[:, None], tokens.T], axis=1)
  if return_logits:
    step_logits = jnp.concatenate([last[:, None], step_logits.transpose(1, 0, 2)], axis=1)
  return tokens, step_logits, cache


def generate(model, prompt, *, max_new_tokens: int, rng=None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, return_logits: bool = False,
             return_cache: bool = False, mesh=None, rules=None, **inputs):
  """Generates ``max_new_tokens`` tokens after ``prompt``.

  Args:
    model: a model with ``init_cache`` / ``prefill`` / ``decode`` (see the module docstring).
    prompt: ``[B, T]`` int tokens, ``T >= 1``; every row has the same length.
    max_new_tokens: number of tokens to generate (``>= 1``).
    rng: PRNG key for sampling (required when ``temperature > 0``).
    temperature, top_k, top_p: sampling controls (see :func:`sample_logits`); ``temperature=0``
      is greedy decoding.
    return_logits: also return the logits that produced each new token, ``[B, N, V]``.
    return_cache: also return the final cache pytree.
    mesh, rules: shard the generation on a mesh (:func:`attn_jax.sharding.make_mesh`) with
      logical-axis rules (default :func:`attn_jax.sharding.default_rules`): activations and KV
      caches split by batch and heads; parameters stay where they are (e.g. as placed by
      :func:`attn_jax.models.train.init`).
    **inputs: extra prefill inputs (``source=``, ``source_mask=`` for the encoder-decoder).

  Returns:
    ``tokens [B, max_new_tokens]`` int32, followed by the logits and/or the cache when asked.
  """
  if not hasattr(prompt, "shape") or prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must have shape [batch, prompt_len >= 1], got {getattr(prompt, 'shape', prompt)!r}")
  if not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt must hold integer tokens, got dtype {prompt.dtype}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  _check_sampling(temperature, top_k, top_p)
  if rng is None:
    if temperature > 0:
      raise ValueError("rng is required when temperature > 0")
    rng = jax.random.PRNGKey(0)
  graphdef, state = nnx.split(model)
  tokens, logits, cache = _generate(
      graphdef, state, prompt, rng, inputs, max_len=prompt.shape[1] + max_new_tokens,
      max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
      top_p=None if top_p is None else float(top_p), return_logits=return_logits, mesh=mesh,
      rules=(rules or sharding.default_rules()) if mesh is not None else None)
  out = (tokens,)
  if return_logits:
    out += (logits,)
  if return_cache:
    out += (cache,)
  return out[0] if len(out) == 1 else out
