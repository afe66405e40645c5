"""``backend="triton"``: fused shared-prefix attention, forward and backward.

The kernels (``triton_fwd``, ``triton_bwd``) read the packed batch in place through two
tile schedules built once per layout (and tiling and device) from its host-side lengths,
so no call ever synchronizes with the device:

* query tiles ``[num_q_tiles, QUERY_TILE_COLUMNS]`` int32 rows, the fields of
  :class:`~.triton_common.QueryTile` (``q_start, seg_start, seg_end, shared_start,
  shared_len``): ``tile_tokens`` tokens of one segment, taken by one program per pack of
  query heads (:class:`~.triton_common.HeadPacking`); ``shared_*`` is the group's prefix
  for a suffix tile and empty for a prefix tile (forward and dQ);
* dK/dV programs ``[num_programs, KEY_TILE_COLUMNS]`` int32 rows, the fields of
  :class:`~.triton_common.KeyTile` (``k_start, k_end, chunk_start, chunk_end,
  partial_slot``): BLOCK_N keys of one segment against one chunk of the packed queries
  that see them, and the split key tiles ``[num_split, SPLIT_KEY_TILE_COLUMNS]``
  (:class:`~.triton_common.SplitKeyTile`) whose partials the reduction kernel sums.
  The chunk length (:func:`dkdv_chunk_rows`) gives the launch at least two programs per
  SM even with GQA's few KV heads.

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
from .triton_common import (
    KEY_TILE_COLUMNS, QUERY_TILE_COLUMNS, SPLIT_KEY_TILE_COLUMNS, HeadPacking, KeyTile, QueryTile,
    SplitKeyTile, head_packing, padded_head_dim,
)
from .triton_fwd import launch_forward

__all__ = ["dkdv_chunk_rows", "key_tile_rows", "query_tile_rows", "triton_prefix_attention"]

# Schedule tile under the interpreter: small enough for fast CPU tests, yet two inner
# blocks of 16, so diagonals still span several key (or query) blocks as on the GPU.
_INTERPRETER_TILE = 32
# SMs of an H100/H200.
HOPPER_SMS = 132


def _tile_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(query rows per program, key tile)``: the forward and dQ programs' BLOCK_M score rows
    (query tile tokens times packed heads) and the dK/dV programs' keys; kernels autotune
    only the inner block, a divisor of these.

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


def _key_tile_query_ranges(prefix_lens: Sequence[int], suffix_lens_per_group: Sequence[Sequence[int]],
                           tile: int) -> list[list[tuple[int, int, int]]]:
    """Per group, ``(k_start, k_end, q_end)`` of each key tile of ``tile`` rows: the queries
    ``[k_start, q_end)`` see the tile's first key, the later keys a subset of them."""
    per_group = []
    for prefix_start, prefix_len, suffixes, group_end in _group_segments(prefix_lens,
                                                                         suffix_lens_per_group):
        # Prefix keys are seen by the causal prefix queries and every suffix query of the
        # group, which together fill [key, group_end); suffix keys only by their suffix.
        segments = [(prefix_start, prefix_len, group_end)]
        segments += [(start, length, start + length) for start, length in suffixes]
        per_group.append([(k_start, seg_start + seg_len, q_end) for seg_start, seg_len, q_end in segments
                          for k_start in range(seg_start, seg_start + seg_len, tile)])
    return per_group


