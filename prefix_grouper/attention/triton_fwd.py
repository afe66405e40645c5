"""Forward Triton kernel of shared-prefix attention, plus tile helpers the backward shares.

One launch covers the whole packed batch. Every program owns one query tile (rows
``[q_start, q_start + BLOCK_M)`` of a single segment, clipped at the segment end) and
one query head. A tile row of the schedule (see ``triton_backend``) holds::

    q_start, seg_start, seg_end, shared_start, shared_len

``shared_*`` is the group's prefix for a suffix tile and empty for a prefix tile. The
program walks the keys in three unmasked-or-masked runs and never loads anything else:

1. ``[shared_start, shared_start + shared_len)``: the whole prefix, no mask except the
   key bound on its last, partial block;
2. ``[seg_start, q_start)``: own-segment keys strictly before the tile, no mask;
3. ``[q_start, min(q_start + BLOCK_M, seg_end))``: the diagonal, causal mask.

Run 2 is aligned because tiles start at multiples of BLOCK_M from the segment start and
BLOCK_N divides BLOCK_M.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

NO_MASK = tl.constexpr(0)
CAUSAL_MASK = tl.constexpr(1)  # key <= query (same segment) and inside the bound
BOUND_MASK = tl.constexpr(2)  # only the key (forward, dQ) or query (dK/dV) bound

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

INTERPRETER_INNER_BLOCK = 16


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
    """``(q_start, seg_start, seg_end, shared_start, shared_len)`` of a query-schedule row."""
    meta = q_tiles_ptr + tile * 5
    return tl.load(meta), tl.load(meta + 1), tl.load(meta + 2), tl.load(meta + 3), tl.load(meta + 4)


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


def interpreted() -> bool:
    """True when the kernels were built for Triton's CPU interpreter, which happens when
    TRITON_INTERPRET=1 was set before triton was imported."""
    return isinstance(load_tile, InterpretedFunction)


@triton.jit
def _attend_key_block(
    acc, row_max, row_sum, q, rows, k_head, v_head, stride_kt, stride_vt,
    key_start, key_end, dims, dim_ok, qk_scale_log2,
    MASK: tl.constexpr, CHECK_DIMS: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold keys ``[key_start, key_start + BLOCK_N)`` into the online softmax (log2 domain)."""
    keys = key_start + tl.arange(0, BLOCK_N)
    key_ok = keys < key_end
    key_offsets = keys[:, None].to(tl.int64)
    k = load_tile(k_head + key_offsets * stride_kt + dims[None, :], key_ok, dim_ok,
                  MASK != NO_MASK, CHECK_DIMS)
    v = load_tile(v_head + key_offsets * stride_vt + dims[None, :], key_ok, dim_ok,
                  MASK != NO_MASK, CHECK_DIMS)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    if MASK == CAUSAL_MASK:
        scores = tl.where((keys[None, :] <= rows[:, None]) & key_ok[None, :], scores, float("-inf"))
    elif MASK == BOUND_MASK:
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
    # Every row sees a finite score in the first block it meets (the prefix, or the
    # segment start), so new_max is finite and no -inf - -inf can occur.
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    rescale = tl.exp2(row_max - new_max)
    probs = tl.exp2(scores - new_max[:, None])
    row_sum = row_sum * rescale + tl.sum(probs, 1)
    acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, new_max, row_sum


