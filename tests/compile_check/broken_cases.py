"""A kernel family that the hardware compilers reject, to test how the compile check reports a
failure: on a GPU a Pallas matmul whose operands need more shared memory than an A100 has (the
compiler's RESOURCE_EXHAUSTED), on a TPU a block shape Mosaic does not tile (a lowering error)."""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from attn_jax.compile_check import cases as cases_lib


def _square_kernel(a_ref, o_ref):
  o_ref[...] = jnp.dot(a_ref[...], a_ref[...], preferred_element_type=jnp.float32)


def _double_kernel(x_ref, o_ref):
  o_ref[...] = x_ref[...] * 2.0


def _broken(platform, x):
  x = x["x"]
  if platform == "gpu":
    from jax.experimental.pallas import triton as pltriton
    block = pl.BlockSpec((256, 256), lambda i: (0, 0))  # 2 x 256 KiB of f32 operands
    return pl.pallas_call(_square_kernel, out_shape=jax.ShapeDtypeStruct((256, 256), jnp.float32), grid=(1,),
                          in_specs=[block], out_specs=block, name="broken_gpu",
                          compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1))(x)
  block = pl.BlockSpec((8, 100), lambda i: (0, i))  # 100 lanes: not a multiple of 128
  return pl.pallas_call(_double_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(1,),
                        in_specs=[block], out_specs=block, name="broken_tpu")(x)


def _cases():
  yield cases_lib.Case("broken", "too-big", 64, "float32", inputs=(cases_lib.Input("x", (256, 256), "float32"),),
                       grad=(), call=_broken, modes=(cases_lib.FWD,), note="rejected by the compilers")


cases_lib.register_family("broken", _cases)