def dkdv_chunk_rows(prefix_lens: Sequence[int], suffix_lens_per_group: Sequence[Sequence[int]],
                    tile: int, num_kv_heads: int, min_programs: int) -> int:
    """Query rows per dK/dV program: a multiple of ``tile`` such that splitting every key
    tile's query range into chunks of that many rows gives the launch about
    ``min_programs`` programs over ``num_kv_heads`` heads, or more (never fewer than one
    program per key tile and head)."""
    total_rows = sum(q_end - k_start for tiles in _key_tile_query_ranges(prefix_lens, suffix_lens_per_group, tile)
                     for k_start, _, q_end in tiles)
    wanted_chunks = -(-min_programs // num_kv_heads)
    return max(tile, -(-total_rows // (wanted_chunks * tile)) * tile)


def key_tile_rows(prefix_lens: Sequence[int], suffix_lens_per_group: Sequence[Sequence[int]],
                  tile: int, chunk_rows: int) -> tuple[list[KeyTile], list[SplitKeyTile]]:
    """The dK/dV programs, a :class:`KeyTile` per ``chunk_rows`` queries of each key tile of
    ``tile`` rows in launch order, and the :class:`SplitKeyTile` of every key tile that got
    more than one chunk (partial slots numbered from 0)."""
    per_group, split, num_slots = [], [], 0
    for tiles in _key_tile_query_ranges(prefix_lens, suffix_lens_per_group, tile):
        programs = []
        for k_start, k_end, q_end in tiles:
            chunk_starts = range(k_start, q_end, chunk_rows)
            if len(chunk_starts) == 1:
                programs.append((q_end - k_start, KeyTile(k_start, k_end, k_start, q_end, partial_slot=-1)))
                continue
            split.append(SplitKeyTile(k_start, k_end, first_slot=num_slots, num_slots=len(chunk_starts)))
            for chunk_start in chunk_starts:
                chunk_end = min(chunk_start + chunk_rows, q_end)
                programs.append((chunk_end - chunk_start,
                                 KeyTile(k_start, k_end, chunk_start, chunk_end, partial_slot=num_slots)))
                num_slots += 1
        per_group.append(programs)
    return _heaviest_first(per_group), split


def _checked_lengths(host_lengths: torch.Tensor) -> tuple[tuple[int, ...], list[tuple[int, ...]], int]:
    """``(prefix_lens, suffix_lens_per_group, total_tokens)`` of a layout's host lengths."""
    prefix_lens, group_sizes, suffix_lens = decode_host_lengths(host_lengths)
    total_tokens = sum(prefix_lens) + sum(suffix_lens)
    if total_tokens >= 2**31:
        raise ValueError(f"the triton backend indexes tokens in int32, T={total_tokens} does not fit")
    return prefix_lens, split_by_group(suffix_lens, group_sizes), total_tokens


def _layout_lengths(host_lengths: torch.Tensor, q: torch.Tensor):
    """``(prefix_lens, suffix_lens_per_group)`` of the layout, checked against q's tokens."""
    prefix_lens, suffix_lens_per_group, total_tokens = cached_per_layout(
        host_lengths, ("triton_lengths",), lambda: _checked_lengths(host_lengths))
    if total_tokens != q.shape[0]:
        raise ValueError(f"the layout packs T={total_tokens} tokens but q has {q.shape[0]}")
    return prefix_lens, suffix_lens_per_group


def _schedule_tensor(rows: list[tuple], columns: int, device: torch.device) -> torch.Tensor:
    """``[len(rows), columns]`` int32 on ``device`` (also when there are no rows)."""
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(len(rows), columns)


def _query_schedule(host_lengths: torch.Tensor, q: torch.Tensor,
                    num_kv_heads: int) -> tuple[torch.Tensor, HeadPacking]:
    """``(q_tiles, packing)`` for q's head dim, dtype and device and ``num_kv_heads``; the
    schedule is built once per layout and tile."""
    block_m, _ = _tile_sizes(q.shape[-1], q.dtype)
    packing = head_packing(block_m, q.shape[1] // num_kv_heads)
    prefix_lens, suffix_lens_per_group = _layout_lengths(host_lengths, q)
    q_tiles = cached_per_layout(
        host_lengths, ("triton_schedule", "q", packing.tile_tokens, q.device),
        lambda: _schedule_tensor(query_tile_rows(prefix_lens, suffix_lens_per_group, packing.tile_tokens),
                                 QUERY_TILE_COLUMNS.value, q.device))
    return q_tiles, packing


def _min_dkdv_programs(device: torch.device) -> int:
    """Two dK/dV programs per SM, so a slow chunk overlaps others. Under the interpreter the
    schedule is the one of the 132-SM Hopper GPUs the kernels are tuned for, so CPU tests
    run the same splits."""
    if triton_interpreted():
        return 2 * HOPPER_SMS
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _key_schedule(host_lengths: torch.Tensor, q: torch.Tensor,
                  num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(kv_tiles, split_kv_tiles, num_partial_slots, kv_tile)`` for q's head dim, dtype and
    device and ``num_kv_heads``, built once per layout."""
    _, kv_tile = _tile_sizes(q.shape[-1], q.dtype)
    prefix_lens, suffix_lens_per_group = _layout_lengths(host_lengths, q)

    def build():
        chunk_rows = dkdv_chunk_rows(prefix_lens, suffix_lens_per_group, kv_tile, num_kv_heads,
                                     _min_dkdv_programs(q.device))
        programs, split = key_tile_rows(prefix_lens, suffix_lens_per_group, kv_tile, chunk_rows)
        return (_schedule_tensor(programs, KEY_TILE_COLUMNS.value, q.device),
                _schedule_tensor(split, SPLIT_KEY_TILE_COLUMNS.value, q.device),
                sum(row.num_slots for row in split))

    kv_tiles, split_kv_tiles, num_slots = cached_per_layout(
        host_lengths, ("triton_schedule", "kv", kv_tile, num_kv_heads, q.device), build)
    return kv_tiles, split_kv_tiles, num_slots, kv_tile


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
    q_tiles, packing = _query_schedule(host_lengths, q, k.shape[1])
    with device_guard(q):
        return launch_forward(q, k, v, q_tiles, packing, softmax_scale)


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
    q_tiles, packing = _query_schedule(host_lengths, q, k.shape[1])
    kv_tiles, split_kv_tiles, num_partial_slots, kv_tile = _key_schedule(host_lengths, q, k.shape[1])
    with device_guard(q):
        return launch_backward(dout, dlse, q, k, v, out, lse, q_tiles, kv_tiles, split_kv_tiles,
                               num_partial_slots, packing, kv_tile, softmax_scale)


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
