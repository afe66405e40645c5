"""What the forward and backward Triton kernels share: the tile schedules' row format,
tile loaders, the key-run walk of a query tile and the dot precision (their launch
configurations: ``triton_autotune``).

A query tile owns tokens ``[q_start, q_start + TILE_TOKENS)`` of a single segment, clipped
at ``seg_end``; ``runs_begin:runs_end`` are its segment's ancestor runs in the runs table
(a one-level completion: its group's prefix; a root: none). The forward and dQ programs
own one query tile for ``HEADS_PER_PROGRAM`` query heads of one KV head (GQA packing, so
each K/V block is loaded once for all of them): their ``BLOCK_M`` score rows are
head-major, row ``r`` is head ``r // TILE_TOKENS`` of the pack and token ``q_start + r %
TILE_TOKENS`` (rows past ``HEADS_PER_PROGRAM * TILE_TOKENS`` are idle). They walk the
tile's keys with :func:`walk_key_runs`, in runs that never load anything the tile cannot
see:

1. each ancestor run, root first: the whole run, no mask except the key bound on its last,
   partial block;
2. ``[seg_start, aligned_end)``: own-segment keys before the tile, whole BLOCK_N blocks
   from the segment start, no mask;
3. ``[aligned_end, min(q_start + TILE_TOKENS, seg_end))``: the diagonal, causal mask
   (``aligned_end`` is ``q_start`` when TILE_TOKENS is a multiple of BLOCK_N, as without
   packing; otherwise the block holding ``q_start``).

The optional features are constexpr switches, so without them the kernels compile to the
plain code (see ``triton_features``). A window keeps the runs but starts each at the first
block any row of the tile sees, and masks only the blocks some row sees partly (and the
diagonal); a softcap transforms the scores in :func:`key_block_scores`.
"""
from __future__ import annotations

from collections import namedtuple
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .triton_features import softcapped_scores, window_blocks
from .triton_schedule import AncestorRun, KeyTile, QueryTile, SplitKeyTile

NO_MASK = tl.constexpr(0)
CAUSAL_MASK = tl.constexpr(1)  # key <= query (same segment) and inside the bound
BOUND_MASK = tl.constexpr(2)  # only the key (forward, dQ) or query (dK/dV) bound

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# The schedules' row formats (triton_schedule.py): the kernels read the columns below, in their
# field order.
QUERY_TILE_COLUMNS = tl.constexpr(len(QueryTile._fields))
ANCESTOR_RUN_COLUMNS = tl.constexpr(len(AncestorRun._fields))
KEY_TILE_COLUMNS = tl.constexpr(len(KeyTile._fields))
SPLIT_KEY_TILE_COLUMNS = tl.constexpr(len(SplitKeyTile._fields))
Q_START, SEG_START, SEG_END, RUNS_BEGIN, RUNS_END = (tl.constexpr(i) for i in range(len(QueryTile._fields)))
RUN_START, RUN_LENGTH, RUN_POS_SHIFT = (tl.constexpr(i) for i in range(len(AncestorRun._fields)))
K_START, K_END, CHUNK_START, CHUNK_END, PARTIAL_SLOT, POS_SHIFT = (
    tl.constexpr(i) for i in range(len(KeyTile._fields)))
# load_key_tile reads k_start, k_end of both row formats at the same columns.
assert SplitKeyTile._fields[:2] == KeyTile._fields[:2]
FIRST_SLOT, NUM_SLOTS = (tl.constexpr(i) for i in range(2, len(SplitKeyTile._fields)))

# How the forward and dQ programs fill their BLOCK_M score rows: ``heads_per_program``
# query heads of one KV head times ``tile_tokens`` tokens (the query schedule's tile).
HeadPacking = namedtuple("HeadPacking", ["block_m", "heads_per_program", "tile_tokens"])


class ScoreFeatures(NamedTuple):
    """The optional features of a call, as the launchers pass them to the kernels."""

    window: Optional[int] = None  # None, or a window shorter than the longest row
    softcap: Optional[float] = None
    sinks: Optional[torch.Tensor] = None  # [Hq] float32, contiguous

    def score_scales(self, softmax_scale: float) -> tuple[float, float]:
        """``(score_scale, softcap_log2)`` of :func:`~.triton_features.softcapped_scores`."""
        if self.softcap is None:
            return softmax_scale * LOG2E.value, 0.0
        return softmax_scale / self.softcap, self.softcap * LOG2E.value

    @property
    def window_or_zero(self) -> int:
        return 0 if self.window is None else self.window

    def switches(self) -> dict[str, bool]:
        """The constexpr switches every attention kernel takes (:data:`FEATURE_SWITCHES`)."""
        return {"HAS_WINDOW": self.window is not None, "HAS_SOFTCAP": self.softcap is not None}


