"""``backend="triton"``: fused shared-prefix attention, forward and backward.

The kernels (``triton_fwd``, ``triton_bwd``) read the packed batch in place through two
tile schedules built once per layout from its host-side lengths (so no call ever
synchronizes with the device):

* query tiles ``[num_q_tiles, 5]`` int32 rows ``q_start, seg_start, seg_end,
  shared_start, shared_len``: BLOCK_M rows of one segment; ``shared_*`` is the group's
  prefix for a suffix tile and empty for a prefix tile (forward and dQ);
* key tiles ``[num_kv_tiles, 3]`` int32 rows ``k_start, k_end, q_end``: BLOCK_N keys of
  one segment and the end of the packed query range that sees them (dK/dV).

An empty completion owns no rows, hence no tiles. Groups are listed heaviest first and
a group's tiles stay adjacent, heaviest first, so the programs running together mostly
read the same prefix K/V (L2 reuse) and the long ones start early (less tail).

The kernels are wrapped as ``torch.library`` custom ops with fake and autograd
registrations, so ``torch.compile`` treats them as opaque, differentiable nodes.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from ..layout import GroupLayout
from .triton_bwd import launch_backward
from .triton_fwd import interpreted, launch_forward, padded_head_dim

__all__ = ["triton_prefix_attention", "triton_unavailable_reason"]

# Schedule tile under the interpreter: small enough for fast CPU tests, yet two inner
# blocks of 16, so diagonals still span several key (or query) blocks as on the GPU.
_INTERPRETER_TILE = 32


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else a one-line reason."""
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before importing triton)"
        if not interpreted():
            return "TRITON_INTERPRET=1 was set after triton was imported; set it before the first import"
        return None
    return f"Triton kernels do not support {device.type} tensors"


def _tile_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(query tile, key tile)`` rows of the schedules; kernels autotune only the inner
    block, a divisor of the tile.

    Wide rows (fp32, large head dims) get shorter tiles so a tile's Q, accumulators and
    the K/V pipeline stages fit in registers and shared memory.
    """
    if interpreted():
        return _INTERPRETER_TILE, _INTERPRETER_TILE
    row_bytes = padded_head_dim(head_dim) * dtype.itemsize
    tile = 128 if row_bytes <= 256 else 64 if row_bytes <= 512 else 32
    return tile, tile


def _group_segments(layout: GroupLayout):
    """Per group: ``(prefix_start, prefix_len, [(suffix_start, suffix_len), ...], group_end)``."""
    groups, start = [], 0
    for prefix_len, suffix_lens in zip(layout.prefix_lens_list, layout.suffix_lens_per_group):
        prefix_start = start
        start += prefix_len
        suffixes = []
        for suffix_len in suffix_lens:
            suffixes.append((start, suffix_len))
            start += suffix_len
        groups.append((prefix_start, prefix_len, suffixes, start))
    return groups


def _heaviest_first(per_group: list[list[tuple[int, tuple[int, ...]]]]) -> list[tuple[int, ...]]:
    """Flatten ``(work, row)`` lists: groups by total work, then rows by work, descending."""
    per_group = sorted(per_group, key=lambda tiles: -sum(work for work, _ in tiles))
    return [row for tiles in per_group for _, row in sorted(tiles, key=lambda t: -t[0])]


def _query_tile_rows(layout: GroupLayout, tile: int) -> list[tuple[int, ...]]:
    """``(q_start, seg_start, seg_end, shared_start, shared_len)`` of every query tile."""
    per_group = []
    for prefix_start, prefix_len, suffixes, _ in _group_segments(layout):
        segments = [(prefix_start, prefix_len, prefix_start, 0)]
        segments += [(start, length, prefix_start, prefix_len) for start, length in suffixes]
        tiles = []
        for seg_start, seg_len, shared_start, shared_len in segments:
            for q_start in range(seg_start, seg_start + seg_len, tile):
                work = shared_len + q_start - seg_start + tile
                tiles.append((work, (q_start, seg_start, seg_start + seg_len, shared_start, shared_len)))
        per_group.append(tiles)
    return _heaviest_first(per_group)


def _key_tile_rows(layout: GroupLayout, tile: int) -> list[tuple[int, ...]]:
    """``(k_start, k_end, q_end)`` of every key tile."""
    per_group = []
    for prefix_start, prefix_len, suffixes, group_end in _group_segments(layout):
        # Prefix keys are seen by the causal prefix queries and every suffix query of the
        # group, which together fill [key, group_end); suffix keys only by their suffix.
        segments = [(prefix_start, prefix_len, group_end)]
        segments += [(start, length, start + length) for start, length in suffixes]
        tiles = []
        for seg_start, seg_len, q_end in segments:
            for k_start in range(seg_start, seg_start + seg_len, tile):
                tiles.append((q_end - k_start, (k_start, seg_start + seg_len, q_end)))
        per_group.append(tiles)
    return _heaviest_first(per_group)


def _schedules(layout: GroupLayout, head_dim: int, dtype: torch.dtype, device: torch.device):
    """``(q_tiles, kv_tiles, q_tile, kv_tile)`` for this layout, built once per tiling."""
    q_tile, kv_tile = _tile_sizes(head_dim, dtype)

    def build():
        if layout.total_tokens >= 2**31:
            raise ValueError(f"the triton backend indexes tokens in int32, T={layout.total_tokens} "
                             f"does not fit")
        q_tiles = torch.tensor(_query_tile_rows(layout, q_tile), dtype=torch.int32, device=device)
        kv_tiles = torch.tensor(_key_tile_rows(layout, kv_tile), dtype=torch.int32, device=device)
        return q_tiles, kv_tiles, q_tile, kv_tile

    return layout.cached(("triton_tile_schedules", q_tile, kv_tile, str(device)), build)


def _unit_stride_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dim is dense (the kernels take any other strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device, which need not be x's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("prefix_grouper::prefix_attention_fwd", mutates_args=())
def _prefix_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_tiles: torch.Tensor,
    kv_tiles: torch.Tensor, softmax_scale: float, q_tile: int, kv_tile: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [T, Hq, D], lse [T, Hq] float32)``; kv_tiles/kv_tile ride along for backward."""
    q, k, v = (_unit_stride_last(x) for x in (q, k, v))
    with _on_device(q):
        return launch_forward(q, k, v, q_tiles, q_tile, softmax_scale)


