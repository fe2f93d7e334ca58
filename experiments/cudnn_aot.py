r"""Deviceless H100 compile of the ``cudnn`` backend: does XLA:GPU accept the calls it emits?

Runs in a venv with the CUDA plugin and cuDNN, on a machine without a GPU::

    pip install jax==0.10.2 jaxlib==0.10.2 jax-cuda12-plugin==0.10.2 nvidia-cuda-nvcc-cu12 \
        "nvidia-cudnn-cu12>=9.8,<10"
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 PYTHONPATH=. python experiments/cudnn_aot.py

(about 1 minute). For each case, forward and forward+backward go through
``attn_jax.attention(implementation="cudnn")`` and are compiled for the target description
``experiments/gpu_targets/h100.txtpb``; the script prints, per case, the cuDNN custom calls in the
compiled HLO, their mask type and sliding window, and the temporary memory, or the error.

What such a compile proves and what it does not: jax builds the ``__cudnn$fmha*`` custom calls
and XLA:GPU schedules them (as cuDNN thunks), but cuDNN builds and checks its execution plan
only when the program first runs on a GPU, so a configuration cuDNN rejects still compiles here.
jax's trace-time checks run against the default backend (the CPU here): they allow head dims up
to 128 only, as for a pre-Hopper GPU. The jax CUDA plugin needs a cuDNN library to trace the call
at all (without one: ``RuntimeError: cuDNN not found.``).
"""

from __future__ import annotations

import os
import re
import sys

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P

import attn_jax
from attn_jax import dispatch
from attn_jax import masks

TARGET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets", "h100.txtpb")

# name: (mask, q_len, kv_len, hq, hkv, head_dim)
CASES = {
    "causal_4k_d128_gqa": (masks.causal(), 4096, 4096, 16, 4, 128),
    "window1024_4k_d64": (masks.sliding_window(1023), 4096, 4096, 16, 16, 64),
    "prefill_3k_of_4k_causal": (masks.causal(), 3072, 4096, 16, 16, 128),
    "decode_1_of_4k": (masks.causal(), 1, 4096, 16, 2, 128),
    "full_cross_d128": (None, 1024, 4096, 16, 16, 128),
    "causal_d256": (masks.causal(), 4096, 4096, 8, 8, 256),
}


def _describe(text: str) -> str:
  calls = re.findall(r'custom_call_target="(__cudnn\$fmha\w*)"', text)
  mask_types = sorted(set(re.findall(r'mask_type\\?"\s*:\s*\\?"(\w+)', text)))
  windows = sorted(set(re.findall(r'sliding_window_length\\?"\s*:\s*(\d+)', text)))
  return f"calls={calls} mask_type={mask_types} sliding_window_length={windows}"


def main(target_path: str = TARGET) -> int:
  with open(target_path) as f:
    topo = topologies.get_topology_desc(platform="cuda", topology_name="", target_config=f.read(),
                                        topology="1x1x1")
  mesh = jax.sharding.Mesh(topo.devices[:1], ("x",))
  # The compile is deviceless: jax's default backend is the CPU, and the backend would refuse
  # with "cuDNN needs an NVIDIA GPU". The target is a GPU, so dispatch is told so.
  dispatch.current_platform = lambda: "gpu"
  failures = 0
  for name, (mask, tq, tk, hq, hkv, d) in CASES.items():
    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, P()))  # noqa: E731
    args = (spec((1, tq, hq, d)), spec((1, tk, hkv, d)), spec((1, tk, hkv, d)))

    def forward(q, k, v, mask=mask):
      return attn_jax.attention(q, k, v, mask=mask, implementation="cudnn")

    def fwd_bwd(q, k, v):
      return jax.grad(lambda *a: forward(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    for mode, fn in (("fwd", forward), ("fwd_bwd", fwd_bwd)):
      try:
        compiled = jax.jit(fn).lower(*args).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        print(f"{name} {mode}: compiled; {_describe(compiled.as_text())}; temp {temp / 2**20:.1f} MiB")
      except Exception as e:  # Reported per case: the point is to see every verdict.
        failures += 1
        print(f"{name} {mode}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
  # Dispatch on the GPU target: jax refuses odd lengths under differentiation at trace time, and
  # implementation=None must then fall through to the Pallas kernel.
  sd = jax.ShapeDtypeStruct((1, 63, 2, 64), jnp.bfloat16, sharding=NamedSharding(mesh, P()))

  def odd(q, k, v):
    loss = lambda *a: attn_jax.attention(*a, mask=masks.causal()).astype(jnp.float32).sum()  # noqa: E731
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  try:
    lowered = jax.jit(odd).lower(sd, sd, sd)
    lowered.compile()
    text = lowered.as_text()
    print(f"implementation=None, causal 63 tokens, fwd_bwd: compiled; cuDNN calls "
          f"{len(re.findall(r'__cudnn[$]fmha', text))}, Pallas Triton kernels "
          f"{len(re.findall(r'xla[.]gpu[.]triton', text))}")
  except Exception as e:  # noqa: BLE001
    failures += 1
    print(f"implementation=None, causal 63 tokens, fwd_bwd: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
  return failures


if __name__ == "__main__":
  sys.exit(1 if main(*sys.argv[1:]) else 0)
