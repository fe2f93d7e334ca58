"""Meshes, logical-axis rules, sharded training steps (== unsharded) for every model, the
shard_map attention hook, and a 2-process jax.distributed run on localhost."""

import functools
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import attn_jax
from attn_jax import layers
from attn_jax import models
from attn_jax import sharding
from tests import tolerances

TX = optax.adamw(1e-2)
REPO = pathlib.Path(__file__).resolve().parents[1]

# One layer per stack keeps the compiles short; the sharding of a layer does not depend on depth.
MODELS = {
    "lm": (lambda: models.lm.tiny(num_layers=1), models.DecoderLM),
    "vit_shard_map_attention": (
        lambda: models.vit.tiny(num_layers=1, schedule=models.vit.tiny().schedule.replace(
            shard_map=True, learned_sinks=True)),
        models.ViT),
    "encdec_causal_cross": (
        lambda: models.encdec.tiny(decoder_layers=1, cross=models.encdec.tiny().cross.replace(causal=True)),
        models.EncoderDecoder),
}


def make_batch(kind, cfg, batch=4):
  rng = np.random.default_rng(0)
  if kind.startswith("lm"):
    return {"tokens": rng.integers(0, cfg.vocab_size, (batch, 9), dtype=np.int32)}
  if kind.startswith("vit"):
    return {"images": rng.normal(size=(batch,) + tuple(cfg.image_size) + (cfg.channels,)).astype(np.float32),
            "labels": rng.integers(0, cfg.num_classes, (batch,), dtype=np.int32)}
  return {"source": rng.integers(0, cfg.vocab_size, (batch, 7), dtype=np.int32),
          "target": rng.integers(0, cfg.vocab_size, (batch, 6), dtype=np.int32)}


@functools.lru_cache(maxsize=None)
def _unsharded(kind):
  """Single-device reference: loss, gradients and parameters after one AdamW step."""
  make_cfg, cls = MODELS[kind]
  cfg = make_cfg()
  batch = make_batch(kind, cfg)
  setup = models.train.init(lambda: cls(cfg, rngs=nnx.Rngs(0)), TX)
  params, _, loss, grads = models.train.make_train_step(setup, TX, return_grads=True)(
      setup.params, setup.opt_state, batch)
  return cfg, batch, loss, grads, params


def _assert_trees_close(actual, expected, name, factor=1.0):
  a_leaves, a_def = jax.tree.flatten(actual)
  e_leaves, e_def = jax.tree.flatten(expected)
  assert len(a_leaves) == len(e_leaves), name
  for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
    tolerances.assert_close(np.asarray(a), np.asarray(e), jnp.float32, f"{name}[{i}]", factor=factor)


DATA_FSDP_TENSOR = dict(data=2, fsdp=2, tensor=2)


@pytest.mark.parametrize("kind,mesh_shape", [(k, DATA_FSDP_TENSOR) for k in sorted(MODELS)] + [
    pytest.param("lm", dict(fsdp=2, sequence=2, tensor=2))],
    ids=[f"{k}-data_fsdp_tensor" for k in sorted(MODELS)] + ["lm-fsdp_sequence_tensor"])
def test_sharded_step_equals_unsharded(kind, mesh_shape):
  cfg, batch, loss0, grads0, params0 = _unsharded(kind)
  cls = MODELS[kind][1]
  mesh = sharding.make_mesh(**mesh_shape)
  setup = models.train.init(lambda: cls(cfg, rngs=nnx.Rngs(0)), TX, mesh=mesh)
  # Parameters and Adam moments are created sharded by their logical axes.
  model = nnx.merge(setup.graphdef, setup.params)
  blk = model.decoder[0] if kind.startswith("encdec") else model.blocks[0]
  assert blk.mixer.proj.q_proj.kernel[...].sharding.spec == P("fsdp", "tensor")
  assert blk.mlp.down.kernel[...].sharding.spec == P("tensor", "fsdp")
  for mu, p in zip(jax.tree.leaves(setup.opt_state[0].mu), jax.tree.leaves(setup.params)):
    assert mu.sharding == p.sharding
  params, opt_state, loss, grads = models.train.make_train_step(setup, TX, batch, return_grads=True)(
      setup.params, setup.opt_state, models.train.put_batch(batch, mesh))
  tolerances.assert_close(loss, loss0, jnp.float32, "loss")
  _assert_trees_close(grads, grads0, "grads", factor=5.0)
  _assert_trees_close(params, params0, "updated params", factor=5.0)
  assert jax.tree.leaves(grads)[0].sharding == jax.tree.leaves(setup.params)[0].sharding


def test_sequence_mesh_axis_splits_activations():
  """With a sequence mesh axis > 1, the default rules split the activations over it (the
  sequence-sharded step above equals the unsharded one only if it really is sequence-sharded)."""
  mesh = sharding.make_mesh(fsdp=2, sequence=2, tensor=2)
  model = models.DecoderLM(models.lm.tiny(num_layers=1), rngs=nnx.Rngs(0))
  tokens = jnp.zeros((4, 8), jnp.int32)
  with sharding.use_rules(mesh):
    logits = jax.jit(lambda t: model(t))(tokens)
  assert logits.sharding.spec == P("fsdp", "sequence", "tensor")