FEATURE_SWITCHES = ("HAS_WINDOW", "HAS_SOFTCAP")


def head_packing(block_m: int, heads_per_kv: int) -> HeadPacking:
    """Pack as many of a KV head's ``heads_per_kv`` query heads as ``block_m`` rows hold (a
    divisor of ``heads_per_kv``, so packs never straddle KV heads)."""
    heads = max(h for h in range(1, min(heads_per_kv, block_m) + 1) if heads_per_kv % h == 0)
    return HeadPacking(block_m, heads, block_m // heads)

def _torch_allows_tf32() -> bool:
    # torch >= 2.9 has fp32_precision; reading the legacy allow_tf32 after the new switch
    # was set raises, so ask the new one first.
    matmul = torch.backends.cuda.matmul
    try:
        return getattr(matmul, "fp32_precision") == "tf32"
    except (AttributeError, RuntimeError):
        return torch.get_float32_matmul_precision() != "highest"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 switch for matmuls; 16-bit inputs ignore it."""
    if dtype == torch.float32 and not _torch_allows_tf32():
        return "ieee"
    return "tf32"


def padded_head_dim(head_dim: int) -> int:
    """Power-of-two register width holding ``head_dim`` (tl.dot needs at least 16)."""
    return max(16, triton.next_power_of_2(head_dim))

@triton.jit
def load_query_tile(q_tiles_ptr, tile):
    """``(q_start, seg_start, seg_end, runs_begin, runs_end)`` of a query-schedule row."""
    meta = q_tiles_ptr + tile * QUERY_TILE_COLUMNS
    return (tl.load(meta + Q_START), tl.load(meta + SEG_START), tl.load(meta + SEG_END),
            tl.load(meta + RUNS_BEGIN), tl.load(meta + RUNS_END))


@triton.jit
def load_key_tile(kv_tiles_ptr, tile):
    """``(k_start, k_end, chunk_start, chunk_end, partial_slot, pos_shift)`` of a key-schedule row."""
    meta = kv_tiles_ptr + tile * KEY_TILE_COLUMNS
    return (tl.load(meta + K_START), tl.load(meta + K_END), tl.load(meta + CHUNK_START),
            tl.load(meta + CHUNK_END), tl.load(meta + PARTIAL_SLOT), tl.load(meta + POS_SHIFT))


@triton.jit
def load_split_key_tile(split_tiles_ptr, tile):
    """``(k_start, k_end, first_slot, num_slots)`` of a reduction-schedule row."""
    meta = split_tiles_ptr + tile * SPLIT_KEY_TILE_COLUMNS
    return (tl.load(meta + K_START), tl.load(meta + K_END), tl.load(meta + FIRST_SLOT),
            tl.load(meta + NUM_SLOTS))


@triton.jit
def load_tile(ptrs, row_ok, dim_ok, CHECK_ROWS: tl.constexpr, CHECK_DIMS: tl.constexpr):
    """Load a ``[rows, HEAD_DIM_PAD]`` tile, masking only what may be out of range."""
    if CHECK_ROWS and CHECK_DIMS:
        tile = tl.load(ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif CHECK_DIMS:
        tile = tl.load(ptrs, mask=dim_ok[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def load_row_pair(
    a_head, stride_a, b_head, stride_b, start, end, dims, dim_ok,
    CHECK_ROWS: tl.constexpr, CHECK_DIMS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Packed rows ``[start, start + BLOCK)``, valid below ``end``, of two one-head views
    (K and V, or Q and dO): ``(rows, row_ok, a [BLOCK, HEAD_DIM_PAD], b [BLOCK, HEAD_DIM_PAD])``."""
    rows = start + tl.arange(0, BLOCK)
    row_ok = rows < end
    offsets = rows[:, None].to(tl.int64)
    a = load_tile(a_head + offsets * stride_a + dims[None, :], row_ok, dim_ok, CHECK_ROWS, CHECK_DIMS)
    b = load_tile(b_head + offsets * stride_b + dims[None, :], row_ok, dim_ok, CHECK_ROWS, CHECK_DIMS)
    return rows, row_ok, a, b


@triton.jit
def query_tile_prologue(
    q_tiles_ptr, q_ptr, k_ptr, v_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    num_q_heads, heads_per_kv, score_scale, softcap_log2,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CHECK_DIMS: tl.constexpr,
    BLOCK_M: tl.constexpr, TILE_TOKENS: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
):
    """The program's query tile and heads, and what :func:`key_block_scores` needs of them
    (``score_scale``, ``softcap_log2``: see :func:`~.triton_features.softcapped_scores`).

    Returns ``(tile_row, heads, rows, row_ok, row_offsets, dims, dim_ok, scores_ctx)``:
    ``tile_row`` the :class:`QueryTile` values; per score row (``[BLOCK_M]``) ``heads``
    its query head (int64) and ``rows`` its packed token index.
    """
    # Head packs vary fastest so the packs sharing a KV head run side by side (L2 reuse).
    packs_per_tile = num_q_heads // HEADS_PER_PROGRAM
    pid = tl.program_id(0)
    tile = pid // packs_per_tile
    first_head = (pid % packs_per_tile) * HEADS_PER_PROGRAM
    kv_head = first_head // heads_per_kv
    tile_row = load_query_tile(q_tiles_ptr, tile)
    slots = tl.arange(0, BLOCK_M)
    heads = (first_head + slots // TILE_TOKENS).to(tl.int64)
    rows = tile_row[Q_START] + slots % TILE_TOKENS
    row_ok = (rows < tile_row[SEG_END]) & (slots < HEADS_PER_PROGRAM * TILE_TOKENS)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    row_offsets = rows[:, None].to(tl.int64)
    q = load_tile(q_ptr + heads[:, None] * stride_qh + row_offsets * stride_qt + dims[None, :],
                  row_ok, dim_ok, True, CHECK_DIMS)
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
    scores_ctx = (q, rows, k_head, v_head, stride_kt, stride_vt, dims, dim_ok, score_scale, softcap_log2)
    return tile_row, heads, rows, row_ok, row_offsets, dims, dim_ok, scores_ctx


@triton.jit
def key_block_scores(
    scores_ctx, key_start, key_end, window_shift,
    MASK: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, CHECK_DIMS: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """K, V of keys ``[key_start, key_start + BLOCK_N)`` and the tile's scores against them.

    ``scores_ctx`` is ``(q, rows, k_head, v_head, stride_kt, stride_vt, dims, dim_ok,
    score_scale, softcap_log2)``. Returns ``(k, v, scores [BLOCK_M, BLOCK_N], capped)``,
    scores in the log2 domain and ``-inf`` where ``MASK`` hides the key, or where
    ``WINDOWED`` and ``key <= row + window_shift``; ``capped`` is the softcap's tanh
    (``SOFTCAP``; else unused).
    """
    q, rows, k_head, v_head, stride_kt, stride_vt, dims, dim_ok, score_scale, softcap_log2 = scores_ctx
    keys, key_ok, k, v = load_row_pair(k_head, stride_kt, v_head, stride_vt, key_start, key_end, dims,
                                       dim_ok, MASK != NO_MASK, CHECK_DIMS, BLOCK_N)
    scores, capped = softcapped_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION),
                                       score_scale, softcap_log2, SOFTCAP)
    if MASK == CAUSAL_MASK:
        scores = tl.where((keys[None, :] <= rows[:, None]) & key_ok[None, :], scores, float("-inf"))
    elif MASK == BOUND_MASK:
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
    if WINDOWED:
        scores = tl.where(keys[None, :] > rows[:, None] + window_shift, scores, float("-inf"))
    return k, v, scores, capped


@triton.jit
def walk_run(
    state, fold_key_block, ctx, run_start, mask_from, run_end, key_end,
    END_MASK: tl.constexpr, SOFTCAP: tl.constexpr, CHECK_DIMS: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold the blocks of run ``[run_start, run_end)`` with no window: unmasked up to
    ``mask_from``, ``END_MASK`` from there on (the run's last, partial or diagonal blocks)."""
    for key_start in range(run_start, mask_from, BLOCK_N):
        state = fold_key_block(state, ctx, key_start, key_end, 0, NO_MASK, False, SOFTCAP,
                               CHECK_DIMS, BLOCK_N, DOT_PRECISION)
    for key_start in range(mask_from, run_end, BLOCK_N):
        state = fold_key_block(state, ctx, key_start, key_end, 0, END_MASK, False, SOFTCAP,
                               CHECK_DIMS, BLOCK_N, DOT_PRECISION)
    return state


@triton.jit
def walk_windowed_run(
    state, fold_key_block, ctx, run_start, mask_from, run_end, key_end, lowest_key, lowest_full_key,
    window_shift, END_MASK: tl.constexpr, SOFTCAP: tl.constexpr, CHECK_DIMS: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold the blocks of run ``[run_start, run_end)`` (blocks from ``mask_from`` on take
    ``END_MASK``) that a window leaves visible: keys below ``lowest_key`` are hidden from
    every row of the tile, keys from ``lowest_full_key`` on from none. Blocks wholly below
    are skipped, blocks straddling the boundary masked (the diagonal always is)."""
    first, band_end = window_blocks(run_start, run_end, lowest_key, lowest_full_key, BLOCK_N)
    for key_start in range(first, tl.minimum(band_end, mask_from), BLOCK_N):
        state = fold_key_block(state, ctx, key_start, key_end, window_shift, NO_MASK, True, SOFTCAP,
                               CHECK_DIMS, BLOCK_N, DOT_PRECISION)
    for key_start in range(tl.maximum(first, band_end), mask_from, BLOCK_N):
        state = fold_key_block(state, ctx, key_start, key_end, window_shift, NO_MASK, False, SOFTCAP,
                               CHECK_DIMS, BLOCK_N, DOT_PRECISION)
    for key_start in range(tl.maximum(first, mask_from), run_end, BLOCK_N):
        state = fold_key_block(state, ctx, key_start, key_end, window_shift, END_MASK, True, SOFTCAP,
                               CHECK_DIMS, BLOCK_N, DOT_PRECISION)
    return state


@triton.jit
def walk_ancestor_run(
    state, fold_key_block, ctx, run_start, run_length, pos_shift, q_start, diag_end, window,
    CHECK_DIMS: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Fold the blocks of one ancestor run ``[run_start, run_start + run_length)`` that rows
    ``[q_start, diag_end)`` see: whole blocks unmasked, the last one bounded; under a window
    (rows see keys with ``row - key + pos_shift < window``) only the visible ones."""
    run_end = run_start + run_length
    full_end = run_start + (run_length // BLOCK_N) * BLOCK_N
    if HAS_WINDOW:
        # In the run, pos(i) - pos(j) = i - j + pos_shift: the tile's first row sees keys
        # > q_start + pos_shift - window, its last row (diag_end - 1) only keys > diag_end
        # - 1 + pos_shift - window.
        limit = pos_shift - window
        state = walk_windowed_run(state, fold_key_block, ctx, run_start, full_end, run_end, run_end,
                                  q_start + limit + 1, diag_end + limit, limit,
                                  BOUND_MASK, SOFTCAP, CHECK_DIMS, BLOCK_N, DOT_PRECISION)
    else:
        state = walk_run(state, fold_key_block, ctx, run_start, full_end, run_end, run_end,
                         BOUND_MASK, SOFTCAP, CHECK_DIMS, BLOCK_N, DOT_PRECISION)
    return state


@triton.jit
def walk_key_runs(
    state, fold_key_block, ctx, tile_row, runs_ptr, window,
    CHECK_DIMS: tl.constexpr, TILE_TOKENS: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Fold every key block a query tile sees into ``state``, run by run (module docstring):
    its segment's ancestor runs (rows ``runs_begin:runs_end`` of the ``runs_ptr`` table,
    :class:`AncestorRun`), then its own segment causally.

    ``fold_key_block(state, ctx, key_start, key_end, window_shift, MASK, WINDOWED, SOFTCAP,
    CHECK_DIMS, BLOCK_N, DOT_PRECISION)`` returns the new state; ``key_end`` bounds the
    run's keys, ``window_shift`` is the windowed mask's (:func:`key_block_scores`).
    """
    q_start, seg_start, seg_end, runs_begin, runs_end = tile_row
    aligned_end = seg_start + ((q_start - seg_start) // BLOCK_N) * BLOCK_N
    diag_end = tl.minimum(q_start + TILE_TOKENS, seg_end)
    for run in range(runs_begin, runs_end):
        meta = runs_ptr + run * ANCESTOR_RUN_COLUMNS
        state = walk_ancestor_run(state, fold_key_block, ctx, tl.load(meta + RUN_START),
                                  tl.load(meta + RUN_LENGTH), tl.load(meta + RUN_POS_SHIFT),
                                  q_start, diag_end, window, CHECK_DIMS, BLOCK_N, DOT_PRECISION,
                                  HAS_WINDOW, SOFTCAP)
    if HAS_WINDOW:
        state = walk_windowed_run(state, fold_key_block, ctx, seg_start, aligned_end, diag_end, seg_end,
                                  q_start - window + 1, diag_end - window, -window,
                                  CAUSAL_MASK, SOFTCAP, CHECK_DIMS, BLOCK_N, DOT_PRECISION)
    else:
        state = walk_run(state, fold_key_block, ctx, seg_start, aligned_end, diag_end, seg_end,
                         CAUSAL_MASK, SOFTCAP, CHECK_DIMS, BLOCK_N, DOT_PRECISION)
    return state
