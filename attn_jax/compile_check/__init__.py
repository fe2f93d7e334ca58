"""Compile the project's Pallas kernels for real TPUs and NVIDIA GPUs on a machine with neither.

Interpret mode checks what a kernel computes, not whether the hardware compiler accepts it. This
package runs the real compilers without a device (XLA's deviceless, ahead-of-time compilation):
libtpu for TPU v4 / v5e / v5p / v6e, and XLA:GPU with Triton and ptxas for A100 / H100 / H200 /
B200 from target descriptions kept in ``targets/``. Each compiler lives in its own cached virtual
environment (:mod:`envs`); the cases (:mod:`cases`) call the public API with the real kernels
requested; the workers (:mod:`worker`) report per kernel: compiled or the compiler's error,
scoped VMEM (TPU), registers / spill bytes / shared memory (GPU) and compile time.

Entry point: ``python -m attn_jax.compile_check`` (see ``__main__``). Importing this package
pulls in nothing beyond the standard library; ``import attn_jax`` does not import it.
"""
