"""The catalogue of mutants: small deliberate bugs, each with the tests that must catch it.

Each entry is a source patch: in ``file``, the exact string ``old`` (which must occur exactly
once) becomes ``new``; ``also`` holds further edits of the same bug in other places. ``tests``
are pytest node ids, the narrowest selection that must fail. ``quick`` marks the fixed subset
that CI runs (``tests/mutation/test_catalogue.py``); the full catalogue runs on demand with
``python -m tests.mutation``.

Re-anchoring after a refactor: when a patch no longer applies, the runner names the mutant;
find the same logic in the new code and update ``file``, ``old`` and ``new`` so that the
*description* still holds. A mutant whose bug cannot exist any more is deleted, not weakened.

Rule: every new kernel or mechanism adds its mutants here with its tests.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Mutant:
  """One deliberate bug.

  Attributes:
    name: unique id (kebab-case), ``<family>-<what goes wrong>``.
    family: the kernel or backend family it breaks (for the report and for coverage checks).
    file, old, new: the patch (path relative to the repository root; ``old`` exactly once).
    description: the bug in one sentence, as a reviewer would describe it.
    tests: pytest node ids that must fail on the mutant.
    quick: part of the CI subset.
    also: further ``(file, old, new)`` edits of the same bug.
  """

  name: str
  family: str
  file: str
  old: str
  new: str
  description: str
  tests: tuple[str, ...]
  quick: bool = False
  also: tuple[tuple[str, str, str], ...] = ()

  @property
  def edits(self) -> tuple[tuple[str, str, str], ...]:
    return ((self.file, self.old, self.new),) + tuple(self.also)


FLASH_TPU = "pallas_kernels/flash_tpu.py"
FLASH_GPU = "pallas_kernels/flash_gpu.py"
SOFTMAX_PALLAS = "attn_jax/softmax/pallas.py"
SOFTMAX_XLA = "attn_jax/softmax/xla.py"
LINEAR_COMMON = "pallas_kernels/linear_common.py"

_PALLAS = "tests/softmax/test_pallas.py"
_FULL_TILES = "tests/softmax/test_pallas_full_tiles.py"
_XLA = "tests/softmax/test_xla_vs_reference.py"
_API = "tests/softmax/test_attention_api.py"
_LINEAR_PALLAS = "tests/linear/test_pallas.py"
_LINEAR_XLA = "tests/linear/test_xla_vs_reference.py"
_NB_MASK = "tests/neighborhood/test_mask.py"
TRACED = "attn_jax/block_mask_traced.py"
_TRACED = "tests/test_block_mask_traced.py"
_SPARSE_MECH = "tests/mechanisms/test_sparse_mechanisms.py"


def _kernel_case(platform: str, case: str) -> str:
  return f"{_PALLAS}::test_kernel_matches_reference[{platform}-{case}]"


def _linear_case(case: str) -> str:
  return f"{_LINEAR_PALLAS}::test_kernel_matches_reference[{case}]"


def _gla_case(case: str) -> str:
  return f"{_LINEAR_PALLAS}::test_per_channel_decay_matches_reference[{case}]"


MUTANTS: tuple[Mutant, ...] = (
    # ---------------------------------------------------------------- Pallas TPU flash kernels
    Mutant(
        "tpu-segments-on-partial-tiles-only", "pallas_tpu", FLASH_TPU,
        "  if seg is not None:\n    vis = seg if vis is None else vis & seg",
        "  if seg is not None and masked:\n    vis = seg if vis is None else vis & seg",
        "segment ids applied only on PARTIAL tiles: FULL tiles attend across documents",
        (f"{_FULL_TILES}::test_segment_ids_apply_on_full_tiles[tpu-f32]",)),
    Mutant(
        "tpu-softcap-missing-in-dkv", "pallas_tpu", FLASH_TPU,
        "    ds = p * (dp - delta)\n    if th is not None:\n      ds = ds * (1.0 - th * th)\n",
        "    ds = p * (dp - delta)\n",
        "the soft-cap's tanh derivative is left out of dS in the dK/dV kernel",
        (_kernel_case("tpu", "window_sinks_mqa_cap_segments"),)),
    Mutant(
        "tpu-dkv-skips-last-tile", "pallas_tpu", FLASH_TPU,
        "  _run_kinds(mask, kind, update)\n  if fused:\n    exchange.after()",
        "  pl.when(e[\"last\"] == 0)(lambda: _run_kinds(mask, kind, update))\n  if fused:\n    exchange.after()",
        "the dK/dV pass skips the last non-empty query block of every key block",
        (_kernel_case("tpu", "causal_gqa_sinks"),)),
    Mutant(
        "tpu-learned-sink-term-dropped", "pallas_tpu", FLASH_TPU,
        "      l_ref[...] = jnp.ones_like(l_ref)",
        "      l_ref[...] = jnp.zeros_like(l_ref)",
        "the learned sink sets the running max but its exp(sink - m) term is left out of the denominator",
        (_kernel_case("tpu", "causal_gqa_sinks"),)),
    Mutant(
        "tpu-scale-applied-twice-in-dq", "pallas_tpu", FLASH_TPU,
        "      exchange.accumulate((dq * scale)",
        "      exchange.accumulate((dq * scale * scale)",
        "the fused backward's dQ is multiplied by the logit scale twice",
        (_kernel_case("tpu", "causal_gqa_sinks"),)),
    Mutant(
        "tpu-masked-row-lse-finite", "pallas_tpu", FLASH_TPU,
        "    lse = jnp.where(positive, (m_ref[...] + jnp.log2(safe)) * LN2, -jnp.inf)",
        "    lse = (m_ref[...] + jnp.log2(safe)) * LN2",
        "a row that sees no key returns lse = finfo.min + log(1) instead of -inf",
        (f"{_FULL_TILES}::test_rows_that_see_no_key_without_sinks[tpu]",)),
    Mutant(
        "tpu-gqa-wrong-kv-head", "pallas_tpu", FLASH_TPU,
        "    return bi, _div(u * self.stack, self.group), self.entry(u, s, refs)[\"col\"], 0",
        "    return bi, lax.rem(u * self.stack, self.group), self.entry(u, s, refs)[\"col\"], 0",
        "GQA index maps read K/V head h % group instead of h // group",
        (_kernel_case("tpu", "causal_gqa_sinks"),)),
    # ---------------------------------------------------------------- Pallas GPU flash kernels
    Mutant(
        "gpu-segments-on-partial-tiles-only", "pallas_gpu", FLASH_GPU,
        "  if seg is not None:\n    vis = seg if vis is None else vis & seg",
        "  if seg is not None and masked:\n    vis = seg if vis is None else vis & seg",
        "segment ids applied only on PARTIAL tiles: FULL tiles attend across documents",
        (f"{_FULL_TILES}::test_segment_ids_apply_on_full_tiles[gpu-bf16_cap]",), quick=True),
    Mutant(
        "gpu-softcap-missing-in-dq", "pallas_gpu", FLASH_GPU,
        "      if th is not None:\n        ds = ds * (1.0 - th * th)\n      return acc +",
        "      return acc +",
        "the soft-cap's tanh derivative is left out of dS in the dQ kernel",
        (_kernel_case("gpu", "window_sinks_mqa_cap_segments"),)),
    Mutant(
        "gpu-dkv-skips-last-tile", "pallas_gpu", FLASH_GPU,
        "    return lax.fori_loop(first, end, body, accs)",
        "    return lax.fori_loop(first, end - 1, body, accs)",
        "the dK/dV pass skips the last non-empty query block of every key block",
        (_kernel_case("gpu", "causal_gqa_sinks"),)),
    Mutant(
        "gpu-masked-row-lse-finite", "pallas_gpu", FLASH_GPU,
        "  lse_ref[...] = jnp.where(positive, m + jnp.log(safe), -jnp.inf)",
        "  lse_ref[...] = m + jnp.log(safe)",
        "a row that sees no key returns lse = finfo.min + log(1) instead of -inf",
        (f"{_FULL_TILES}::test_rows_that_see_no_key_without_sinks[gpu]",)),
    Mutant(
        "gpu-head-dependent-schedule-of-head-0", "pallas_gpu", FLASH_GPU,
        "  first, end, entry = _walk(mask, hmap_ref, ptr_ref, b, h, i, n_rows, False)\n\n  def body(t, carry):",
        "  first, end, entry = _walk(mask, hmap_ref, ptr_ref, b, 0, i, n_rows, False)\n\n  def body(t, carry):",
        "the forward kernel walks head 0's BlockMask lists for every head of a head-dependent mask",
        (f"{_FULL_TILES}::test_head_dependent_schedule_visits_each_heads_tiles[gpu]",)),
    # ---------------------------------------------------------------- softmax Pallas adapter
    Mutant(
        "pallas-returned-lse-shifted", "pallas_adapter", SOFTMAX_PALLAS,
        "  return (out, lse), (q, k, v, sinks, q_seg, kv_seg, head_offset, lists, out, lse)",
        "  return (out, lse + 0.1 * (q.dtype != jnp.float32)), (q, k, v, sinks, q_seg, kv_seg, head_offset, lists, out,"
        " lse)",
        "bf16 / f16 runs return an LSE off by +0.1 (the backward pass keeps the right one)",
        (_kernel_case("tpu", "window_sinks_mqa_cap_segments"),)),
    Mutant(
        "pallas-softcap-value-off", "pallas_adapter", SOFTMAX_PALLAS,
        "  kw = dict(mask=mask, scale=st.spec.scale, soft_cap=st.spec.logits_soft_cap,",
        "  kw = dict(mask=mask, scale=st.spec.scale,\n"
        "            soft_cap=None if st.spec.logits_soft_cap is None else 1.1 * st.spec.logits_soft_cap,",
        "the kernels get a soft-cap of 3.3 when 3.0 was asked for",
        (_kernel_case("tpu", "window_sinks_mqa_cap_segments"),)),
    Mutant(
        "pallas-key-padding-visible", "pallas_adapter", SOFTMAX_PALLAS,
        "      return visible & (kv_idx < s.kv_len)",
        "      return visible",
        "the in-kernel predicate does not mask the padded keys of the last key block",
        (_kernel_case("gpu", "full_noncausal_cross"),)),
    Mutant(
        "pallas-sharded-head-offset-zero", "pallas_adapter", SOFTMAX_PALLAS,
        "    head_offset = jnp.reshape(shard * lay.local_q_heads, (1,)).astype(jnp.int32)",
        "    head_offset = jnp.reshape(shard * 0, (1,)).astype(jnp.int32)",
        "under shard_map every head shard evaluates a head-dependent mask as if it held heads 0..",
        (f"{_PALLAS}::test_sharded_equals_unsharded[gpu-mqa_head_fn]",)),
    Mutant(
        "pallas-sharded-output-replicated", "pallas_adapter", SOFTMAX_PALLAS,
        "  return fn(*args)",
        "  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(sh.mesh, PartitionSpec())),\n"
        "                      fn(*args))",
        "the shard_map result is all-gathered to every device: right values, sharding lost",
        (f"{_PALLAS}::test_sharded_equals_unsharded[gpu-gqa_per_head_masks]",)),
    Mutant(
        "pallas-head-schedule-union", "pallas_adapter", SOFTMAX_PALLAS,
        "    return block_mask_lib.make_block_mask(s.mask, s.q_len, s.kv_len, self.block_q, self.block_kv,\n"
        "                                          s.num_q_heads)",
        "    bm = block_mask_lib.make_block_mask(s.mask, s.q_len, s.kv_len, self.block_q, self.block_kv,\n"
        "                                        s.num_q_heads)\n"
        "    return bm.union_over_heads() if s.mask.in_kernel else bm",
        "in-kernel head-dependent masks share the union of the heads' schedules: still exact, but "
        "every head visits every head's tiles and FULL tiles turn PARTIAL",
        (f"{_FULL_TILES}::test_head_dependent_schedule_visits_each_heads_tiles[tpu]",)),
    # ---------------------------------------------------------------- softmax cudnn backend
    Mutant(
        "cudnn-band-intersection-upper-edge", "cudnn", "attn_jax/softmax/cudnn.py",
        "  hi = hi_a if hi_b is None else hi_b if hi_a is None else min(hi_a, hi_b)",
        "  hi = hi_a if hi_b is None else hi_b if hi_a is None else max(hi_a, hi_b)",
        "the intersection of two masks keeps the looser upper edge of their bands: queries see keys "
        "that one of the masks hides",
        ("tests/softmax/test_cudnn.py::test_translation_matches_reference[causal_and_window_offsets]",)),
    # ---------------------------------------------------------------- softmax xla backend
    Mutant(
        "xla-learned-sink-term-dropped", "xla", SOFTMAX_XLA,
        "    l0 = jnp.ones(row_shape, jnp.float32)",
        "    l0 = jnp.zeros(row_shape, jnp.float32)",
        "the learned sink sets the running max but its term is left out of the denominator",
        (f"{_XLA}::test_sinks_softcap_segments_combinations[None-False]",)),
    Mutant(
        "xla-softcap-missing-in-backward", "xla", SOFTMAX_XLA,
        "      if th is not None:\n        ds = ds * (1.0 - th * th)\n      ds = ds * s.scale",
        "      ds = ds * s.scale",
        "the soft-cap's tanh derivative is left out of the backward pass",
        (f"{_XLA}::test_sinks_softcap_segments_combinations[3.0-False]",)),
    Mutant(
        "xla-scale-applied-twice-in-backward", "xla", SOFTMAX_XLA,
        "      ds = ds * s.scale",
        "      ds = ds * s.scale * s.scale",
        "dS is multiplied by the logit scale twice (dQ and dK wrong, dV right)",
        (f"{_XLA}::test_sinks_softcap_segments_combinations[None-False]",), quick=True),
    Mutant(
        "xla-masked-row-lse-finite", "xla", SOFTMAX_XLA,
        "    lse = jnp.where(positive, m + jnp.log(safe), -jnp.inf)",
        "    lse = m + jnp.log(safe)",
        "a row that sees no key returns lse = finfo.min + log(1) instead of -inf",
        (f"{_API}::test_fully_masked_rows_are_zero_with_finite_gradients[False-xla]",)),
    Mutant(
        "xla-segments-on-partial-tiles-only", "xla", SOFTMAX_XLA,
        "    visible = visible & (q_seg_tile[:, None, None, :, None] == kv_seg_tile[:, None, None, None, :])",
        "    visible = visible & ((kind != block_mask_lib.PARTIAL)\n"
        "                         | (q_seg_tile[:, None, None, :, None] == kv_seg_tile[:, None, None, None, :]))",
        "segment ids applied only on PARTIAL tiles: FULL tiles attend across documents",
        (f"{_XLA}::test_sinks_softcap_segments_combinations[None-True]",)),
    # ---------------------------------------------------------------- BlockMask
    Mutant(
        "blockmask-padded-key-block-full", "block_mask", "attn_jax/block_mask.py",
        "    kinds = np.where((cols == grid.nk - 1) & (kinds == FULL), PARTIAL, kinds).astype(np.int8)",
        "    kinds = kinds.astype(np.int8)",
        "a key block that contains padding (a PARTIAL tile) is marked FULL: padded keys get attended",
        ("tests/test_block_mask.py::test_kinds_match_brute_force",), quick=True),
    Mutant(
        "blockmask-union-full-if-any-head", "block_mask", "attn_jax/block_mask.py",
        "    all_full = full_keys[full_counts == self.num_masks]",
        "    all_full = full_keys[full_counts >= 1]",
        "the head-union BlockMask (xla backend) marks a tile FULL when one head has it FULL",
        ("tests/test_block_mask.py::test_head_dependent_mask_and_union",)),
    # ---------------------------------------------------------------- masks
    Mutant(
        "mask-window-off-by-one", "masks", "attn_jax/masks.py",
        "    return (kv_idx >= d - self.left) & (kv_idx <= d + self.right)",
        "    return (kv_idx > d - self.left) & (kv_idx <= d + self.right)",
        "the sliding window sees left - 1 keys behind the query instead of left",
        ("tests/test_masks.py::test_constructors_match_definitions",), quick=True),
    Mutant(
        "mask-window-bounds-off-by-one", "masks", "attn_jax/masks.py",
        "    may = (k_hi >= q_lo + o - self.left) & (k_lo <= q_hi + o + self.right)",
        "    may = (k_hi > q_lo + o - self.left) & (k_lo <= q_hi + o + self.right)",
        "block bounds of a window drop a tile whose only visible pair is the window's far corner",
        ("tests/test_block_mask.py::test_kinds_match_brute_force",)),
    Mutant(
        "mask-sink-token-dropped", "masks", "attn_jax/masks.py",
        "    visible = (kv_idx < self.n) & _true_like(q_idx, kv_idx)",
        "    visible = (kv_idx < self.n - 1) & _true_like(q_idx, kv_idx)",
        "sink_tokens(n) keeps only n - 1 sink tokens",
        ("tests/test_masks.py::test_constructors_match_definitions",)),
    Mutant(
        "mask-causal-diagonal-tile-full", "masks", "attn_jax/masks.py",
        "    return k_lo <= q_hi + o, k_hi <= q_lo + o",
        "    return k_lo <= q_hi + o, k_hi <= q_hi + o",
        "causal block bounds mark the diagonal (PARTIAL) tiles FULL: queries see the future there",
        ("tests/test_block_mask.py::test_causal_structure_counts",)),
    # ---------------------------------------------------------------- linear attention, xla
    Mutant(
        "linear-decay-one-step-late", "linear_xla", "attn_jax/linear/xla.py",
        "    g = g.reshape(batch, n, chunk, hs).transpose(0, 3, 1, 2)  # [B, Hs, N, C]\n"
        "    local = jnp.cumsum(g, axis=3)",
        "    g = g.reshape(batch, n, chunk, hs).transpose(0, 3, 1, 2)  # [B, Hs, N, C]\n"
        "    local = jnp.cumsum(g, axis=3) - g",
        "the chunk-local cumulative decay is exclusive: each token's decay is applied one step late",
        (f"{_LINEAR_XLA}::test_xla_matches_reference[scalar-T37-4x1-elu_plus_one-normTrue-segTrue-s0False-C16-float32]",),
        quick=True),
    Mutant(
        "linear-xla-gla-gate-on-value-side", "linear_xla", "attn_jax/linear/xla.py",
        "  carry = jnp.broadcast_to(f.carry[..., None] if channel else f.carry[..., None, None],\n"
        "                           (b, hs, n) + ((kd, 1) if channel else (1, 1)))",
        "  carry = jnp.broadcast_to(f.carry[..., None, :] if channel else f.carry[..., None, None],\n"
        "                           (b, hs, n) + ((1, kd) if channel else (1, 1)))",
        "the per-channel (GLA) state carry scales the value columns of S instead of the key rows",
        (f"{_LINEAR_XLA}::test_xla_matches_reference[channel-T70-2x2-None-normFalse-segTrue-s0True-C32-float32]",)),
    Mutant(
        "linear-segment-state-leaks", "linear_xla", "attn_jax/linear/xla.py",
        "    carry_keep = (r_last == r_prev).astype(jnp.float32)[:, None]",
        "    carry_keep = jnp.ones_like(r_last, jnp.float32)[:, None]",
        "a document that starts inside a chunk does not reset the state carried past the chunk",
        (f"{_LINEAR_XLA}::test_xla_matches_reference[fixed-T130-4x4-None-normFalse-segTrue-s0True-CNone-float32]",)),
    Mutant(
        "linear-xla-final-state-rounded", "linear_xla", "attn_jax/linear/xla.py",
        "  return o.astype(spec.out_dtype), final",
        "  return o.astype(spec.out_dtype), final.astype(spec.out_dtype).astype(jnp.float32)",
        "the float32 final state passes through the input dtype (bf16) before it is returned",
        (f"{_LINEAR_XLA}::test_xla_matches_reference[scalar-T100-4x2-None-normFalse-segTrue-s0True-C32-bfloat16]",)),
    # ---------------------------------------------------------------- linear attention kernels
    Mutant(
        "linear-kernel-carry-one-step-late", "linear_kernels", LINEAR_COMMON,
        "  last = row_index == row_index.shape[0] - 1",
        "  last = row_index == row_index.shape[0] - 2",
        "the state carry across a chunk omits the last token's decay (applied one chunk late)",
        (_linear_case("tpu-scalar-gqa-segments"), _linear_case("gpu-fixed-qheads-segments"))),
    Mutant(
        "linear-kernel-segments-ignored-in-chunk", "linear_kernels", LINEAR_COMMON,
        "  if r_col is not None:\n    mask = mask & (r_col == r_row)",
        "  if r_col is not None:\n    mask = mask & (r_col == r_col)",
        "inside a chunk, tokens of different documents interact (the run mask is ignored)",
        (_linear_case("gpu-fixed-qheads-segments"),)),
    Mutant(
        "linear-kernel-state-gradient-not-decayed", "linear_kernels", LINEAR_COMMON,
        "  dstate = dstate if carry is None else carry * dstate",
        "  dstate = dstate",
        "the backward sweep carries the state gradient across chunks without the chunk's decay",
        (_linear_case("tpu-scalar-gqa-segments"),)),
    Mutant(
        "linear-gla-diagonal-self-term-dropped", "linear_kernels", LINEAR_COMMON,
        "      e = masked_exp(_full(rows, b_blk.shape) >= m, b_blk - b_m)  # exp(b_i - b_m), i >= m",
        "      e = masked_exp(_full(rows, b_blk.shape) > m, b_blk - b_m)  # exp(b_i - b_m), i >= m",
        "the GLA sub-chunk diagonal drops the i == j term (a token no longer sees itself)",
        (_gla_case("gpu-gqa-segments-chunk16"),)),
    Mutant(
        "linear-gpu-gla-gate-on-value-side", "linear_kernels", "pallas_kernels/linear_gpu.py",
        "  return r[\"carry\"][:, pl.ds(c, 1)]  # [K, 1] of the [K, N] carries",
        "  return r[\"carry\"][:, pl.ds(c, 1)].T  # [K, 1] of the [K, N] carries",
        "the GPU GLA kernels scale the value columns of the state by the key-channel gates",
        (_gla_case("gpu-gqa-segments-chunk16"),)),
    Mutant(
        "linear-tpu-gla-gate-on-value-side", "linear_kernels", "pallas_kernels/linear_tpu.py",
        "  state = r[\"carry\"][...] * state + lc.dot(k32 * r[\"kf\"][...], v, lc.TN, dt)",
        "  state = r[\"carry\"][...].T * state + lc.dot(k32 * r[\"kf\"][...], v, lc.TN, dt)",
        "the TPU GLA forward kernel scales the value columns of the state by the key-channel gates",
        (_gla_case("tpu-gqa-segments-ragged"),)),
    Mutant(
        "linear-adapter-state-gradient-per-head", "linear_kernels", "attn_jax/linear/pallas.py",
        "  dst = jnp.zeros((b, hs, g) + dst.shape[2:], jnp.float32).at[:, :, 0].set(dst)"
        ".reshape(b, hq, *dst.shape[2:])",
        "  dst = jnp.broadcast_to(dst[:, :, None], (b, hs, g) + dst.shape[2:]).reshape(b, hq, *dst.shape[2:])",
        "the final-state gradient enters the backward sweep of every query head of a GQA group",
        (_linear_case("tpu-scalar-gqa-segments"),)),
    # ---------------------------------------------------------------- neighborhood attention
    Mutant(
        "nb-border-window-clipped", "neighborhood", "attn_jax/neighborhood/windows.py",
        "  centre = xp.maximum(xp.minimum(leader, length - 1 - right), left)",
        "  centre = xp.minimum(leader, length - 1 - right)",
        "at the left border the window is clipped instead of shifted inward",
        (f"{_NB_MASK}::test_permuted_mask_matches_definition",), quick=True),
    Mutant(
        "nb-dilation-class-length", "neighborhood", "attn_jax/neighborhood/windows.py",
        "  return masks_lib.div_nonneg(length - r + (dilation - 1), dilation, np if xp is None else xp)",
        "  return masks_lib.div_nonneg(length - r + dilation, dilation, np if xp is None else xp)",
        "a dilation residue class whose length divides evenly is one position too long",
        (f"{_NB_MASK}::test_permuted_mask_matches_definition",)),
    Mutant(
        "nb-stride-leader", "neighborhood", "attn_jax/neighborhood/windows.py",
        "  leader = xp.minimum(group + stride // 2, length - 1)",
        "  leader = xp.minimum(group + (stride - 1) // 2, length - 1)",
        "with an even stride the group leader is the query before the centre",
        (f"{_NB_MASK}::test_permuted_mask_matches_definition",)),
    Mutant(
        "nb-partial-block-full", "neighborhood", "attn_jax/neighborhood/mask.py",
        "      must_a = (start_b <= e_lo) & (e_hi <= end_a)",
        "      must_a = (start_a <= e_lo) & (e_hi <= end_b)",
        "neighborhood block bounds mark a block FULL when any query (not every query) sees its keys",
        ("tests/neighborhood/test_pallas_full_blocks.py::test_full_blocks_match_dense_reference_and_visit_the_blockmask"
         "[1d_dilated_causal_strided-pallas_gpu-bfloat16]",
         f"{_NB_MASK}::test_block_classification_is_exact_for_tiles_and_sound_for_any_blocks")),
    Mutant(
        "nb-kernel-blocks-not-tile-aligned", "neighborhood", "attn_jax/neighborhood/api.py",
        "  return dataclasses.replace(config, block_q=block_size, block_kv=block_size)",
        "  return dataclasses.replace(config, block_q=block_size, block_kv=block_size // 2)",
        "the kernel's key blocks are half a grid tile: still exact, but FULL blocks turn PARTIAL",
        ("tests/neighborhood/test_pallas_full_blocks.py::test_full_blocks_match_dense_reference_and_visit_the_blockmask"
         "[2d_blocked_aligned-pallas_tpu-float32]",)),
    # ---------------------------------------------------------------- decoding caches, generation
    Mutant(
        "rolling-cache-evicts-sink", "decoding", "attn_jax/layers/cache.py",
        "    return jnp.where(position < n, position, n + (position - n) % w)",
        "    return jnp.where(position < n, position, (position - n) % (n + w))",
        "the rolling cache's ring spans the sink slots, so new tokens overwrite the sinks",
        ("tests/models/test_generate.py::test_lm_rolling_cache_bounded_over_10x_window",), quick=True),
    Mutant(
        "rolling-cache-fill-drops-sinks", "decoding", "attn_jax/layers/cache.py",
        "    positions = jnp.concatenate([jnp.where(sink_pos < t, sink_pos, -1), win_pos]).astype(jnp.int32)",
        "    positions = jnp.concatenate([jnp.full_like(sink_pos, -1), win_pos]).astype(jnp.int32)",
        "prefilling a rolling cache leaves the sink slots empty",
        ("tests/layers/test_decode.py::test_rolling_cache_fill_keeps_sinks_and_last_window",)),
    Mutant(
        "softmax-mixer-decode-ignores-mask", "decoding", "attn_jax/layers/mixers/softmax.py",
        "    visible = cache.visible(position, self.mask)",
        "    visible = cache.visible(position, masks_lib.causal())",
        "a softmax mixer's decoding step sees every cached key before it, whatever its mask (chunks, a "
        "window on a full cache)",
        ("tests/layers/test_decode.py::test_softmax_decode_equals_full[chunked]",
         "tests/layers/test_decode.py::test_softmax_decode_equals_full[window_full_cache]")),
    Mutant(
        "softmax-mixer-drops-sink-tokens", "decoding", "attn_jax/layers/mixers/softmax.py",
        "      mask = mask | masks_lib.sink_tokens(self.num_sink_tokens, causal=self.causal)",
        "      mask = mask",
        "the softmax mixer's num_sink_tokens adds no sink to its window mask",
        ("tests/layers/test_decode.py::test_rolling_cache_is_the_window_sink_mask_and_bounded",)),
    Mutant(
        "linear-mixer-decode-drops-decay", "decoding", "attn_jax/layers/mixers/linear.py",
        "    state, o = step_fn(\"linear\")(cache.state, q[:, 0], k[:, 0], v[:, 0], log_decay,",
        "    state, o = step_fn(\"linear\")(cache.state, q[:, 0], k[:, 0], v[:, 0], None,",
        "the linear mixer's decoding step never decays its state (fixed or data-dependent decay)",
        ("tests/layers/test_mixer_wiring.py::test_linear_hybrid_lm_decode_equals_full[real]",)),
    Mutant(
        "generate-ignores-key", "decoding", "attn_jax/models/decoding.py",
        "  rng, sub = jax.random.split(rng)\n  first = sample_logits(",
        "  rng, sub = jax.random.split(jax.random.PRNGKey(0))\n  first = sample_logits(",
        "generation samples with a fixed key whatever rng the caller passes",
        ("tests/models/test_generate_sampling.py::test_sampling_follows_the_key",)),
    Mutant(
        "generate-key-not-split-per-step", "decoding", "attn_jax/models/decoding.py",
        "    rng, sub = jax.random.split(rng)\n    nxt = sample_logits(",
        "    sub = rng\n    nxt = sample_logits(",
        "every decode step samples with the same key",
        ("tests/models/test_generate_sampling.py::test_each_step_draws_fresh_randomness",)),
    # ---------------------------------------------------------------- mechanisms
    Mutant(
        "moh-routes-to-least-likely-heads", "mechanisms", "attn_jax/mechanisms/moh.py",
        "  _, idx = jax.lax.top_k(routed_logits, top_k)",
        "  _, idx = jax.lax.top_k(-routed_logits, top_k)",
        "mixture-of-heads routing activates the k least likely routed heads instead of the top k",
        ("tests/mechanisms/test_attention_variants.py::test_moh_gates",)),
    Mutant(
        "compressed-conv-value-shift-two-steps", "mechanisms", "attn_jax/mechanisms/compressed_conv.py",
        "  shifted = jnp.pad(v_previous, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]",
        "  shifted = jnp.pad(v_previous, ((0, 0), (2, 0), (0, 0), (0, 0)))[:, :-2]",
        "the value shift reads the values two tokens back instead of one",
        ("tests/mechanisms/test_attention_variants.py::test_compressed_conv_attention_is_causal_and_value_shift",)),
    Mutant(
        "selective-temperature-linear-in-position", "mechanisms", "attn_jax/mechanisms/selective.py",
        "position_scale * jnp.log1p(positions)[..., None]",
        "position_scale * positions[..., None]",
        "selective attention's position term grows like i instead of log(1 + i)",
        ("tests/mechanisms/test_attention_variants.py::test_selective_temperature",)),
    Mutant(
        "titans-decode-step-never-forgets", "mechanisms", "attn_jax/mechanisms/titans.py",
        "    a = tuple((1.0 - dec) * a_l + s_l for a_l, s_l in zip(a, s))",
        "    a = tuple(a_l + s_l for a_l, s_l in zip(a, s))",
        "the Titans memory's decoding step drops the forgetting gate (1 - alpha_t)",
        ("tests/mechanisms/test_titans.py::test_decode_steps_equal_recompute",)),
    Mutant(
        "registry-accepts-misspelt-field", "mechanisms", "attn_jax/layers/registry.py",
        "  unknown = sorted(set(fields) - set(valid))",
        "  unknown = []",
        "a misspelt mixer field is not reported by name with the mechanism's valid fields",
        ("tests/layers/test_registry.py::test_mixer_config_errors_name_the_mechanism_and_its_fields",)),
    Mutant(
        "schedule-repeats-last-mixer", "mechanisms", "attn_jax/layers/block.py",
        "  return tuple(schedule[i % len(schedule)] for i in range(num_layers))",
        "  return tuple(schedule[min(i, len(schedule) - 1)] for i in range(num_layers))",
        "a hybrid schedule is not cycled over the layers: the last mixer fills every remaining layer",
        ("tests/layers/test_rope_nn.py::test_schedule_cycles_and_checks",)),
    # ---------------------------------------------------------------- traced BlockMask, content-dependent sparsity
    Mutant(
        "traced-transpose-drops-last-entry", "dynamic_sparse", TRACED,
        "  valid = (jnp.arange(w) < counts[..., None]).reshape(bm * hm, nq * w)",
        "  valid = (jnp.arange(w) < counts[..., None] - 1).reshape(bm * hm, nq * w)",
        "the transposed (dK/dV) lists leave out the last entry of every query block's list (its diagonal "
        "block under causal masking)",
        (f"{_TRACED}::test_from_scores_matches_numpy_selection_and_transposes[causal]",
         f"{_TRACED}::test_gpu_kernel_matches_reference[gqa_group_lists_sinks]"), quick=True),
    Mutant(
        "traced-selected-partial-marked-full", "dynamic_sparse", TRACED,
        "  kinds = jnp.where(in_list, static[rows, indices], EMPTY).astype(jnp.int32)",
        "  kinds = jnp.where(in_list, FULL, EMPTY).astype(jnp.int32)",
        "every selected block is marked FULL: a selected PARTIAL block loses the static (causal) part",
        (f"{_TRACED}::test_gpu_kernel_matches_reference[gqa_group_lists_sinks]",
         f"{_TRACED}::test_from_scores_matches_numpy_selection_and_transposes[causal]")),
    Mutant(
        "traced-keep-blocks-compete-in-topk", "dynamic_sparse", TRACED,
        "    eligible = eligible & ~jnp.asarray(keep_dense)",
        "    eligible = eligible",
        "the always-kept blocks also take part in the top-k, so a row whose kept block scores high gets "
        "top_k - 1 chosen blocks",
        (f"{_TRACED}::test_from_scores_matches_numpy_selection_and_transposes[causal]",)),
    Mutant(
        "traced-nan-scores-selected", "dynamic_sparse", TRACED,
        "    candidates = jnp.where(jnp.isnan(candidates), -jnp.inf, candidates)\n",
        "",
        "NaN block scores are not turned into -inf before the top-k: a NaN block takes a top-k slot (and is "
        "then dropped), so its row keeps fewer blocks",
        (f"{_TRACED}::test_nan_and_minus_inf_scores_are_never_selected",)),
    Mutant(
        "gpu-traced-lists-of-batch-0", "dynamic_sparse", SOFTMAX_PALLAS,
        "                               head_group=s.num_q_heads // hm, per_batch=bm > 1, list_heads=hm,",
        "                               head_group=s.num_q_heads // hm, per_batch=False, list_heads=hm,",
        "the GPU kernels read batch row 0's traced lists for every batch row of a per-batch selection",
        (f"{_TRACED}::test_gpu_kernel_matches_reference[gqa_group_lists_sinks]",)),
    Mutant(
        "topk-scores-of-first-head-of-group", "dynamic_sparse", "attn_jax/mechanisms/block_topk.py",
        "  qbar = _pooled(q, block_size, tq).reshape(b, -1, hkv, hq // hkv, d).mean(3)  # [B, nq, Hkv, D]",
        "  qbar = _pooled(q, block_size, tq).reshape(b, -1, hkv, hq // hkv, d)[:, :, :, 0]  # [B, nq, Hkv, D]",
        "block top-k scores a GQA group's blocks by its first query head instead of pooling every head "
        "of the group",
        (f"{_SPARSE_MECH}::test_block_scores_pool_every_query_head_of_the_group",), quick=True),
    Mutant(
        "xla-sparse-softcap-missing-in-backward", "dynamic_sparse", "attn_jax/softmax/xla_sparse.py",
        "      ds = ds * (1.0 - th * th)",
        "      ds = ds",
        "the traced-mask xla backend leaves the soft-cap's tanh derivative out of dS",
        (f"{_TRACED}::test_xla_matches_reference[per_q_head_lists_cap_segments]",)),
    Mutant(
        "xla-sparse-padding-entries-live", "dynamic_sparse", "attn_jax/softmax/xla_sparse.py",
        "  live = jnp.arange(w) < counts[..., None]                                   # [B, Hkv, Gm, W]",
        "  live = jnp.arange(w) <= counts[..., None]                                  # [B, Hkv, Gm, W]",
        "the first padding entry of a short list (a repeat of the last key block) is attended: that block "
        "counts twice in the softmax",
        (f"{_TRACED}::test_xla_matches_reference[gqa_group_lists_sinks]",)),
    Mutant(
        "hyper-merge-lse-sign", "dynamic_sparse", "attn_jax/mechanisms/sparse_common.py",
        "  return out / safe[..., None], jnp.where(total > 0, m_safe + jnp.log(safe), -jnp.inf)",
        "  return out / safe[..., None], jnp.where(total > 0, m_safe - jnp.log(safe), -jnp.inf)",
        "merge_lse returns max - log(sum) as the merged LSE: HyperAttention's recursion weighs its halves "
        "wrongly",
        (f"{_SPARSE_MECH}::test_fast_form_matches_its_oracle_values_and_gradients[hyper_causal]",)),
    Mutant(
        "landmark-retrieves-own-block", "dynamic_sparse", "attn_jax/mechanisms/sparse_common.py",
        "    earlier = jnp.arange(nb) < i",
        "    earlier = jnp.arange(nb) <= i",
        "landmark / superlinear retrieval counts the query's own block among the earlier blocks (off by "
        "one): it is gated twice and its future keys are visible",
        (f"{_SPARSE_MECH}::test_fast_form_matches_its_oracle_values_and_gradients[landmark_retrieve]",)),
    Mutant(
        "dma-ties-go-to-earlier-keys", "dynamic_sparse", "attn_jax/mechanisms/dynamic_mask.py",
        "  return (v1 > v2) | ((v1 == v2) & (p1 > p2))",
        "  return (v1 > v2) | ((v1 == v2) & (p1 < p2))",
        "Dynamic Mask Attention's threshold breaks bias ties towards earlier keys instead of recent ones",
        (f"{_SPARSE_MECH}::test_dynamic_mask_with_zero_bias_is_a_sliding_window",)),
    Mutant(
        "dma-block-list-from-last-row", "dynamic_sparse", "attn_jax/mechanisms/dynamic_mask.py",
        "  p0 = jnp.minimum(jnp.arange(nq) * block_size + offset, tk - 1)",
        "  p0 = jnp.minimum(jnp.arange(nq) * block_size + offset + block_size - 1, tk - 1)",
        "DMA's block lists use the last row's threshold (the highest of the block): key blocks kept only by "
        "the block's earlier rows are skipped",
        (f"{_SPARSE_MECH}::test_dynamic_mask_visits_only_blocks_with_kept_keys",
         f"{_SPARSE_MECH}::test_fast_form_matches_its_oracle_values_and_gradients[dynamic_mask]")),
    Mutant(
        "cca-core-tile-full-if-any-query-sees", "dynamic_sparse", "attn_jax/mechanisms/core_context.py",
        "    core_must = ((c_hi + 1) * g + (w - 1) <= q_lo)",
        "    core_must = ((c_hi + 1) * g + (w - 1) <= q_hi)",
        "Core Context block bounds mark a core tile FULL when its last query (not every query) may see "
        "every core",
        (f"{_SPARSE_MECH}::test_fast_form_matches_its_oracle_values_and_gradients[core_context]",)),
    Mutant(
        "dhsa-budget-off-by-one", "dynamic_sparse", "attn_jax/mechanisms/dhsa.py",
        "    return logits, rank < budget",
        "    return logits, rank <= budget",
        "DHSA keeps budget + 1 keys per query",
        (f"{_SPARSE_MECH}::test_fast_form_matches_its_oracle_values_and_gradients[dhsa]",)),
    Mutant(
        "routing-keys-routed-by-queries", "dynamic_sparse", "attn_jax/mechanisms/routing.py",
        "  mq, mk = _members(rq, centroids, cluster_size), _members(rk, centroids, cluster_size)",
        "  mq, mk = _members(rq, centroids, cluster_size), _members(rq, centroids, cluster_size)",
        "Routing Transformer assigns keys to clusters by their queries' routing vectors",
        (f"{_SPARSE_MECH}::test_fast_form_matches_its_oracle_values_and_gradients[routing_local_heads]",)),
    Mutant(
        "routing-centroid-update-ignores-keys", "dynamic_sparse", "attn_jax/mechanisms/routing.py",
        "  vecs = jnp.concatenate([rq, rk], axis=2)",
        "  vecs = rq",
        "the Routing Transformer's online k-means step updates the centroids from the queries only",
        (f"{_SPARSE_MECH}::test_routing_centroid_update_is_one_online_kmeans_step",)),
    Mutant(
        "recycled-selection-of-first-head", "dynamic_sparse", "attn_jax/mechanisms/recycled.py",
        "    group_p = p.reshape(b, hkv, g, total).sum(2)                                          # [B, Hkv, T]",
        "    group_p = p.reshape(b, hkv, g, total)[:, :, 0]                                        # [B, Hkv, T]",
        "Recycled Attention picks a GQA group's recycled keys from its first query head's attention "
        "instead of the group's",
        ("tests/mechanisms/test_sparse_mechanisms.py::test_recycled_decoding_matches_its_oracle",)),
    Mutant(
        "selective-cache-stores-unscaled-values", "mechanisms", "attn_jax/layers/mixers/selective.py",
        "    return self.proj.o_proj(o), cache.fill(k, vt).constrained()",
        "    return self.proj.o_proj(o), cache.fill(k, v).constrained()",
        "selective attention's prefill caches the values without their value temperature, so decoding "
        "disagrees with the full call",
        ("tests/layers/test_mechanism_mixers.py::test_prefill_and_decode_equal_the_full_call_with_trained_temperatures",)),
    Mutant(
        "moh-decode-ignores-gates", "mechanisms", "attn_jax/layers/mixers/moh.py",
        "    o = (o.astype(jnp.float32) * self.gates(x).gates[..., None]).astype(q.dtype)\n",
        "",
        "a MoH decoding step sums every head unweighted instead of applying the token's head gates",
        ("tests/layers/test_registry.py::test_generate_with_cache_equals_full_recomputation[moh]",)),
    Mutant(
        "moh-balance-loss-never-returned", "mechanisms", "attn_jax/layers/mixers/moh.py",
        "{AUX_NAME: self.config.balance_weight * g.load_balance_loss}",
        "{AUX_NAME: 0.0 * g.load_balance_loss}",
        "MoH's load-balancing loss never reaches the training loss (the router is trained by the task alone)",
        ("tests/layers/test_mechanism_mixers.py::test_moh_layer_is_the_stage1_function_and_returns_its_balance_loss",
         "tests/layers/test_mechanism_mixers.py::test_moh_balance_loss_reaches_the_training_loss_and_the_router")),
    Mutant(
        "titans-mixer-ignores-miras-objective", "mechanisms", "attn_jax/layers/mixers/titans.py",
        "chunk_size=self.chunk_size, objective=self.objective,",
        "chunk_size=self.chunk_size, objective=\"l2\",",
        "a Titans registry config's Miras objective (lp, Huber) is silently replaced by Titans' l2",
        ("tests/layers/test_mechanism_mixers.py::test_titans_layer_is_the_stage1_block_on_its_weights",)),
    Mutant(
        "rcmha-mixer-not-causal", "mechanisms", "attn_jax/layers/mixers/rcmha.py",
        "    self.mask = masks_lib.causal()",
        "    self.mask = masks_lib.full()",
        "the RCMHA layer attends to future tokens",
        ("tests/layers/test_mechanism_mixers.py::test_rcmha_layer_is_the_stage1_function_on_its_weights",)),
    Mutant(
        "local-linear-mixer-ignores-ridge", "mechanisms", "attn_jax/layers/mixers/local_linear.py",
        "ridge=float(self.config.ridge)",
        "ridge=1.0",
        "the local linear attention layer ignores its config's ridge (lambda)",
        ("tests/layers/test_mechanism_mixers.py::test_local_linear_layer_is_the_stage1_function_on_its_weights",)),
    # ---------------------------------------------------------------- sharding
    Mutant(
        "sharding-sequence-axis-unused", "sharding", "attn_jax/sharding.py",
        "      (\"seq\", \"sequence\"),",
        "      (\"seq\", None),",
        "the default rules never split activations over the sequence mesh axis",
        ("tests/test_sharding.py::test_sequence_mesh_axis_splits_activations",)),
    # ---------------------------------------------------------------- benchmark and quality suites
    Mutant(
        "efficiency-fwd-bwd-times-forward-only", "benchmark", "experiments/efficiency.py",
        "      fn = jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2) if cross else (0, 1))",
        "      fn = fwd",
        "the fwd_bwd mode measures the forward pass only",
        ("tests/test_benchmark_properties.py::test_measurements_have_the_properties_the_report_relies_on",)),
    Mutant(
        "efficiency-length-first-win", "benchmark", "experiments/efficiency.py",
        "        if not win:\n          break",
        "        if not win:\n          continue",
        "the efficiency length is the shortest winning length, not the start of the final winning run",
        ("tests/test_benchmark.py::test_efficiency_length_definition",)),
    Mutant(
        "efficiency-memory-length-from-time", "benchmark", "experiments/efficiency.py",
        "    for metric, field in ((\"time\", \"time_ms\"), (\"memory\", \"temp_mib\")):",
        "    for metric, field in ((\"time\", \"time_ms\"), (\"memory\", \"time_ms\")):",
        "the memory efficiency length is computed from the times",
        ("tests/test_benchmark_properties.py::test_efficiency_lengths_on_synthetic_numbers",)),
    Mutant(
        "efficiency-dense-baseline-never-causal", "benchmark", "experiments/efficiency.py",
        "    return self.proj.o_proj(jax.nn.dot_product_attention(q, k, v, is_causal=self.causal))",
        "    return self.proj.o_proj(jax.nn.dot_product_attention(q, k, v, is_causal=False))",
        "the jax.nn dense baseline times full attention in the causal patterns",
        ("tests/test_benchmark.py::test_dense_baseline_is_jax_nn_and_matches_the_reference_in_every_pattern",)),
    Mutant(
        "quality-reports-worst-learning-rate", "benchmark", "experiments/quality.py",
        "  best = max(good, key=lambda r: r[\"accuracy\"])",
        "  best = min(good, key=lambda r: r[\"accuracy\"])",
        "a learning-rate sweep reports its worst run instead of its best",
        ("tests/test_benchmark_properties.py::test_quality_cell_reports_the_evaluated_accuracy",)),
)


# Patches that cannot be caught by design (they do not change any result), documented so that
# nobody adds them expecting a kill: (name, file, why). Not run.
EQUIVALENT: tuple[tuple[str, str, str], ...] = (
    ("xla-masked-rows-lse-not-guarded", SOFTMAX_XLA,
     "Dropping the backward pass's `lse -> +inf` guard for rows that saw no key: such a row is invisible on "
     "every tile it visits, so p = where(visible, exp(s - lse), 0) is 0 whatever exp(s + inf) gives, and padded "
     "rows are padded with +inf anyway. The guard is defensive; the tests cannot tell it is gone."),
)