@triton.jit
def _prefix_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, q_tiles_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    num_q_heads, heads_per_kv, qk_scale_log2,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CHECK_DIMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Heads vary fastest so the query heads sharing a KV head run side by side (L2 reuse).
    pid = tl.program_id(0)
    tile = pid // num_q_heads
    head = pid % num_q_heads
    kv_head = head // heads_per_kv
    q_start, seg_start, seg_end, shared_start, shared_len = load_query_tile(q_tiles_ptr, tile)

    rows = q_start + tl.arange(0, BLOCK_M)
    row_ok = rows < seg_end
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    row_offsets = rows[:, None].to(tl.int64)
    q = load_tile(q_ptr + head.to(tl.int64) * stride_qh + row_offsets * stride_qt + dims[None, :],
                  row_ok, dim_ok, True, CHECK_DIMS)
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh

    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)

    shared_end = shared_start + shared_len
    shared_full_end = shared_start + (shared_len // BLOCK_N) * BLOCK_N
    for key_start in range(shared_start, shared_full_end, BLOCK_N):
        acc, row_max, row_sum = _attend_key_block(
            acc, row_max, row_sum, q, rows, k_head, v_head, stride_kt, stride_vt,
            key_start, shared_end, dims, dim_ok, qk_scale_log2,
            NO_MASK, CHECK_DIMS, BLOCK_N, DOT_PRECISION)
    for key_start in range(shared_full_end, shared_end, BLOCK_N):
        acc, row_max, row_sum = _attend_key_block(
            acc, row_max, row_sum, q, rows, k_head, v_head, stride_kt, stride_vt,
            key_start, shared_end, dims, dim_ok, qk_scale_log2,
            BOUND_MASK, CHECK_DIMS, BLOCK_N, DOT_PRECISION)
    for key_start in range(seg_start, q_start, BLOCK_N):
        acc, row_max, row_sum = _attend_key_block(
            acc, row_max, row_sum, q, rows, k_head, v_head, stride_kt, stride_vt,
            key_start, seg_end, dims, dim_ok, qk_scale_log2,
            NO_MASK, CHECK_DIMS, BLOCK_N, DOT_PRECISION)
    for key_start in range(q_start, tl.minimum(q_start + BLOCK_M, seg_end), BLOCK_N):
        acc, row_max, row_sum = _attend_key_block(
            acc, row_max, row_sum, q, rows, k_head, v_head, stride_kt, stride_vt,
            key_start, seg_end, dims, dim_ok, qk_scale_log2,
            CAUSAL_MASK, CHECK_DIMS, BLOCK_N, DOT_PRECISION)

    out = acc / row_sum[:, None]
    out_ptrs = out_ptr + head.to(tl.int64) * stride_oh + row_offsets * stride_ot + dims[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    lse = (row_max + tl.log2(row_sum)) * LN2
    tl.store(lse_ptr + rows.to(tl.int64) * num_q_heads + head, lse, mask=row_ok)


def inner_block_configs(inner: str, sizes: tuple[int, ...]) -> list[triton.Config]:
    """Autotuning candidates for the inner block ``inner`` (the tile size is fixed)."""
    return [triton.Config({inner: size}, num_warps=warps, num_stages=stages)
            for size in sizes for warps in (4, 8) for stages in (2, 3)]


def keep_inner_blocks_dividing(tile: str, inner: str):
    """Autotune pruner: the schedule's tile (kernel argument ``tile``) must be a whole
    number of inner blocks, or the unmasked key runs would leave the segment."""
    def prune(configs, named_args, **kwargs):
        size = kwargs.get(tile, named_args.get(tile))
        return [c for c in configs if c.kwargs[inner] <= size and size % c.kwargs[inner] == 0]
    return {"early_config_prune": prune}


# Tuned per head dim and tile size (and, as triton always does, per tensor dtype).
_prefix_attention_fwd_tuned = triton.autotune(
    configs=inner_block_configs("BLOCK_N", (16, 32, 64)), key=["HEAD_DIM", "BLOCK_M"],
    prune_configs_by=keep_inner_blocks_dividing("BLOCK_M", "BLOCK_N"),
)(_prefix_attention_fwd_kernel)


def launch_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_tiles: torch.Tensor,
    q_tile_size: int, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]``; each with unit stride on D.
        q_tiles: ``[num_q_tiles, 5]`` int32 schedule built for tiles of ``q_tile_size`` rows.

    Returns ``(out [T, Hq, D] q.dtype, lse [T, Hq] float32)``, both contiguous.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    head_dim_pad = padded_head_dim(head_dim)
    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((num_tokens, num_q_heads), dtype=torch.float32, device=q.device)
    grid = (q_tiles.shape[0] * num_q_heads,)
    kernel, fixed = _prefix_attention_fwd_tuned, {}
    if interpreted():
        kernel, fixed = _prefix_attention_fwd_kernel, {"BLOCK_N": INTERPRETER_INNER_BLOCK}
    kernel[grid](
        q, k, v, out, lse, q_tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        num_q_heads, num_q_heads // k.shape[1], softmax_scale * LOG2E.value,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, CHECK_DIMS=head_dim != head_dim_pad,
        BLOCK_M=q_tile_size, DOT_PRECISION=dot_precision(q.dtype), **fixed,
    )
    return out, lse