def test_shard_map_attention_hook_equals_unsharded():
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (4, 10, 4, 8))
  k = jax.random.normal(keys[1], (4, 10, 2, 8))
  v = jax.random.normal(keys[2], (4, 10, 2, 8))
  sinks = jax.random.normal(keys[3], (4,))
  seg = jnp.asarray(np.repeat([[0] * 6 + [1] * 4], 4, axis=0))
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  calls = []

  def fn(q, k, v, sinks, q_seg, kv_seg):
    calls.append((q.shape, k.shape, sinks.shape))
    return attn_jax.attention(q, k, v, mask=attn_jax.masks.causal(), sinks=sinks,
                              q_segment_ids=q_seg, kv_segment_ids=kv_seg)

  def loss(q, k, v, sinks, use_mesh):
    if use_mesh:
      with sharding.use_rules(mesh):
        out = sharding.shard_map_attention(fn, q, k, v, sinks=sinks, q_segment_ids=seg, kv_segment_ids=seg)
    else:
      out = fn(q, k, v, sinks, seg, seg)
    return (out ** 2).sum(), out

  ref = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True), static_argnums=4)
  (_, out0), g0 = ref(q, k, v, sinks, False)
  (_, out1), g1 = ref(q, k, v, sinks, True)
  # Inside shard_map each call sees a quarter of the batch and half of the heads.
  assert calls[-1] == ((1, 10, 2, 8), (1, 10, 1, 8), (2,))
  tolerances.assert_close(out1, out0, jnp.float32, "out")
  _assert_trees_close(g1, g0, "grads")


def test_two_process_distributed_step_equals_single_process(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = tmp_path / "result.npz"
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-m", "tests.distributed_worker", str(i), str(port), str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  logs = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    logs.append(stdout + stderr)
  assert all(p.returncode == 0 for p in procs), "\n----\n".join(logs)[-6000:]
  _, _, loss0, grads0, params0 = _unsharded("lm")
  result = np.load(out)
  tolerances.assert_close(result["loss"], loss0, jnp.float32, "loss")
  _assert_trees_close([result[f"grad_{i}"] for i in range(len(jax.tree.leaves(grads0)))],
                      jax.tree.leaves(grads0), "grads", factor=5.0)
  _assert_trees_close([result[f"param_{i}"] for i in range(len(jax.tree.leaves(params0)))],
                      jax.tree.leaves(params0), "params", factor=5.0)


def test_make_mesh_and_errors():
  mesh = sharding.make_mesh(data=2, fsdp=-1, tensor=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 4
  with pytest.raises(ValueError, match="need 16 devices, got 8"):
    sharding.make_mesh(data=4, tensor=4)
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    sharding.make_mesh(data=-1, tensor=-1)
  with pytest.raises(ValueError, match="tensor must be a positive int or -1"):
    sharding.make_mesh(tensor=0)
  sub = sharding.make_mesh(tensor=2, devices=jax.devices()[:2])
  assert dict(sub.shape)["tensor"] == 2


def test_logical_to_spec_rules():
  rules = sharding.default_rules()
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  assert sharding.logical_to_spec(("embed", "heads", "head_dim"), rules, mesh, (8, 4, 8)) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("batch", "seq", "act_embed"), rules, mesh, (4, 9, 8)) == P(("data", "fsdp"))
  # A mesh axis is used once per array; sizes that do not divide are replicated.
  assert sharding.logical_to_spec(("heads", "mlp"), rules, mesh, (4, 8)) == P("tensor")
  assert sharding.logical_to_spec(("embed", "vocab"), rules, mesh, (8, 3)) == P("fsdp")
  # Size-1 mesh axes are dropped (sequence is 1 here).
  assert sharding.logical_to_spec(("batch", "seq"), rules, mesh, (4, 8)) == P(("data", "fsdp"))
  assert sharding.logical_to_spec(("batch", "seq"), rules.replace(seq=None)) == P(("data", "fsdp"))
  with pytest.raises(ValueError, match="absent from the mesh"):
    sharding.logical_to_spec(("heads",), rules.replace(heads="model"), mesh)
  with pytest.raises(ValueError, match="name the logical axis 'a' twice"):
    sharding.AxisRules((("a", None), ("a", "data")))
  with pytest.raises(ValueError, match="do not match an array of shape"):
    sharding.logical_to_spec(("embed",), rules, mesh, (2, 2))
  x = jnp.ones((4, 4))
  assert sharding.constrain(x, ("batch", None)) is x  # no active rules: identity


@pytest.mark.parametrize("env,expected", [
    ({}, "single"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, "single"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, "slurm"),
    ({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, "single"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, "tpu"),
    ({"ATTN_JAX_COORDINATOR": "10.0.0.1:1234"}, "explicit"),
])
def test_detect_cluster(env, expected):
  assert sharding.detect_cluster(env) == expected


def test_initialize_distributed_single_and_bad_flags():
  assert sharding.initialize_distributed(env={}) == "single"
  with pytest.raises(ValueError, match="needs num_processes and process_id"):
    sharding.initialize_distributed("127.0.0.1:1234", env={})
  with pytest.raises(ValueError, match="process_id must be in \\[0, 2\\), got 2"):
    sharding.initialize_distributed("127.0.0.1:1234", 2, 2, env={})
  with pytest.raises(ValueError, match="ATTN_JAX_NUM_PROCESSES must be an int"):
    sharding.initialize_distributed(env={"ATTN_JAX_COORDINATOR": "h:1", "ATTN_JAX_NUM_PROCESSES": "two",
                                         "ATTN_JAX_PROCESS_ID": "0"})
