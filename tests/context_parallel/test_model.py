"""The model zoo under context parallelism: a DecoderLM (softmax attention with learned sinks
and a data-decay linear-attention layer) trains on a data x fsdp x sequence x tensor mesh with
the same loss and gradients as on one device, its attention layers run the ring (the program
passes K/V and states with collective permutes), and generation on that mesh (prefill sharded
along the sequence, single-token decode steps unsharded) gives the unsharded tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attn_jax import layers
from attn_jax import models
from attn_jax import sharding
from attn_jax.context_parallel import softmax as cp_softmax
from tests import tolerances

TX = optax.adamw(1e-2)


def _config():
  return models.lm.tiny(schedule=(
      layers.mixer_config("softmax", num_heads=4, num_kv_heads=2, learned_sinks=True),
      layers.mixer_config("linear", num_heads=4, num_kv_heads=2, decay="data")))


def test_decoder_lm_trains_with_a_sequence_axis():
  cfg = _config()
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, cfg.vocab_size, (4, 17), dtype=np.int32)}
  make = lambda: models.DecoderLM(cfg, rngs=nnx.Rngs(0))
  ref = models.train.init(make, TX)
  _, _, loss0, grads0 = models.train.make_train_step(ref, TX, return_grads=True)(ref.params, ref.opt_state, batch)

  mesh = sharding.make_mesh(fsdp=2, sequence=2, tensor=2)
  setup = models.train.init(make, TX, mesh=mesh)
  step = models.train.make_train_step(setup, TX, batch, return_grads=True)
  placed = models.train.put_batch(batch, mesh)
  # The attention layers pass K/V (ring) and linear states between the sequence shards.
  assert "collective_permute" in step.lower(setup.params, setup.opt_state, placed).as_text()
  _, _, loss, grads = step(setup.params, setup.opt_state, placed)
  tolerances.assert_close(loss, loss0, jnp.float32, "loss")
  for i, (a, b) in enumerate(zip(jax.tree.leaves(grads), jax.tree.leaves(grads0))):
    tolerances.assert_close(np.asarray(a), np.asarray(b), jnp.float32, f"grad {i}", factor=5)


def test_generation_on_a_sequence_mesh_equals_unsharded():
  cfg = _config()
  model = models.DecoderLM(cfg, rngs=nnx.Rngs(0))
  prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, cfg.vocab_size)
  tokens, logits = models.generate(model, prompt, max_new_tokens=4, return_logits=True)
  mesh = sharding.make_mesh(sequence=2, tensor=2, devices=jax.devices()[:4])
  cp_softmax._PLANS.clear()
  s_tokens, s_logits = models.generate(model, prompt, max_new_tokens=4, return_logits=True, mesh=mesh)
  # The 8-token prefill ran context parallel (a plan was made for the sequence axis).
  assert any(key[1].axis_name == "sequence" and key[0].q_len == 8 for key in cp_softmax._PLANS)
  np.testing.assert_array_equal(s_tokens, tokens)
  tolerances.assert_close(s_logits, logits, jnp.float32, "sharded generate")
