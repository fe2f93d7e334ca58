"""Neighborhood attention on the Pallas flash kernels (interpret mode) and their lowering."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from attn_jax.neighborhood import api as nb_api
from tests import tolerances
from tests.neighborhood import dense_reference
from tests.neighborhood.test_attention import _inputs, _per_axis, _value_and_grads

# (spatial, kernel, stride, dilation, causal, extra keys, sinks, (Hq, Hkv), tile): tiles of 16
# tokens are valid kernel blocks on both platforms (a power of two, a multiple of 8).
CASES = {
    "2d_window_sinks_gqa": ((8, 12), (3, 5), 1, 1, False, 0, True, (2, 1), (4, 4)),
    "1d_dilation_stride_causal_extra": ((40,), 5, 2, 2, True, 3, False, (2, 2), (16,)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
def test_kernels_match_dense_reference(implementation, name):
  shape, kernel, stride, dilation, causal, extra, with_sinks, (hq, hkv), tile = CASES[name]
  n = len(shape)
  q, k, v, ak, av, sinks, d_out, d_lse = _inputs(1, shape, hq, hkv, extra, jnp.float32, d=16, dv=16)
  mask = dense_reference.dense_mask(shape, _per_axis(kernel, n), _per_axis(stride, n),
                                    _per_axis(dilation, n), _per_axis(causal, n))
  args = {"q": q, "k": k, "v": v}
  if extra:
    args.update(additional_keys=ak, additional_values=av)
  if with_sinks:
    args["sinks"] = sinks

  def fast(args):
    return attn_jax.neighborhood_attention(
        args["q"], args["k"], args["v"], kernel, stride, dilation, causal, sinks=args.get("sinks"),
        additional_keys=args.get("additional_keys"), additional_values=args.get("additional_values"),
        implementation=implementation, return_lse=True, config=attn_jax.NeighborhoodConfig(tile_shape=tile))

  def ref(args):
    return dense_reference.dense_attention(
        args["q"], args["k"], args["v"], mask, sinks=args.get("sinks"),
        additional_keys=args.get("additional_keys"), additional_values=args.get("additional_values"))

  got = _value_and_grads(fast, args, d_out, d_lse)
  want = _value_and_grads(ref, args, d_out, d_lse)
  tolerances.assert_close(got[0], want[0], jnp.float32, "out")
  tolerances.assert_close(got[1], want[1], jnp.float32, "lse")
  for key in args:
    tolerances.assert_close(got[2][key], want[2][key], jnp.float32, f"d{key}")


def test_tiles_follow_the_kernel_block_rules():
  # 2-D 56x56 with a 7x7 window: unconstrained, 7x7 = 49-token tiles would be natural; the GPU
  # kernel takes only powers of two, so its tiles are chosen among those.
  from attn_jax.neighborhood import tiling
  args = ((56, 56), (7, 7), (1, 1), (1, 1), (False, False))
  gpu = tiling.choose_tile_shape(*args, 128, nb_api.tile_volume_rule("pallas_gpu"))
  volume = int(np.prod(gpu))
  assert volume >= 16 and volume & (volume - 1) == 0
  # The GPU kernels keep their own (register-bound) blocks; the caller's config passes through.
  assert nb_api.backend_config("pallas_gpu", volume) is None
  base = attn_jax.PallasGpuConfig(interpret=False)
  assert nb_api.backend_config("pallas_gpu", volume, base) is base
  assert nb_api.backend_config("pallas_tpu", 256).block_q == 256
  assert nb_api.backend_config("xla", 49).block_q == 49


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_neighborhood_predicate_lowers_in_kernel(platform):
  """The permuted 2-D neighborhood mask (with dilation and stride) is evaluated in-kernel on
  partial tiles of the real TPU / GPU kernels, forward and backward."""
  from attn_jax.neighborhood import mask as nb_mask
  from attn_jax.neighborhood import tiling
  layout = tiling.TileLayout((64, 64), (1, 2), (8, 16))
  mask = nb_mask.NeighborhoodMask(layout, (13, 9), (1, 2), (False, True))
  assert mask.in_kernel
  n = layout.num_tokens
  sd = jax.ShapeDtypeStruct
  x = sd((1, n, 4, 128), jnp.bfloat16)
  config = (attn_jax.PallasTpuConfig(block_q=128, block_kv=128, interpret=False) if platform == "tpu"
            else attn_jax.PallasGpuConfig(block_q=128, block_kv=128, interpret=False))
  loss = lambda q, k, v: attn_jax.attention(q, k, v, mask=mask, config=config).astype(jnp.float32).sum()  # noqa: E731
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(
      lowering_platforms=("tpu" if platform == "tpu" else "cuda",)).as_text()
  marker = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  # Forward, then dQ and dK/dV (one fused backward kernel on TPU).
  assert len(re.findall(re.escape(marker) + r"\b", text)) == (2 if platform == "tpu" else 3)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_attention_config_asks_for_the_real_kernel_off_its_platform(platform):
  """``NeighborhoodConfig(attention_config=...)`` is the one way to choose the softmax backend and
  its mode: ``interpret=False`` lowers the hardware kernel on this CPU (tiles follow the hardware
  block rule), as the compile check needs; the config's own fields (here the warps) reach it."""
  config_type = attn_jax.PallasTpuConfig if platform == "tpu" else attn_jax.PallasGpuConfig
  extra = {} if platform == "tpu" else dict(num_warps=2)
  config = attn_jax.NeighborhoodConfig(attention_config=config_type(interpret=False, **extra))
  x = jax.ShapeDtypeStruct((1, 24, 40, 2, 64), jnp.bfloat16)
  loss = lambda q, k, v: attn_jax.neighborhood_attention(q, k, v, (5, 7), config=config).astype(jnp.float32).sum()  # noqa: E731
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(
      lowering_platforms=("tpu" if platform == "tpu" else "cuda",)).as_text()
  marker = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  # Forward, then dQ and dK/dV (one fused backward kernel on TPU).
  assert len(re.findall(re.escape(marker) + r"\b", text)) == (2 if platform == "tpu" else 3)
  if platform == "gpu":
    assert text.count("num_warps = 2") == 3
  # Off the TPU, a hardware TPU kernel still gets lane-aligned tiles; interpret mode any multiple of 8.
  assert not nb_api.tile_volume_rule("pallas_tpu", interpret=False)(64)
  assert nb_api.tile_volume_rule("pallas_tpu", interpret=True)(64)
  assert nb_api.backend_config("pallas_tpu", 64, attn_jax.PallasTpuConfig(interpret=False)).block_q is None
  assert nb_api.backend_config("pallas_tpu", 256, attn_jax.PallasTpuConfig(interpret=False)).block_q == 256