@_prefix_attention_fwd.register_fake
def _(q, k, v, q_tiles, kv_tiles, softmax_scale, q_tile, kv_tile):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("prefix_grouper::prefix_attention_bwd", mutates_args=())
def _prefix_attention_bwd(
    dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, q_tiles: torch.Tensor,
    kv_tiles: torch.Tensor, softmax_scale: float, q_tile: int, kv_tile: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq [T, Hq, D], dk [T, Hkv, D], dv [T, Hkv, D])``; dlse ``[T, Hq]`` may be None."""
    dout, q, k, v, out = (_unit_stride_last(x) for x in (dout, q, k, v, out))
    with _on_device(q):
        return launch_backward(dout, dlse, q, k, v, out, lse, q_tiles, kv_tiles,
                               q_tile, kv_tile, softmax_scale)


@_prefix_attention_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, q_tiles, kv_tiles, softmax_scale, q_tile, kv_tile):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, q_tiles, kv_tiles, softmax_scale, q_tile, kv_tile = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_tiles, kv_tiles)
    # Most callers never use lse: let its gradient arrive as None instead of a zero tensor.
    ctx.set_materialize_grads(False)
    ctx.softmax_scale, ctx.q_tile, ctx.kv_tile = softmax_scale, q_tile, kv_tile


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, q_tiles, kv_tiles = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _prefix_attention_bwd(dout, dlse, q, k, v, out, lse, q_tiles, kv_tiles,
                                       ctx.softmax_scale, ctx.q_tile, ctx.kv_tile)
    return dq, dk, dv, None, None, None, None, None


_prefix_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: GroupLayout, softmax_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared-prefix attention with the fused Triton kernels (inputs validated by the caller).

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]``, ``Hq % Hkv == 0``, fp16/bf16/fp32,
            ``D <= 256``; any strides (a non-unit last-dim stride costs a copy).
        layout: the batch's :class:`GroupLayout` on q's device.
        softmax_scale: multiplier of ``q . k`` before the softmax.

    Returns ``(out [T, Hq, D] in q.dtype, lse [T, Hq] float32)``, both differentiable.
    """
    q_tiles, kv_tiles, q_tile, kv_tile = _schedules(layout, q.shape[-1], q.dtype, q.device)
    return _prefix_attention_fwd(q, k, v, q_tiles, kv_tiles, float(softmax_scale), q_tile, kv_tile)
