"""``backend="triton"``: fused shared-prefix attention, forward and backward.

The kernels (``triton_fwd``, ``triton_bwd``) read the packed batch in place through two
tile schedules built once per layout (and tiling and device) from its host-side lengths,
so no call ever synchronizes with the device:

* query tiles ``[num_q_tiles, QUERY_TILE_COLUMNS]`` int32 rows, the fields of
  :class:`~.triton_common.QueryTile` (``q_start, seg_start, seg_end, shared_start,
  shared_len``): BLOCK_M rows of one segment; ``shared_*`` is the group's prefix for a
  suffix tile and empty for a prefix tile (forward and dQ);
* key tiles ``[num_kv_tiles, KEY_TILE_COLUMNS]`` int32 rows, the fields of
  :class:`~.triton_common.KeyTile` (``k_start, k_end, q_end``): BLOCK_N keys of one
  segment and the end of the packed query range that sees them (dK/dV).

An empty completion owns no rows, hence no tiles. Groups are listed heaviest first and
a group's tiles stay adjacent, heaviest first, so the programs running together mostly
read the same prefix K/V (L2 reuse) and the long ones start early (less tail).

The kernels are wrapped as ``torch.library`` custom ops with fake and autograd
registrations, so ``torch.compile`` treats them as opaque, differentiable nodes. The ops
take the layout as one CPU int64 tensor, ``GroupLayout.host_lengths`` (see
:func:`~prefix_grouper.layout.encode_host_lengths`), and build the schedules inside their
real implementations, memoized in the layout's cache (:func:`~prefix_grouper.layout.cached_per_layout`).
Compiled code thus sees only tensor inputs: it never traces the Python schedule builder
nor specializes on lengths, so after one recompile with dynamic shapes a single graph
serves every layout. Reading a CPU tensor is no device synchronization; each schedule is
uploaded once per layout.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..layout import GroupLayout, cached_per_layout, decode_host_lengths, split_by_group
from ..runtime import device_guard, triton_interpreted
from .triton_bwd import launch_backward
from .triton_common import KeyTile, QueryTile, padded_head_dim
from .triton_fwd import launch_forward

__all__ = ["key_tile_rows", "query_tile_rows", "triton_prefix_attention"]

# Schedule tile under the interpreter: small enough for fast CPU tests, yet two inner
# blocks of 16, so diagonals still span several key (or query) blocks as on the GPU.
_INTERPRETER_TILE = 32


def _tile_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(query tile, key tile)`` rows of the schedules; kernels autotune only the inner
    block, a divisor of the tile.

    Wide rows (fp32, large head dims) get shorter tiles so a tile's Q, accumulators and
    the K/V pipeline stages fit in registers and shared memory.
    """
    if triton_interpreted():
        return _INTERPRETER_TILE, _INTERPRETER_TILE
    row_bytes = padded_head_dim(head_dim) * dtype.itemsize
    tile = 128 if row_bytes <= 256 else 64 if row_bytes <= 512 else 32
    return tile, tile


def _group_segments(prefix_lens: Sequence[int], suffix_lens_per_group: Sequence[Sequence[int]]):
    """Per group: ``(prefix_start, prefix_len, [(suffix_start, suffix_len), ...], group_end)``."""
    groups, start = [], 0
    for prefix_len, suffix_lens in zip(prefix_lens, suffix_lens_per_group):
        prefix_start = start
        start += prefix_len
        suffixes = []
        for suffix_len in suffix_lens:
            suffixes.append((start, suffix_len))
            start += suffix_len
        groups.append((prefix_start, prefix_len, suffixes, start))
    return groups


def _heaviest_first(per_group: list[list[tuple[int, tuple]]]) -> list[tuple]:
    """Flatten ``(work, row)`` lists: groups by total work, then rows by work, descending."""
    per_group = sorted(per_group, key=lambda tiles: -sum(work for work, _ in tiles))
    return [row for tiles in per_group for _, row in sorted(tiles, key=lambda t: -t[0])]


def query_tile_rows(prefix_lens: Sequence[int], suffix_lens_per_group: Sequence[Sequence[int]],
                    tile: int) -> list[QueryTile]:
    """The :class:`QueryTile` of every query tile of ``tile`` rows, in launch order."""
    per_group = []
    for prefix_start, prefix_len, suffixes, _ in _group_segments(prefix_lens, suffix_lens_per_group):
        segments = [(prefix_start, prefix_len, prefix_start, 0)]
        segments += [(start, length, prefix_start, prefix_len) for start, length in suffixes]
        tiles = []
        for seg_start, seg_len, shared_start, shared_len in segments:
            for q_start in range(seg_start, seg_start + seg_len, tile):
                work = shared_len + q_start - seg_start + tile
                tiles.append((work, QueryTile(q_start=q_start, seg_start=seg_start, seg_end=seg_start + seg_len,
                                              shared_start=shared_start, shared_len=shared_len)))
        per_group.append(tiles)
    return _heaviest_first(per_group)