def test_attention_config_interpret_mode_matches_reference():
  """Interpret mode asked for explicitly through the attention config (as on a TPU host would
  be), with the kernel's other fields honoured: explicit blocks are not replaced by the tile."""
  visits = []
  config = attn_jax.NeighborhoodConfig(tile_shape=(4, 4), attention_config=attn_jax.PallasTpuConfig(
      block_q=8, block_kv=8, interpret=True, record_visits=lambda *a: visits.append(a)))
  q, k, v, *_ = _inputs(1, (8, 8), 2, 1, 0, jnp.float32, d=16, dv=16)
  got = attn_jax.neighborhood_attention(q, k, v, 3, config=config)
  mask = dense_reference.dense_mask((8, 8), (3, 3), (1, 1), (1, 1), (False, False))
  want, _ = dense_reference.dense_attention(q, k, v, mask)
  tolerances.assert_close(got, want, jnp.float32, "out")
  # 64 tokens in blocks of 8: 8 query blocks, not the 4 of 16-token tiles.
  assert {int(a[3]) for a in visits} == set(range(8))


def test_attention_config_bad_input():
  with pytest.raises(ValueError, match="attention_config must be an XlaConfig, PallasTpuConfig or PallasGpuConfig"):
    attn_jax.NeighborhoodConfig(attention_config=attn_jax.LinearPallasGpuConfig())
  q = jnp.zeros((1, 8, 2, 16))
  with pytest.raises(ValueError, match="implementation='xla' contradicts config.attention_config"):
    attn_jax.neighborhood_attention(q, q, q, 3, implementation="xla", config=attn_jax.NeighborhoodConfig(
        attention_config=attn_jax.PallasGpuConfig()))
