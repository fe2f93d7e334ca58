"""Autoregressive generation with per-layer decoding caches: greedy, temperature, top-k, top-p.

Works with any model that has ``init_cache(batch, max_len)``, ``prefill(tokens, cache, **inputs)
-> (logits, cache)`` and ``decode(token, cache, *, position) -> (logits, cache)``
(:class:`~attn_jax.models.lm.DecoderLM`, :class:`~attn_jax.models.encdec.EncoderDecoder`).
The prompt is prefilled in one call through ``attn_jax.attention`` (the chunked / flash path of
the platform); the new tokens come from a ``lax.scan`` of single-token steps, so the whole
generation is one compiled program. Ragged (right-padded) prompts prefill their common prefix
and feed the rest of each prompt through the same decode steps; ``eos_id`` pads every row after
its end-of-sequence token (see :func:`generate`). Every layer's cache is the pytree its
mechanism chose: a rolling KV cache keeps ``num_sink_tokens + window`` slots, a linear layer a
fixed-size state, so their memory does not grow with the number of generated tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
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


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "prefill_len", "max_new_tokens",
                                             "temperature", "top_k", "top_p", "return_logits",
                                             "eos_id", "pad_id", "mesh", "rules"))
def _generate(graphdef, state, prompt, lengths, rng, inputs, *, max_len, prefill_len, max_new_tokens,
              temperature, top_k, top_p, return_logits, eos_id, pad_id, mesh, rules):
  args = (graphdef, state, prompt, lengths, rng, inputs, max_len, prefill_len, max_new_tokens,
          temperature, top_k, top_p, return_logits, eos_id, pad_id)
  if mesh is None:
    return _generate_body(*args)
  with sharding.use_rules(mesh, rules):
    return _generate_body(*args)


def _generate_body(graphdef, state, prompt, lengths, rng, inputs, max_len, prefill_len, max_new_tokens,
                   temperature, top_k, top_p, return_logits, eos_id, pad_id):
  """``lengths is None``: every row is a full prompt (``prefill_len == T``). Otherwise the first
  ``prefill_len = min(lengths)`` tokens are prefilled and the rest of each prompt is fed by
  decode steps (teacher forcing) while the shorter rows already generate."""
  model = nnx.merge(graphdef, state)
  b, t = prompt.shape
  p = prefill_len
  cache = model.init_cache(b, max_len)
  logits, cache = model.prefill(prompt if p == t else prompt[:, :p], cache, **inputs)
  last = logits[:, -1]
  rng, sub = jax.random.split(rng)
  first = sample_logits(last, sub, temperature=temperature, top_k=top_k, top_p=top_p)

  def step(carry, i):
    token, cache, rng = carry
    if lengths is not None:
      # Rows whose prompt is not exhausted read their next prompt token instead of the sample.
      forced = jax.lax.dynamic_index_in_dim(prompt, jnp.minimum(p + i, t - 1), axis=1, keepdims=False)
      token = jnp.where(p + i < lengths, forced.astype(token.dtype), token)
    logits, cache = model.decode(token, cache, position=p + i)
    rng, sub = jax.random.split(rng)
    nxt = sample_logits(logits, sub, temperature=temperature, top_k=top_k, top_p=top_p)
    return (nxt, cache, rng), (nxt, logits if return_logits else None)

  # Equal-length prompts: max_new_tokens - 1 steps; ragged ones: t - p more.
  num_steps = max_new_tokens - 1 + (t - p)
  (_, cache, _), (tokens, step_logits) = jax.lax.scan(
      step, (first, cache, rng), jnp.arange(num_steps, dtype=jnp.int32))
  tokens = jnp.concatenate([first[:, None], tokens.T], axis=1)
  if return_logits:
    step_logits = jnp.concatenate([last[:, None], step_logits.transpose(1, 0, 2)], axis=1)
  if lengths is not None:
    # Column j holds the token predicted at position p - 1 + j; row r's own generation starts
    # after its prompt, at column lengths[r] - p.
    idx = (lengths - p)[:, None] + jnp.arange(max_new_tokens, dtype=jnp.int32)[None]
    tokens = jnp.take_along_axis(tokens, idx, axis=1)
    if return_logits:
      step_logits = jnp.take_along_axis(step_logits, idx[:, :, None], axis=1)
  if eos_id is None:
    gen_lengths = jnp.full((b,), max_new_tokens, jnp.int32)
  else:
    is_eos = tokens == eos_id
    after_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
    tokens = jnp.where(after_eos, jnp.int32(pad_id), tokens)
    gen_lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1,
                            max_new_tokens).astype(jnp.int32)
  return tokens, step_logits, cache, gen_lengths


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_token_id(name, value, vocab_size, allow_none):
  if value is None and allow_none:
    return None
  if not _is_int(value) or value < 0 or (vocab_size is not None and value >= vocab_size):
    bound = f"in [0, {vocab_size})" if vocab_size is not None else ">= 0"
    raise ValueError(f"{name} must be an int token id {bound}{' or None' if allow_none else ''}, "
                     f"got {value!r}")
  return int(value)


def _check_prompt_lengths(prompt_lengths, batch, t):
  """Host copy of ``prompt_lengths`` ``[batch]`` (values in ``[1, t]``)."""
  try:
    lengths = np.asarray(prompt_lengths)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
    raise ValueError("prompt_lengths must be concrete (a host or device array, not a traced value): "
                     "the prefill length min(prompt_lengths) is a static shape") from e
  if lengths.shape != (batch,):
    raise ValueError(f"prompt_lengths must have shape [batch] = ({batch},), got {lengths.shape}")
  if lengths.dtype == np.bool_ or not np.issubdtype(lengths.dtype, np.integer):
    raise ValueError(f"prompt_lengths must hold integers, got dtype {lengths.dtype}")
  if lengths.min() < 1 or lengths.max() > t:
    raise ValueError(f"prompt_lengths must be in [1, {t}] (1 <= length <= the padded prompt length), "
                     f"got {lengths.tolist()}")
  return lengths.astype(np.int32)


def generate(model, prompt, *, max_new_tokens: int, rng=None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, prompt_lengths=None,
             eos_id: int | None = None, pad_id: int = 0, return_logits: bool = False,
             return_cache: bool = False, return_lengths: bool = False, mesh=None, rules=None,
             **inputs):
  """Generates ``max_new_tokens`` tokens after each row's prompt.

  Ragged prompts: pass the rows right-padded to a common length ``T`` and their true lengths in
  ``prompt_lengths``. The common prefix ``min(prompt_lengths)`` is prefilled in one call; then
  every decode step feeds each row either its next prompt token (while its prompt lasts: teacher
  forcing) or its last sampled token, so every cache type (dense, rolling window + sinks, linear
  state, short convolution, cross attention) is used unchanged and each row equals generating it
  alone from its unpadded prompt (up to sampling randomness: rows share one key per step). It
  costs ``T - min(prompt_lengths)`` decode steps more than equal-length prompts. The padding
  values are never read.

  End of sequence: with ``eos_id``, every token after a row's first ``eos_id`` is replaced by
  ``pad_id``. The loop still runs all steps (static shapes); the logits returned after an EOS
  are those of the unmasked continuation.

  Args:
    model: a model with ``init_cache`` / ``prefill`` / ``decode`` (see the module docstring).
    prompt: ``[B, T]`` int tokens, ``T >= 1``; rows shorter than ``T`` are right-padded and
      described by ``prompt_lengths``.
    max_new_tokens: number of tokens to generate per row (``>= 1``).
    rng: PRNG key for sampling (required when ``temperature > 0``). It is split once per step,
      so a given key always gives the same tokens.
    temperature, top_k, top_p: sampling controls (see :func:`sample_logits`); ``temperature=0``
      is greedy decoding.
    prompt_lengths: ``None`` (every row has ``T`` tokens) or ``[B]`` ints in ``[1, T]``, concrete
      (host values: the prefill length ``min(prompt_lengths)`` is a static shape).
    eos_id: end-of-sequence token id, or ``None`` (no stopping).
    pad_id: the token written after a row's EOS (default 0).
    return_logits: also return the logits that produced each new token, ``[B, N, V]``.
    return_cache: also return the final cache pytree (ragged prompts: after the last step of the
      longest row, so shorter rows' caches also hold the tokens generated past their
      ``max_new_tokens``).
    return_lengths: also return ``[B]`` int32 generated lengths: the tokens up to and including
      the first EOS, ``max_new_tokens`` for a row without one (always without ``eos_id``).
    mesh, rules: shard the generation on a mesh (:func:`attn_jax.sharding.make_mesh`) with
      logical-axis rules (default :func:`attn_jax.sharding.default_rules`): activations and KV
      caches split by batch and heads; parameters stay where they are (e.g. as placed by
      :func:`attn_jax.models.train.init`).
    **inputs: extra prefill inputs (``source=``, ``source_mask=`` for the encoder-decoder).

  Returns:
    ``tokens [B, max_new_tokens]`` int32 (row ``b``'s tokens after its own prompt), followed, in
    this order and only when asked, by the logits, the cache and the lengths; a single array when
    nothing else is asked.
  """
  if not hasattr(prompt, "shape") or prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must have shape [batch, prompt_len >= 1], got {getattr(prompt, 'shape', prompt)!r}")
  if not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt must hold integer tokens, got dtype {prompt.dtype}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  _check_sampling(temperature, top_k, top_p)
  vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
  eos_id = _check_token_id("eos_id", eos_id, vocab_size, allow_none=True)
  pad_id = _check_token_id("pad_id", pad_id, vocab_size, allow_none=False)
  b, t = prompt.shape
  lengths, prefill_len = None, t
  if prompt_lengths is not None:
    host_lengths = _check_prompt_lengths(prompt_lengths, b, t)
    prefill_len = int(host_lengths.min())
    if prefill_len < t:  # all rows full: the equal-length program, no extra steps
      lengths = jnp.asarray(host_lengths)
  if rng is None:
    if temperature > 0:
      raise ValueError("rng is required when temperature > 0")
    rng = jax.random.PRNGKey(0)
  graphdef, state = nnx.split(model)
  tokens, logits, cache, gen_lengths = _generate(
      graphdef, state, prompt, lengths, rng, inputs, max_len=t + max_new_tokens,
      prefill_len=prefill_len, max_new_tokens=max_new_tokens, temperature=float(temperature),
      top_k=top_k, top_p=None if top_p is None else float(top_p), return_logits=return_logits,
      eos_id=eos_id, pad_id=pad_id, mesh=mesh,
      rules=(rules or sharding.default_rules()) if mesh is not None else None)
  out = (tokens,)
  if return_logits:
    out += (logits,)
  if return_cache:
    out += (cache,)
  if return_lengths:
    out += (gen_lengths,)
  return out[0] if len(out) == 1 else out
