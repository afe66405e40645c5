"""Triton backend: one fused kernel computes every group's count/mean/M2 and writes advantages.

The host side (``grouping.Segments``, torch) sorts and compacts the ids; each program then
owns ``GROUPS_PER_PROGRAM`` consecutive segments as a ``[groups, BLOCK]`` tile, merges
chunk statistics with Chan's formula (so a segment of any length works) and normalizes its
rows in a second sweep over the same (now cached) addresses. Runs on CUDA tensors, and on
CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""
# No `from __future__ import annotations`: Triton reads the kernel's parameter annotations
# (``eps: tl.float64``) as objects, and would silently ignore them as strings.
import torch
import triton
import triton.language as tl

from ..runtime import device_guard
from .grouping import Segments
from .options import NormalizeOptions

__all__ = ["group_normalize_kernel", "group_normalize_triton"]

# Rows per program tile; keeps registers modest for any group size.
_TILE_ROWS = 1024


@triton.jit
def _chunk_rows(perm_ptr, start, length, chunk, cols, HAS_PERM: tl.constexpr):
    """Original rows ``[groups, BLOCK]`` of one chunk of every group, and which exist."""
    inside = (chunk + cols)[None, :] < length[:, None]
    position = start[:, None] + chunk + cols[None, :]
    if HAS_PERM:
        row = tl.load(perm_ptr + position, mask=inside, other=0)
    else:
        row = position
    return row, inside

@triton.jit
def group_normalize_kernel(
    values_ptr, perm_ptr, offsets_ptr, batch_scale_ptr, out_ptr,
    num_groups, eps: tl.float64,
    HAS_PERM: tl.constexpr, SCALE: tl.constexpr, UNBIASED: tl.constexpr,
    SINGLETON_RAW: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr,
):
    """Advantages of ``values [N]`` within segments (see the module docstring).

    ``eps`` is an fp64 parameter: a Python float argument would otherwise be passed as
    fp32, and its rounding (2.5e-12 for eps=1e-4) divided by a small std shows in float64
    advantages. ``batch_scale_ptr``: ``[G]`` batch std of every segment (SCALE == 1).
    """
    groups = tl.program_id(0) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    in_range = groups < num_groups
    start = tl.load(offsets_ptr + groups, mask=in_range, other=0)
    length = tl.load(offsets_ptr + groups + 1, mask=in_range, other=0) - start
    cols = tl.arange(0, BLOCK)
    acc_dtype = values_ptr.dtype.element_ty
    count = tl.zeros([GROUPS_PER_PROGRAM], dtype=acc_dtype)
    mean = tl.zeros([GROUPS_PER_PROGRAM], dtype=acc_dtype)
    m2 = tl.zeros([GROUPS_PER_PROGRAM], dtype=acc_dtype)
    longest = tl.max(length, axis=0)

    for chunk in range(0, longest, BLOCK):
        row, inside = _chunk_rows(perm_ptr, start, length, chunk, cols, HAS_PERM)
        x = tl.load(values_ptr + row, mask=inside, other=float("nan"))
        valid = x == x  # NaN rewards and padding are left out
        chunk_count = tl.sum(valid.to(acc_dtype), axis=1)
        chunk_mean = tl.sum(tl.where(valid, x, 0.0), axis=1) / tl.maximum(chunk_count, 1.0)
        deviation = tl.where(valid, x - chunk_mean[:, None], 0.0)
        chunk_m2 = tl.sum(deviation * deviation, axis=1)
        # Chan et al.: merge (count, mean, M2) of the rows so far with this chunk's.
        merged = count + chunk_count
        weight = chunk_count / tl.maximum(merged, 1.0)
        delta = chunk_mean - mean
        mean = mean + delta * weight
        m2 = m2 + chunk_m2 + delta * delta * count * weight
        count = merged

    singleton = count == 1.0
    if SINGLETON_RAW:
        center = tl.where(singleton, 0.0, mean)
    else:
        center = mean
    if SCALE == 0:
        if UNBIASED:
            std = tl.sqrt(m2 / tl.maximum(count - 1.0, 1.0))
        else:
            std = tl.sqrt(m2 / tl.maximum(count, 1.0))
    elif SCALE == 1:
        std = tl.load(batch_scale_ptr + groups, mask=in_range, other=1.0)
    if SCALE == 2:
        denominator = tl.zeros([GROUPS_PER_PROGRAM], dtype=acc_dtype) + 1.0
    else:
        # A singleton is measured against std 1 under every scale.
        denominator = tl.where(singleton, 1.0, std) + eps

    for chunk in range(0, longest, BLOCK):
        row, inside = _chunk_rows(perm_ptr, start, length, chunk, cols, HAS_PERM)
        x = tl.load(values_ptr + row, mask=inside, other=0.0)
        advantage = (x - center[:, None]) / denominator[:, None]
        if not SINGLETON_RAW:
            advantage = tl.where(singleton[:, None], 0.0, advantage)
        advantage = tl.where(x == x, advantage, 0.0)
        tl.store(out_ptr + row, advantage, mask=inside)


def group_normalize_triton(values: torch.Tensor, segments: Segments, options: NormalizeOptions,
                           batch_scale: torch.Tensor | None) -> torch.Tensor:
    """``[N]`` advantages of contiguous float32/float64 ``values [N]`` within ``segments``;
    ``batch_scale``: ``[G]``, read when ``options.scale == "batch"``."""
    out = torch.empty_like(values)
    mean_rows = -(-values.numel() // segments.num_groups)
    block = min(max(triton.next_power_of_2(mean_rows), 4), 256)
    groups_per_program = max(_TILE_ROWS // block, 1)
    grid = (triton.cdiv(segments.num_groups, groups_per_program),)
    perm = segments.perm
    # Pointers the kernel never reads (no permutation, no batch scale) get a placeholder.
    with device_guard(values):
        group_normalize_kernel[grid](
            values, perm if perm is not None else segments.offsets, segments.offsets,
            batch_scale if batch_scale is not None else values, out,
            segments.num_groups, options.eps,
            HAS_PERM=perm is not None, SCALE=options.scale_code, UNBIASED=options.unbiased,
            SINGLETON_RAW=options.singleton_raw, GROUPS_PER_PROGRAM=groups_per_program, BLOCK=block,
            num_warps=4,
        )
    return out
