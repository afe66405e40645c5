"""Forward Triton kernel of shared-prefix attention.

One launch covers the whole packed batch. Every program owns one query tile (a
:class:`~.triton_common.QueryTile` row of the schedule built in ``triton_backend``) for a
pack of query heads sharing one KV head, and folds the key runs of :func:`~.triton_common.walk_key_runs` into an online
softmax in the log2 domain. Attention sinks start each row's softmax at the sink logit
(running max = sink, running sum = 1), so the sink joins the denominator and the lse and
the output needs no other change.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_autotune import autotune_inner_block, launchable
from .triton_common import (
    FEATURE_SWITCHES, LN2, LOG2E, HeadPacking, ScoreFeatures, dot_precision, key_block_scores, padded_head_dim,
    query_tile_prologue, walk_key_runs,
)


@triton.jit
def attend_key_block(
    state, scores_ctx, key_start, key_end, window_shift,
    MASK: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, CHECK_DIMS: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold keys ``[key_start, key_start + BLOCK_N)`` into ``state = (acc, row_max, row_sum)``."""
    acc, row_max, row_sum = state
    k, v, scores, _ = key_block_scores(scores_ctx, key_start, key_end, window_shift, MASK, WINDOWED,
                                       SOFTCAP, CHECK_DIMS, BLOCK_N, DOT_PRECISION)
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    if WINDOWED:
        # A window can hide a whole block from a row that has seen no key yet: exponentiate
        # against 0 instead of -inf there (its probabilities and rescale are then 0).
        exp_base = tl.where(new_max == float("-inf"), 0.0, new_max)
    else:
        # Outside a window's band every row sees a finite score in the first block it meets
        # (the prefix, or the segment start), so new_max is finite: no -inf - -inf.
        exp_base = new_max
    rescale = tl.exp2(row_max - exp_base)
    probs = tl.exp2(scores - exp_base[:, None])
    row_sum = row_sum * rescale + tl.sum(probs, 1)
    acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, new_max, row_sum


@triton.jit
def prefix_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, sinks_ptr, out_ptr, lse_ptr, q_tiles_ptr, runs_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    num_q_heads, heads_per_kv, score_scale, softcap_log2, window,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CHECK_DIMS: tl.constexpr,
    BLOCK_M: tl.constexpr, TILE_TOKENS: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    tile_row, heads, rows, row_ok, row_offsets, dims, dim_ok, scores_ctx = query_tile_prologue(
        q_tiles_ptr, q_ptr, k_ptr, v_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        num_q_heads, heads_per_kv, score_scale, softcap_log2, HEAD_DIM, HEAD_DIM_PAD, CHECK_DIMS, BLOCK_M,
        TILE_TOKENS, HEADS_PER_PROGRAM)
    if HAS_SINKS:
        # The sink is a first column of score sink (log2: sink * log2 e) and no value.
        row_max = tl.load(sinks_ptr + heads, mask=row_ok, other=0.0) * LOG2E
        row_sum = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    state = (tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32), row_max, row_sum)
    acc, row_max, row_sum = walk_key_runs(state, attend_key_block, scores_ctx, tile_row, runs_ptr, window,
                                          CHECK_DIMS, TILE_TOKENS, BLOCK_N, DOT_PRECISION,
                                          HAS_WINDOW, HAS_SOFTCAP)

    if HAS_WINDOW:
        # Rows past the segment's end (never stored) may see no key at all under a window.
        row_sum = tl.where(row_ok, row_sum, 1.0)
    out = acc / row_sum[:, None]
    out_ptrs = out_ptr + heads[:, None] * stride_oh + row_offsets * stride_ot + dims[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    lse = (row_max + tl.log2(row_sum)) * LN2
    tl.store(lse_ptr + rows.to(tl.int64) * num_q_heads + heads, lse, mask=row_ok)


_prefix_attention_fwd_tuned = autotune_inner_block(prefix_attention_fwd_kernel, "BLOCK_N", "BLOCK_M",
                                                   extra_keys=("TILE_TOKENS", *FEATURE_SWITCHES, "HAS_SINKS"))


def launch_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_tiles: torch.Tensor, runs: torch.Tensor,
    packing: HeadPacking, softmax_scale: float, features: ScoreFeatures,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]``; each with unit stride on D.
        q_tiles: ``[num_q_tiles, QUERY_TILE_COLUMNS]`` int32 schedule built for tiles of
            ``packing.tile_tokens`` tokens.
        runs: ``[num_runs, ANCESTOR_RUN_COLUMNS]`` int32, the ancestor runs the tiles index.
        packing: the programs' score rows, query heads per program and tokens per tile.
        features: window, softcap and sinks (sinks ``[Hq]`` float32 contiguous, or None).

    Returns ``(out [T, Hq, D] q.dtype, lse [T, Hq] float32)``, both contiguous.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    head_dim_pad = padded_head_dim(head_dim)
    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((num_tokens, num_q_heads), dtype=torch.float32, device=q.device)
    precision = dot_precision(q.dtype)
    kernel, fixed = launchable(prefix_attention_fwd_kernel, _prefix_attention_fwd_tuned, "BLOCK_N", head_dim_pad,
                               packing.block_m, precision)
    score_scale, softcap_log2 = features.score_scales(softmax_scale)
    kernel[(q_tiles.shape[0] * (num_q_heads // packing.heads_per_program),)](
        q, k, v, lse if features.sinks is None else features.sinks,  # sinks not read without HAS_SINKS
        out, lse, q_tiles, runs,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        num_q_heads, num_q_heads // k.shape[1], score_scale, softcap_log2, features.window_or_zero,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, CHECK_DIMS=head_dim != head_dim_pad,
        BLOCK_M=packing.block_m, TILE_TOKENS=packing.tile_tokens,
        HEADS_PER_PROGRAM=packing.heads_per_program, DOT_PRECISION=precision,
        HAS_SINKS=features.sinks is not None, **features.switches(), **fixed,
    )
    return out, lse
