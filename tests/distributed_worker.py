"""One process of the 2-process jax.distributed test (run by tests/test_sharding.py).

Usage: python -m tests.distributed_worker PROCESS_ID PORT OUT.npz

Each process owns 4 fake CPU devices; together they form the 8-device data x fsdp x tensor mesh
and run one sharded training step of the tiny LM on the same global batch. Process 0 writes the
loss, the gradients and the updated parameters (gathered to the host) to OUT.npz.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true")

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main(process_id: int, port: int, out_path: str) -> None:
  from attn_jax import sharding

  how = sharding.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
  assert how == "explicit" and jax.process_count() == 2 and jax.device_count() == 8, (
      how, jax.process_count(), jax.device_count())

  from flax import nnx
  from jax.experimental import multihost_utils

  from attn_jax import models
  from tests import test_sharding

  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  cfg = test_sharding.MODELS["lm"][0]()
  batch = test_sharding.make_batch("lm", cfg)
  make = lambda: models.DecoderLM(cfg, rngs=nnx.Rngs(0))
  setup = models.train.init(make, test_sharding.TX, mesh=mesh)
  step = models.train.make_train_step(setup, test_sharding.TX, batch, return_grads=True)
  params, _, loss, grads = step(setup.params, setup.opt_state, models.train.put_batch(batch, mesh))
  gathered = multihost_utils.process_allgather((grads, params), tiled=True)
  if process_id == 0:
    g_leaves, p_leaves = (jax.tree.leaves(t) for t in gathered)
    arrays = {f"grad_{i}": np.asarray(x) for i, x in enumerate(g_leaves)}
    arrays.update({f"param_{i}": np.asarray(x) for i, x in enumerate(p_leaves)})
    np.savez(out_path, loss=np.asarray(loss), **arrays)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
