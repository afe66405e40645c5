"""Backward Triton kernels of shared-prefix attention: delta, dQ, and dK/dV.

``delta = rowsum(dO * O) - dLSE`` (the lse output's gradient enters here, because
``d lse / d s_j = p_j``), then ``dS = P * (dP - delta)`` in both gradient kernels, times
``1 - tanh^2`` under a softcap. The lse includes the sinks, so P is already normalized over
them; a sink's own gradient, ``-sum_i p_sink_i * delta_i``, is a cheap ``[Hq, T]``
reduction done in torch after the kernels (deterministic too).

* dQ: one program per (query tile, pack of query heads), the forward's schedule, head
  packing and key runs.
* dK/dV: one program per (key-tile chunk, KV head), looping over the query heads that
  share the KV head. The queries that see a key tile form the single packed range
  ``[k_start, subtree_end)``: the tile's segment's later tokens, then every token of its
  descendants (pre-order packing puts a segment's subtree right behind it; on a
  one-level layout, a prefix tile's range runs to the end of its group, a completion
  tile's ends with the completion). Queries are walked as the diagonal (causal mask,
  also exact for descendant queries, whose packed index exceeds every key of the tile),
  full unmasked blocks, and a bounded last block. A long range (a root tile sees every
  query below it) is split into chunks, one program each (a
  :class:`~.triton_common.KeyTile` row per chunk), so GQA's few KV heads still fill the
  GPU; a split tile's programs write fp32 partials to their own scratch slots and
  ``dkdv_reduce_kernel`` sums them in slot order. No atomics anywhere: the backward is
  bitwise repeatable. With a window the schedule lists only the queries whose window
  reaches the tile, one range per segment (each with its ``pos_shift``), and the kernel
  masks only the last blocks, where some query stops seeing some key.

lse and delta are kept head-major (``[Hq, T]``) here so a block of query rows reads its
statistics contiguously.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_autotune import autotune_inner_block, launchable
from .triton_common import (
    BOUND_MASK, CAUSAL_MASK, FEATURE_SWITCHES, LOG2E, NO_MASK, HeadPacking, ScoreFeatures, dot_precision,
    key_block_scores, load_key_tile, load_row_pair, load_split_key_tile, load_tile, padded_head_dim,
    query_tile_prologue, walk_key_runs,
)
from .triton_features import softcapped_scores

DELTA_BLOCK_TOKENS = 64


@triton.jit
def delta_kernel(
    out_ptr, dout_ptr, dlse_ptr, delta_ptr, num_tokens,
    stride_ot, stride_oh, stride_dot, stride_doh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    row_offsets = rows[:, None].to(tl.int64)
    out = tl.load(out_ptr + head.to(tl.int64) * stride_oh + row_offsets * stride_ot + dims[None, :],
                  mask=mask, other=0.0)
    dout = tl.load(dout_ptr + head.to(tl.int64) * stride_doh + row_offsets * stride_dot + dims[None, :],
                   mask=mask, other=0.0)
    delta = tl.sum(out.to(tl.float32) * dout.to(tl.float32), 1)
    stat_offsets = head.to(tl.int64) * num_tokens + rows
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + stat_offsets, mask=row_ok, other=0.0)
    tl.store(delta_ptr + stat_offsets, delta, mask=row_ok)


@triton.jit
def dq_key_block(
    dq, ctx, key_start, key_end, window_shift,
    MASK: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, CHECK_DIMS: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Add keys ``[key_start, key_start + BLOCK_N)``'s share of dQ (still unscaled);
    ``ctx = (scores_ctx, dout, lse_log2, delta)``."""
    scores_ctx, dout, lse_log2, delta = ctx
    k, v, scores, capped = key_block_scores(scores_ctx, key_start, key_end, window_shift, MASK, WINDOWED,
                                            SOFTCAP, CHECK_DIMS, BLOCK_N, DOT_PRECISION)
    probs = tl.exp2(scores - lse_log2[:, None])  # exactly 0 where masked (-inf)
    dprobs = tl.dot(dout, tl.trans(v), input_precision=DOT_PRECISION)
    dscores = probs * (dprobs - delta[:, None])
    if SOFTCAP:
        dscores *= 1.0 - capped * capped
    return dq + tl.dot(dscores.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def prefix_attention_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, q_tiles_ptr, runs_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dqt, stride_dqh,
    num_tokens, num_q_heads, heads_per_kv, softmax_scale, score_scale, softcap_log2, window,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CHECK_DIMS: tl.constexpr,
    BLOCK_M: tl.constexpr, TILE_TOKENS: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    tile_row, heads, rows, row_ok, row_offsets, dims, dim_ok, scores_ctx = query_tile_prologue(
        q_tiles_ptr, q_ptr, k_ptr, v_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        num_q_heads, heads_per_kv, score_scale, softcap_log2, HEAD_DIM, HEAD_DIM_PAD, CHECK_DIMS, BLOCK_M,
        TILE_TOKENS, HEADS_PER_PROGRAM)
    dout = load_tile(dout_ptr + heads[:, None] * stride_doh + row_offsets * stride_dot + dims[None, :],
                     row_ok, dim_ok, True, CHECK_DIMS)
    stat_offsets = heads * num_tokens + rows
    lse_log2 = tl.load(lse_ptr + stat_offsets, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + stat_offsets, mask=row_ok, other=0.0)
    dq = walk_key_runs(tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32), dq_key_block,
                       (scores_ctx, dout, lse_log2, delta), tile_row, runs_ptr, window,
                       CHECK_DIMS, TILE_TOKENS, BLOCK_N, DOT_PRECISION, HAS_WINDOW, HAS_SOFTCAP)

    dq_ptrs = dq_ptr + heads[:, None] * stride_dqh + row_offsets * stride_dqt + dims[None, :]
    tl.store(dq_ptrs, (dq * softmax_scale).to(dq_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def dkdv_query_block(
    dk, dv, k, v, keys, q_head, dout_head, lse_head, delta_head,
    stride_qt, stride_dot, query_start, query_end, dims, dim_ok, score_scale, softcap_log2, window_limit,
    MASK: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, CHECK_DIMS: tl.constexpr,
    BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Add queries ``[query_start, query_start + BLOCK_M)``'s share of dK (unscaled), dV;
    ``WINDOWED`` hides query rows ``>= key + window_limit`` from each key."""
    rows, row_ok, q, dout = load_row_pair(q_head, stride_qt, dout_head, stride_dot, query_start, query_end,
                                          dims, dim_ok, MASK != NO_MASK, CHECK_DIMS, BLOCK_M)
    if MASK == NO_MASK:
        lse_log2 = tl.load(lse_head + rows) * LOG2E
        delta = tl.load(delta_head + rows)
    else:
        lse_log2 = tl.load(lse_head + rows, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(delta_head + rows, mask=row_ok, other=0.0)
    scores_t, capped_t = softcapped_scores(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION),
                                           score_scale, softcap_log2, SOFTCAP)
    probs_t = tl.exp2(scores_t - lse_log2[None, :])
    if MASK == CAUSAL_MASK:
        probs_t = tl.where((rows[None, :] >= keys[:, None]) & row_ok[None, :], probs_t, 0.0)
    elif MASK == BOUND_MASK:
        probs_t = tl.where(row_ok[None, :], probs_t, 0.0)
    if WINDOWED:
        probs_t = tl.where(rows[None, :] < keys[:, None] + window_limit, probs_t, 0.0)
    dv += tl.dot(probs_t.to(dout.dtype), dout, input_precision=DOT_PRECISION)
    dprobs_t = tl.dot(v, tl.trans(dout), input_precision=DOT_PRECISION)
    dscores_t = probs_t * (dprobs_t - delta[None, :])
    if SOFTCAP:
        dscores_t *= 1.0 - capped_t * capped_t
    dk += tl.dot(dscores_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def key_tile_rows_and_dims(k_start, k_end, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    """``(keys [BLOCK_N], key_ok, key_offsets [BLOCK_N, 1] int64, dims [HEAD_DIM_PAD], dim_ok)``."""
    keys = k_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM_PAD)
    return keys, keys < k_end, keys[:, None].to(tl.int64), dims, dims < HEAD_DIM


@triton.jit
def partial_tile_offsets(slot, kv_head, num_kv_heads, dims,
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[BLOCK_N, HEAD_DIM_PAD]`` offsets of one slot's tile in a contiguous
    ``[num_slots, Hkv, BLOCK_N, HEAD_DIM]`` partial buffer."""
    tile_base = (slot * num_kv_heads + kv_head.to(tl.int64)) * BLOCK_N
    return (tile_base + tl.arange(0, BLOCK_N))[:, None] * HEAD_DIM + dims[None, :]


@triton.jit
def store_key_grads(dk_ptr, dv_ptr, dk, dv, kv_head, key_offsets, dims, store_mask,
                    stride_dkt, stride_dkh, stride_dvt, stride_dvh, softmax_scale):
    """Write a key tile's finished fp32 dK (still unscaled) and dV in the outputs' dtype."""
    kv_head64 = kv_head.to(tl.int64)
    tl.store(dk_ptr + kv_head64 * stride_dkh + key_offsets * stride_dkt + dims[None, :],
             (dk * softmax_scale).to(dk_ptr.dtype.element_ty), mask=store_mask)
    tl.store(dv_ptr + kv_head64 * stride_dvh + key_offsets * stride_dvt + dims[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def prefix_attention_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dk_partial_ptr, dv_partial_ptr,
    kv_tiles_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    num_tokens, num_kv_heads, heads_per_kv, softmax_scale, score_scale, softcap_log2, window,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CHECK_DIMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = pid // num_kv_heads
    kv_head = pid % num_kv_heads
    k_start, k_end, chunk_start, chunk_end, partial_slot, pos_shift = load_key_tile(kv_tiles_ptr, tile)

    keys, key_ok, key_offsets, dims, dim_ok = key_tile_rows_and_dims(k_start, k_end, HEAD_DIM,
                                                                      HEAD_DIM_PAD, BLOCK_N)
    kv_head64 = kv_head.to(tl.int64)
    k = load_tile(k_ptr + kv_head64 * stride_kh + key_offsets * stride_kt + dims[None, :],
                  key_ok, dim_ok, True, CHECK_DIMS)
    v = load_tile(v_ptr + kv_head64 * stride_vh + key_offsets * stride_vt + dims[None, :],
                  key_ok, dim_ok, True, CHECK_DIMS)

    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    # Only queries below k_start + BLOCK_N can precede a key of the tile: in the chunk
    # that starts at the tile (the others start past it, so their causal run is empty).
    diag_end = tl.maximum(chunk_start, tl.minimum(k_start + BLOCK_N, chunk_end))
    if HAS_WINDOW:
        # A window's schedule also starts chunks (of descendant segments, behind the key
        # tile) between k_start and k_start + BLOCK_N: end the diagonal on a whole block.
        diag_end = tl.minimum(chunk_end, chunk_start + ((diag_end - chunk_start + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
    full_end = diag_end + ((chunk_end - diag_end) // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        # Row sees key iff pos(row) - pos(key) = row - key + pos_shift < window, i.e. row <
        # key + window_limit. The schedule ends the chunk where the tile's last key stops
        # being seen; rows below k_start + window_limit see every key, so only the blocks
        # from band_start on need the window mask (and the diagonal, for a short window).
        window_limit = window - pos_shift
        band_start = tl.minimum(
            full_end, diag_end + (tl.maximum(k_start + window_limit - diag_end, 0) // BLOCK_M) * BLOCK_M)
    else:
        window_limit = 0
        band_start = full_end
    for head_in_group in range(heads_per_kv):
        head = kv_head * heads_per_kv + head_in_group
        head64 = head.to(tl.int64)
        q_head = q_ptr + head64 * stride_qh
        dout_head = dout_ptr + head64 * stride_doh
        lse_head = lse_ptr + head64 * num_tokens
        delta_head = delta_ptr + head64 * num_tokens
        for query_start in range(chunk_start, diag_end, BLOCK_M):
            dk, dv = dkdv_query_block(
                dk, dv, k, v, keys, q_head, dout_head, lse_head, delta_head,
                stride_qt, stride_dot, query_start, chunk_end, dims, dim_ok, score_scale, softcap_log2,
                window_limit, CAUSAL_MASK, HAS_WINDOW, HAS_SOFTCAP, CHECK_DIMS, BLOCK_M, DOT_PRECISION)
        for query_start in range(diag_end, band_start, BLOCK_M):
            dk, dv = dkdv_query_block(
                dk, dv, k, v, keys, q_head, dout_head, lse_head, delta_head,
                stride_qt, stride_dot, query_start, chunk_end, dims, dim_ok, score_scale, softcap_log2,
                window_limit, NO_MASK, False, HAS_SOFTCAP, CHECK_DIMS, BLOCK_M, DOT_PRECISION)
        for query_start in range(band_start, chunk_end, BLOCK_M):
            dk, dv = dkdv_query_block(
                dk, dv, k, v, keys, q_head, dout_head, lse_head, delta_head,
                stride_qt, stride_dot, query_start, chunk_end, dims, dim_ok, score_scale, softcap_log2,
                window_limit, BOUND_MASK, HAS_WINDOW, HAS_SOFTCAP, CHECK_DIMS, BLOCK_M, DOT_PRECISION)

    store_mask = key_ok[:, None] & dim_ok[None, :]
    if partial_slot < 0:
        store_key_grads(dk_ptr, dv_ptr, dk, dv, kv_head, key_offsets, dims, store_mask,
                        stride_dkt, stride_dkh, stride_dvt, stride_dvh, softmax_scale)
    else:
        offsets = partial_tile_offsets(partial_slot, kv_head, num_kv_heads, dims, HEAD_DIM, BLOCK_N)
        tl.store(dk_partial_ptr + offsets, dk, mask=store_mask)
        tl.store(dv_partial_ptr + offsets, dv, mask=store_mask)


@triton.jit
def dkdv_reduce_kernel(
    dk_ptr, dv_ptr, dk_partial_ptr, dv_partial_ptr, split_tiles_ptr,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, num_kv_heads, softmax_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK/dV of a split key tile: its partials summed in slot order (bitwise repeatable)."""
    pid = tl.program_id(0)
    tile = pid // num_kv_heads
    kv_head = pid % num_kv_heads
    k_start, k_end, first_slot, num_slots = load_split_key_tile(split_tiles_ptr, tile)
    _, key_ok, key_offsets, dims, dim_ok = key_tile_rows_and_dims(k_start, k_end, HEAD_DIM,
                                                                      HEAD_DIM_PAD, BLOCK_N)
    store_mask = key_ok[:, None] & dim_ok[None, :]
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    for slot in range(first_slot, first_slot + num_slots):
        offsets = partial_tile_offsets(slot, kv_head, num_kv_heads, dims, HEAD_DIM, BLOCK_N)
        dk += tl.load(dk_partial_ptr + offsets, mask=store_mask, other=0.0)
        dv += tl.load(dv_partial_ptr + offsets, mask=store_mask, other=0.0)
    store_key_grads(dk_ptr, dv_ptr, dk, dv, kv_head, key_offsets, dims, store_mask,
                    stride_dkt, stride_dkh, stride_dvt, stride_dvh, softmax_scale)


_prefix_attention_dq_tuned = autotune_inner_block(prefix_attention_dq_kernel, "BLOCK_N", "BLOCK_M",
                                                  extra_keys=("TILE_TOKENS", *FEATURE_SWITCHES))
# dK/dV spills fewer registers with 2 pipeline stages than with 3 (see triton_autotune).
_prefix_attention_dkdv_tuned = autotune_inner_block(prefix_attention_dkdv_kernel, "BLOCK_M", "BLOCK_N",
                                                    extra_keys=FEATURE_SWITCHES, quick_stages=(2, 3))


def launch_backward(
    dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    q_tiles: torch.Tensor, runs: torch.Tensor, kv_tiles: torch.Tensor, split_kv_tiles: torch.Tensor,
    num_partial_slots: int,
    packing: HeadPacking, kv_tile_size: int, softmax_scale: float, features: ScoreFeatures,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of shared-prefix attention.

    Args:
        dout, out, q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]``; each with unit stride on D.
        dlse, lse: ``[T, Hq]`` float32 (dlse None when lse got no gradient).
        q_tiles: ``[num_q_tiles, QUERY_TILE_COLUMNS]`` int32, tiles of ``packing.tile_tokens``
            query tokens, each for ``packing.heads_per_program`` heads at a time; runs:
            ``[num_runs, ANCESTOR_RUN_COLUMNS]`` int32, the ancestor runs they index.
        kv_tiles: ``[num_kv_programs, KEY_TILE_COLUMNS]`` int32, tiles of ``kv_tile_size`` key
            rows, each against one chunk of its queries.
        split_kv_tiles: ``[num_split_tiles, SPLIT_KEY_TILE_COLUMNS]`` int32, the key tiles whose
            ``num_partial_slots`` partial dK/dV the reduction kernel sums.
        features: the forward's window, softcap and sinks (``[Hq]`` float32 or None); the
            key schedule must have been built for the same window.

    Returns contiguous ``(dq [T, Hq, D], dk [T, Hkv, D], dv [T, Hkv, D])`` in q.dtype, and
    ``dsinks [Hq]`` float32 (None without sinks).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    head_dim_pad = padded_head_dim(head_dim)
    score_scale, softcap_log2 = features.score_scales(softmax_scale)
    window = features.window_or_zero
    precision = dot_precision(q.dtype)

    # Head-major statistics: a block of query rows then reads them contiguously.
    lse_by_head = lse.t().contiguous()
    dlse_by_head = dlse.t().contiguous() if dlse is not None else None
    delta = torch.empty((num_q_heads, num_tokens), dtype=torch.float32, device=q.device)
    delta_kernel[(triton.cdiv(num_tokens, DELTA_BLOCK_TOKENS), num_q_heads)](
        out, dout, delta if dlse_by_head is None else dlse_by_head,  # not read without HAS_DLSE
        delta, num_tokens,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_T=DELTA_BLOCK_TOKENS,
        HAS_DLSE=dlse is not None,
    )

    dq = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((num_tokens, num_kv_heads, head_dim), dtype=k.dtype, device=q.device)
    dv = torch.empty((num_tokens, num_kv_heads, head_dim), dtype=v.dtype, device=q.device)
    dk_partial, dv_partial = (
        torch.empty((num_partial_slots, num_kv_heads, kv_tile_size, head_dim), dtype=torch.float32,
                    device=q.device) for _ in range(2))
    dq_kernel, dq_fixed = launchable(prefix_attention_dq_kernel, _prefix_attention_dq_tuned, "BLOCK_N",
                                     head_dim_pad, packing.block_m, precision)
    dkdv_kernel, dkdv_fixed = launchable(prefix_attention_dkdv_kernel, _prefix_attention_dkdv_tuned, "BLOCK_M",
                                         head_dim_pad, kv_tile_size, precision, fixed_stages=2)

    dq_kernel[(q_tiles.shape[0] * (num_q_heads // packing.heads_per_program),)](
        q, k, v, dout, lse_by_head, delta, dq, q_tiles, runs,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
        num_tokens, num_q_heads, num_q_heads // num_kv_heads, softmax_scale, score_scale, softcap_log2, window,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, CHECK_DIMS=head_dim != head_dim_pad,
        BLOCK_M=packing.block_m, TILE_TOKENS=packing.tile_tokens,
        HEADS_PER_PROGRAM=packing.heads_per_program, DOT_PRECISION=precision,
        **features.switches(), **dq_fixed,
    )
    dkdv_kernel[(kv_tiles.shape[0] * num_kv_heads,)](
        q, k, v, dout, lse_by_head, delta, dk, dv, dk_partial, dv_partial, kv_tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        num_tokens, num_kv_heads, num_q_heads // num_kv_heads, softmax_scale, score_scale, softcap_log2, window,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, CHECK_DIMS=head_dim != head_dim_pad,
        BLOCK_N=kv_tile_size, DOT_PRECISION=precision, **features.switches(), **dkdv_fixed,
    )
    if split_kv_tiles.shape[0]:
        dkdv_reduce_kernel[(split_kv_tiles.shape[0] * num_kv_heads,)](
            dk, dv, dk_partial, dv_partial, split_kv_tiles,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), num_kv_heads, softmax_scale,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_N=kv_tile_size,
        )
    dsinks = None
    if features.sinks is not None:
        # d sink_h = sum_i p_sink_ih * (0 - delta_ih): the sink column has no value, so its
        # dP is 0. A fixed-order torch reduction over [Hq, T]: deterministic.
        dsinks = -(torch.exp(features.sinks[:, None] - lse_by_head) * delta).sum(1)
    return dq, dk, dv, dsinks
