"""Titans' three ways of combining the neural memory with attention (Behrouz et al., "Titans:
Learning to Memorize at Test Time", Sec. 4), as pure functions of a parameter pytree.

* MAC, memory as context (Sec. 4.1): the sequence is cut into segments. For each segment the
  memory, as left by the previous segments, is queried with the segment's tokens; its answers
  and the persistent tokens are prepended as context to attention over the segment; the
  attention output is then written into the memory, and the output is the attention output
  gated by the updated memory's answer to it.
* MAG, memory as gate (Sec. 4.2): sliding-window attention and the memory read the same
  sequence (persistent tokens first) in parallel; their outputs are combined by a gate.
* MAL, memory as a layer (Sec. 4.3): the memory reads the sequence and sliding-window
  attention reads the memory's output.

The parameters are a plain dict (:func:`init_titans`), so the functions train end to end with
``jax.grad`` and the flax layers only hold them. ``implementation="reference"`` swaps both
parts for their oracles (token-by-token memory, materialised attention); the default uses the
chunked memory and the fast attention backends.

Choices the paper leaves open, ours: the memory reads L2-normalised queries and keys (Sec. 4.4)
but we omit the short convolutions after the projections; ``theta = lr_scale * sigmoid``,
``eta = sigmoid``, ``alpha = sigmoid`` of one linear map of the token; the gate ``y (x) m`` of
MAG and MAC is ``rms(y) g_y * sigmoid(rms(m) g_m)`` (Sec. 4.2: "normalize ... using learnable
vector-valued weights, followed by a non-linearity"); in MAC the retrieved token ``h_i`` is
visible only to segment tokens ``j >= i`` (it is computed from token ``i``, so showing it to
earlier tokens would leak the future) and every segment starts a memory chunk.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from attn_jax import masks
from attn_jax.mechanisms import dense
from attn_jax.mechanisms import titans
from attn_jax.softmax import api as softmax_api

VARIANTS = ("mac", "mag", "mal")


@dataclasses.dataclass(frozen=True)
class TitansConfig:
  """Shapes and static choices of a Titans block.

  Attributes:
    variant: ``"mac"``, ``"mag"`` or ``"mal"``.
    d_model: token width ``E``.
    num_heads, head_dim: attention heads (``num_kv_heads`` for GQA).
    memory_heads, memory_dim: heads of the neural memory and their key/value width.
    memory_hidden: hidden widths of each head's memory MLP (``()`` is a linear memory).
    num_persistent: learnable persistent-memory tokens prepended to attention.
    window: sliding-window size of MAG / MAL attention (keys ``i - window + 1 .. i``).
    segment_len: MAC's segment length (a multiple of ``spec.chunk_size``).
    lr_scale: the largest inner step size ``theta``.
    spec: the memory's :class:`~attn_jax.mechanisms.titans.MemorySpec`.
  """

  variant: str = "mag"
  d_model: int = 64
  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int = 16
  memory_heads: int = 4
  memory_dim: int = 16
  memory_hidden: tuple = (32,)
  num_persistent: int = 4
  window: int = 32
  segment_len: int = 32
  lr_scale: float = 0.1
  spec: titans.MemorySpec = titans.MemorySpec()

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
    for name in ("d_model", "num_heads", "head_dim", "memory_heads", "memory_dim", "window", "segment_len"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    kv = self.kv_heads
    if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or self.num_heads % kv:
      raise ValueError(f"num_kv_heads must divide num_heads={self.num_heads}, got {self.num_kv_heads!r}")
    if isinstance(self.num_persistent, bool) or not isinstance(self.num_persistent, int) or self.num_persistent < 0:
      raise ValueError(f"num_persistent must be an int >= 0, got {self.num_persistent!r}")
    if not self.lr_scale > 0:
      raise ValueError(f"lr_scale must be > 0, got {self.lr_scale}")
    if not isinstance(self.spec, titans.MemorySpec):
      raise ValueError(f"spec must be a MemorySpec, got {type(self.spec).__name__}")
    if self.variant == "mac" and self.segment_len % self.spec.chunk_size:
      raise ValueError(f"segment_len ({self.segment_len}) must be a multiple of spec.chunk_size "
                       f"({self.spec.chunk_size}) so that every segment starts a memory chunk")

  @property
  def kv_heads(self):
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads


def init_titans(key, config: TitansConfig) -> dict:
  """Parameters of a Titans block: ``{"attn", "mem", "persistent", "gate"}`` of float32 arrays."""
  e, h, hk, d = config.d_model, config.num_heads, config.kv_heads, config.head_dim
  hm, dm = config.memory_heads, config.memory_dim
  ks = jax.random.split(key, 11)

  def dense_init(k, fan_in, fan_out):
    return jax.random.normal(k, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)

  params = {
      "attn": {"wq": dense_init(ks[0], e, h * d), "wk": dense_init(ks[1], e, hk * d),
               "wv": dense_init(ks[2], e, hk * d), "wo": dense_init(ks[3], h * d, e)},
      "mem": {"wq": dense_init(ks[4], e, hm * dm), "wk": dense_init(ks[5], e, hm * dm),
              "wv": dense_init(ks[6], e, hm * dm), "wo": dense_init(ks[7], hm * dm, e),
              "gates": 0.1 * dense_init(ks[8], e, 3 * hm),
              # Start with a small step, high momentum and little forgetting.
              "gates_bias": jnp.concatenate([jnp.zeros(hm), 2.0 * jnp.ones(hm), -4.0 * jnp.ones(hm)]),
              "init": titans.init_memory(ks[9], hm, dm, dm, config.memory_hidden)},
      "persistent": 0.02 * jax.random.normal(ks[10], (config.num_persistent, e), jnp.float32),
  }
  if config.variant != "mal":
    params["gate"] = {"y": jnp.ones(e), "m": jnp.ones(e)}
  return params


def _rms(x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


def _unit(x):
  return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6)


def _heads(x, n):
  return x.reshape(x.shape[:2] + (n, -1))


def _attention(p, config, x_q, x_kv, mask, reference):
  """Multi-head attention from tokens ``x_q [B, Tq, E]`` to ``x_kv [B, Tk, E]``, projected back to E."""
  hi = dense.HIGHEST
  q = _heads(jnp.matmul(x_q, p["wq"], precision=hi), config.num_heads)
  k = _heads(jnp.matmul(x_kv, p["wk"], precision=hi), config.kv_heads)
  v = _heads(jnp.matmul(x_kv, p["wv"], precision=hi), config.kv_heads)
  if reference:
    o = dense.attention(q, k, v, mask=mask)
  else:
    o = softmax_api.attention(q, k, v, mask=mask)
  return jnp.matmul(o.reshape(o.shape[:2] + (-1,)), p["wo"], precision=hi)


def _memory_inputs(p, config, x):
  hi = dense.HIGHEST
  hm = config.memory_heads
  q = _unit(_heads(jnp.matmul(x, p["wq"], precision=hi), hm))
  k = _unit(_heads(jnp.matmul(x, p["wk"], precision=hi), hm))
  v = _heads(jnp.matmul(x, p["wv"], precision=hi), hm)
  g = jnp.matmul(x, p["gates"], precision=hi) + p["gates_bias"]
  lr, mom, dec = jnp.split(g, 3, axis=-1)
  return q, k, v, config.lr_scale * jax.nn.sigmoid(lr), jax.nn.sigmoid(mom), jax.nn.sigmoid(dec)


def _memory(p, config, x, state, reference):
  """Reads tokens ``x [B, T, E]`` into the memory; returns its answers ``[B, T, E]`` and the state."""
  q, k, v, lr, mom, dec = _memory_inputs(p, config, x)
  y, state = titans.neural_memory(q, k, v, lr, mom, dec, p["init"], spec=config.spec, initial_state=state,
                                  return_state=True, implementation="reference" if reference else None)
  return jnp.matmul(y.reshape(y.shape[:2] + (-1,)), p["wo"], precision=dense.HIGHEST), state


def _combine(p, y, m):
  return _rms(y) * p["y"] * jax.nn.sigmoid(_rms(m) * p["m"])


def _with_persistent(params, x):
  pers = jnp.broadcast_to(params["persistent"][None], (x.shape[0],) + params["persistent"].shape)
  return jnp.concatenate([pers.astype(x.dtype), x], axis=1)


def _window_mask(config):
  return masks.sliding_window(config.window - 1) | masks.sink_tokens(config.num_persistent)


def mac_mask(num_persistent: int, segment_len: int) -> masks.Mask:
  """MAC's attention mask: segment queries over ``[persistent | retrieved | segment]`` keys.

  Query ``j`` of the segment (``q_len = segment_len``, ``kv_len = num_persistent + 2 *
  segment_len``) sees every persistent token, the retrieved tokens ``i <= j`` and the segment
  tokens ``i <= j``.
  """
  n, c = num_persistent, segment_len
  return (masks.sink_tokens(n) | masks.causal(offset=n)
          | (masks.causal(offset=n + c) & ~masks.sink_tokens(n + c)))


def _check(params, config, x):
  if not isinstance(config, TitansConfig):
    raise ValueError(f"config must be a TitansConfig, got {type(config).__name__}")
  if not hasattr(x, "ndim") or x.ndim != 3 or x.shape[2] != config.d_model:
    raise ValueError(f"x must have shape [batch, seq, d_model={config.d_model}], got {jnp.shape(x)}")
  if params["persistent"].shape != (config.num_persistent, config.d_model):
    raise ValueError(f"params do not match the config: persistent {params['persistent'].shape}, expected "
                     f"{(config.num_persistent, config.d_model)}")


def titans_mag(params, x, config: TitansConfig, *, implementation=None):
  """MAG: ``o = SWA*(x~) (x) M(x~)`` with ``x~ = [persistent | x]``; returns ``[B, T, E]``."""
  _check(params, config, x)
  reference = implementation == "reference"
  xt = _with_persistent(params, x)
  y = _attention(params["attn"], config, xt, xt, _window_mask(config), reference)
  m, _ = _memory(params["mem"], config, xt, None, reference)
  return _combine(params["gate"], y, m)[:, config.num_persistent:]


def titans_mal(params, x, config: TitansConfig, *, implementation=None):
  """MAL: ``o = SWA*(M(x~))`` with ``x~ = [persistent | x]``; returns ``[B, T, E]``."""
  _check(params, config, x)
  reference = implementation == "reference"
  xt = _with_persistent(params, x)
  m, _ = _memory(params["mem"], config, xt, None, reference)
  return _attention(params["attn"], config, m, m, _window_mask(config), reference)[:, config.num_persistent:]


def titans_mac(params, x, config: TitansConfig, *, implementation=None):
  """MAC: memory as context, segment by segment; returns ``[B, T, E]``.

  For segment ``S``: ``h = M*_{prev}(q(S))`` (retrieval, no update), ``y = Attn(S -> [P | h | S])``
  under :func:`mac_mask`, ``M <- M(y)`` (the memory reads the attention output), ``o = y (x)
  M*(y)`` with the per-token updated memory (causal within the segment).
  """
  _check(params, config, x)
  reference = implementation == "reference"
  b, t, e = x.shape
  c = config.segment_len
  n = -(-t // c)
  # Trailing padding only reaches positions after the real tokens: everything here is causal.
  xs = jnp.pad(x, ((0, 0), (0, n * c - t), (0, 0))).reshape(b, n, c, e).transpose(1, 0, 2, 3)
  mask = mac_mask(config.num_persistent, c)
  mem = params["mem"]

  def segment(state, seg):
    q, *_ = _memory_inputs(mem, config, seg)
    h = titans.memory_readout(state, q, spec=config.spec)
    h = jnp.matmul(h.reshape(h.shape[:2] + (-1,)), mem["wo"], precision=dense.HIGHEST)
    context = jnp.concatenate([_with_persistent(params, h), seg], axis=1)
    y = _attention(params["attn"], config, seg, context, mask, reference)
    m, state = _memory(mem, config, y, state, reference)
    return state, _combine(params["gate"], y, m)

  state = titans.init_state(mem["init"], b)
  _, out = jax.lax.scan(segment, state, xs)
  return out.transpose(1, 0, 2, 3).reshape(b, n * c, e)[:, :t]


def titans_block(params, x, config: TitansConfig, *, implementation=None):
  """Dispatches on ``config.variant``."""
  fn = {"mac": titans_mac, "mag": titans_mag, "mal": titans_mal}[config.variant]
  return fn(params, x, config, implementation=implementation)