def key_tile_rows(prefix_lens: Sequence[int], suffix_lens_per_group: Sequence[Sequence[int]],
                  tile: int) -> list[KeyTile]:
    """The :class:`KeyTile` of every key tile of ``tile`` rows, in launch order."""
    per_group = []
    for prefix_start, prefix_len, suffixes, group_end in _group_segments(prefix_lens,
                                                                         suffix_lens_per_group):
        # Prefix keys are seen by the causal prefix queries and every suffix query of the
        # group, which together fill [key, group_end); suffix keys only by their suffix.
        segments = [(prefix_start, prefix_len, group_end)]
        segments += [(start, length, start + length) for start, length in suffixes]
        tiles = []
        for seg_start, seg_len, q_end in segments:
            for k_start in range(seg_start, seg_start + seg_len, tile):
                tiles.append((q_end - k_start, KeyTile(k_start=k_start, k_end=seg_start + seg_len, q_end=q_end)))
        per_group.append(tiles)
    return _heaviest_first(per_group)


def _checked_lengths(host_lengths: torch.Tensor) -> tuple[tuple[int, ...], list[tuple[int, ...]], int]:
    """``(prefix_lens, suffix_lens_per_group, total_tokens)`` of a layout's host lengths."""
    prefix_lens, group_sizes, suffix_lens = decode_host_lengths(host_lengths)
    total_tokens = sum(prefix_lens) + sum(suffix_lens)
    if total_tokens >= 2**31:
        raise ValueError(f"the triton backend indexes tokens in int32, T={total_tokens} does not fit")
    return prefix_lens, split_by_group(suffix_lens, group_sizes), total_tokens


def _schedules(host_lengths: torch.Tensor, q: torch.Tensor, need: tuple[str, ...] = ("q", "kv")):
    """``(q_tiles, kv_tiles, q_tile, kv_tile)`` of the layout given by its host lengths, for
    q's head dim, dtype and device; a schedule not in ``need`` comes back as None.

    Each schedule is built and uploaded once per layout, tiling and device, then memoized.
    """
    q_tile, kv_tile = _tile_sizes(q.shape[-1], q.dtype)
    prefix_lens, suffix_lens_per_group, total_tokens = cached_per_layout(
        host_lengths, ("triton_lengths",), lambda: _checked_lengths(host_lengths))
    if total_tokens != q.shape[0]:
        raise ValueError(f"the layout packs T={total_tokens} tokens but q has {q.shape[0]}")
    out = []
    for kind, tile, rows in (("q", q_tile, query_tile_rows), ("kv", kv_tile, key_tile_rows)):
        if kind not in need:
            out.append(None)
            continue
        out.append(cached_per_layout(
            host_lengths, ("triton_schedule", kind, tile, q.device),
            lambda: torch.tensor(rows(prefix_lens, suffix_lens_per_group, tile), dtype=torch.int32,
                                 device=q.device)))
    return out[0], out[1], q_tile, kv_tile


def _unit_stride_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dim is dense (the kernels take any other strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("prefix_grouper::prefix_attention_fwd", mutates_args=())
def _prefix_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, host_lengths: torch.Tensor,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [T, Hq, D], lse [T, Hq] float32)``; the layout is ``GroupLayout.host_lengths``."""
    q, k, v = (_unit_stride_last(x) for x in (q, k, v))
    q_tiles, _, q_tile, _ = _schedules(host_lengths, q, need=("q",))
    with device_guard(q):
        return launch_forward(q, k, v, q_tiles, q_tile, softmax_scale)


@_prefix_attention_fwd.register_fake
def _(q, k, v, host_lengths, softmax_scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("prefix_grouper::prefix_attention_bwd", mutates_args=())
def _prefix_attention_bwd(
    dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, host_lengths: torch.Tensor,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq [T, Hq, D], dk [T, Hkv, D], dv [T, Hkv, D])``; dlse ``[T, Hq]`` may be None."""
    dout, q, k, v, out = (_unit_stride_last(x) for x in (dout, q, k, v, out))
    q_tiles, kv_tiles, q_tile, kv_tile = _schedules(host_lengths, q)
    with device_guard(q):
        return launch_backward(dout, dlse, q, k, v, out, lse, q_tiles, kv_tiles,
                               q_tile, kv_tile, softmax_scale)


@_prefix_attention_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, host_lengths, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, host_lengths, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, host_lengths)
    # Most callers never use lse: let its gradient arrive as None instead of a zero tensor.
    ctx.set_materialize_grads(False)
    ctx.softmax_scale = softmax_scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, host_lengths = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _prefix_attention_bwd(dout, dlse, q, k, v, out, lse, host_lengths,
                                       ctx.softmax_scale)
    return dq, dk, dv, None, None


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
    # Only tensors cross into the ops: torch.compile traces no schedule building and
    # does not specialize on the layout's lengths.
    return _prefix_attention_fwd(q, k, v, layout.host_lengths, float(softmax_scale))
