"""``backend="triton"``: fused shared-prefix attention, forward and backward, with the
optional sliding window, logit softcap and attention sinks.

The kernels (``triton_fwd``, ``triton_bwd``) read the packed batch in place through two
tile schedules (``triton_schedule``) built once per layout (and tiling, window and
device) from its host-side segmentation, a prefix tree (a one-level GRPO layout is the
depth-1 tree), so no call ever synchronizes with the device:

* query tiles ``[num_q_tiles, QUERY_TILE_COLUMNS]`` int32 rows, the fields of
  :class:`~.triton_common.QueryTile` (``q_start, seg_start, seg_end, runs_begin,
  runs_end``): ``tile_tokens`` tokens of one segment, taken by one program per pack of
  query heads (:class:`~.triton_common.HeadPacking`); ``runs_begin:runs_end`` index the
  runs table ``[num_runs, ANCESTOR_RUN_COLUMNS]`` (:class:`~.triton_common.AncestorRun`),
  the segment's ancestor key runs, root first (a one-level completion: its prefix; a
  root: none), walked before the segment's own keys (forward and dQ);
* dK/dV programs ``[num_programs, KEY_TILE_COLUMNS]`` int32 rows, the fields of
  :class:`~.triton_common.KeyTile` (``k_start, k_end, chunk_start, chunk_end,
  partial_slot, pos_shift``): BLOCK_N keys of one segment against one chunk of the packed
  queries that see them (the segment's later tokens and its whole subtree, one packed
  range in pre-order), and the split key tiles ``[num_split, SPLIT_KEY_TILE_COLUMNS]``
  (:class:`~.triton_common.SplitKeyTile`) whose partials the reduction kernel sums.
  The chunk length (:func:`dkdv_chunk_rows`) gives the launch at least two programs per
  SM even with GQA's few KV heads. With a window, only the queries whose window reaches a
  key tile get programs.

The kernels are wrapped as ``torch.library`` custom ops with fake and autograd
registrations, so ``torch.compile`` treats them as opaque, differentiable nodes; eager calls
run the same two functions through a plain ``autograd.Function`` (torch.library's dispatch
costs host time on every call, per layer). The ops
take the layout as one CPU int64 tensor, ``GroupLayout.host_segments`` (see
:func:`~prefix_grouper.layout.encode_host_segments`), and build the schedules inside their
real implementations, memoized in the layout's cache (:func:`~prefix_grouper.layout.cached_per_layout`).
Compiled code thus sees only tensor inputs (and the window and softcap scalars): it never
traces the Python schedule builder nor specializes on lengths, so after one recompile with
dynamic shapes a single graph serves every layout. Reading a CPU tensor is no device
synchronization; each schedule is uploaded once per layout. The sinks are a tensor input
with a gradient.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..layout import GroupLayout, cached_per_layout, segmentation_of
from ..layout.segmentation import Segmentation
from ..runtime import device_guard, triton_interpreted
from .triton_bwd import launch_backward
from .triton_common import (
    ANCESTOR_RUN_COLUMNS, KEY_TILE_COLUMNS, QUERY_TILE_COLUMNS, SPLIT_KEY_TILE_COLUMNS, HeadPacking, ScoreFeatures,
    dot_precision, head_packing, padded_head_dim,
)
from .triton_fwd import launch_forward
from .triton_schedule import dkdv_chunk_rows, key_tile_rows, query_tile_rows

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
    the K/V pipeline stages fit in registers and shared memory; fp32 without TF32 ("ieee"
    dots, FMA loops over register operands) counts its rows twice as wide: with 128-row
    tiles ptxas spilled up to 75 KB per thread at head dim 64 and 115 KB at 128 for sm_90a
    (benchmarks/results/sm90_ptxas_cpu_2026-12-04/kernels_fp32_ieee_triton3.6.csv).
    """
    if triton_interpreted():
        return _INTERPRETER_TILE, _INTERPRETER_TILE
    row_bytes = padded_head_dim(head_dim) * dtype.itemsize * (2 if dot_precision(dtype) == "ieee" else 1)
    tile = 128 if row_bytes <= 256 else 64 if row_bytes <= 512 else 32 if row_bytes <= 1024 else 16
    return tile, tile


def _checked_segmentation(host: torch.Tensor) -> Segmentation:
    """The layout's segmentation (``host``: its ``host_segments``),
    checked to fit the kernels' int32 token indices."""
    segmentation = segmentation_of(host)
    if segmentation.total_tokens >= 2**31:
        raise ValueError(f"the triton backend indexes tokens in int32, T={segmentation.total_tokens} does not fit")
    return segmentation


def _layout_segmentation(host: torch.Tensor, q: torch.Tensor) -> Segmentation:
    """The layout's segmentation, checked against q's tokens."""
    segmentation = cached_per_layout(host, ("triton_segmentation",), lambda: _checked_segmentation(host))
    if segmentation.total_tokens != q.shape[0]:
        raise ValueError(f"the layout packs T={segmentation.total_tokens} tokens but q has {q.shape[0]}")
    return segmentation


def _schedule_tensor(rows: list[tuple], columns: int, device: torch.device) -> torch.Tensor:
    """``[len(rows), columns]`` int32 on ``device`` (also when there are no rows)."""
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(len(rows), columns)


def _features(host: torch.Tensor, q: torch.Tensor, window: Optional[int], softcap: Optional[float],
              sinks: Optional[torch.Tensor]) -> ScoreFeatures:
    """The kernels' :class:`ScoreFeatures`: a window that hides nothing (at least the
    longest row) is dropped, so it costs nothing; sinks as float32."""
    if window is not None and window >= _layout_segmentation(host, q).longest_row:
        window = None
    return ScoreFeatures(window, softcap, None if sinks is None else sinks.float().contiguous())


def _query_schedule(host: torch.Tensor, q: torch.Tensor, num_kv_heads: int,
                    window: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, HeadPacking]:
    """``(q_tiles, runs, packing)`` for q's head dim, dtype and device, ``num_kv_heads`` and
    the window (which orders the tiles); the schedule is built once per layout and tile."""
    block_m, _ = _tile_sizes(q.shape[-1], q.dtype)
    packing = head_packing(block_m, q.shape[1] // num_kv_heads)
    segmentation = _layout_segmentation(host, q)

    def build():
        tiles, runs = query_tile_rows(segmentation, packing.tile_tokens, window)
        return (_schedule_tensor(tiles, QUERY_TILE_COLUMNS.value, q.device),
                _schedule_tensor(runs, ANCESTOR_RUN_COLUMNS.value, q.device))

    q_tiles, runs = cached_per_layout(host, ("triton_query_tiles", packing.tile_tokens, window, q.device),
                                      build)
    return q_tiles, runs, packing


def _min_dkdv_programs(device: torch.device) -> int:
    """Two dK/dV programs per SM, so a slow chunk overlaps others. Under the interpreter the
    schedule is the one of the 132-SM Hopper GPUs the kernels are tuned for, so CPU tests
    run the same splits."""
    if triton_interpreted():
        return 2 * HOPPER_SMS
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _key_schedule(host: torch.Tensor, q: torch.Tensor, num_kv_heads: int,
                  window: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(kv_tiles, split_kv_tiles, num_partial_slots, kv_tile)`` for q's head dim, dtype and
    device, ``num_kv_heads`` and the window, built once per layout."""
    _, kv_tile = _tile_sizes(q.shape[-1], q.dtype)
    segmentation = _layout_segmentation(host, q)

    def build():
        chunk_rows = dkdv_chunk_rows(segmentation, kv_tile, num_kv_heads, _min_dkdv_programs(q.device), window)
        programs, split = key_tile_rows(segmentation, kv_tile, chunk_rows, window)
        return (_schedule_tensor(programs, KEY_TILE_COLUMNS.value, q.device),
                _schedule_tensor(split, SPLIT_KEY_TILE_COLUMNS.value, q.device),
                sum(row.num_slots for row in split))

    kv_tiles, split_kv_tiles, num_slots = cached_per_layout(
        host, ("triton_key_tiles", kv_tile, num_kv_heads, window, q.device), build)
    return kv_tiles, split_kv_tiles, num_slots, kv_tile


def _unit_stride_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dim is dense (the kernels take any other strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: Optional[torch.Tensor],
             host: torch.Tensor, softmax_scale: float, window: Optional[int],
             softcap: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_unit_stride_last(x) for x in (q, k, v))
    features = _features(host, q, window, softcap, sinks)
    q_tiles, runs, packing = _query_schedule(host, q, k.shape[1], features.window)
    with device_guard(q):
        return launch_forward(q, k, v, q_tiles, runs, packing, softmax_scale, features)


def _backward(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, sinks: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
              host: torch.Tensor, softmax_scale: float, window: Optional[int],
              softcap: Optional[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dout, q, k, v, out = (_unit_stride_last(x) for x in (dout, q, k, v, out))
    features = _features(host, q, window, softcap, sinks)
    q_tiles, runs, packing = _query_schedule(host, q, k.shape[1], features.window)
    kv_tiles, split_kv_tiles, num_partial_slots, kv_tile = _key_schedule(host, q, k.shape[1],
                                                                         features.window)
    with device_guard(q):
        dq, dk, dv, dsinks = launch_backward(dout, dlse, q, k, v, out, lse, q_tiles, runs, kv_tiles, split_kv_tiles,
                                             num_partial_slots, packing, kv_tile, softmax_scale, features)
    return dq, dk, dv, q.new_empty(0, dtype=torch.float32) if dsinks is None else dsinks


@torch.library.custom_op("prefix_grouper::prefix_attention_fwd", mutates_args=())
def _prefix_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: Optional[torch.Tensor],
    host: torch.Tensor, softmax_scale: float, window: Optional[int], softcap: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [T, Hq, D], lse [T, Hq] float32)``; the layout is ``GroupLayout.host_segments``
    (a flat layout's ``host_lengths`` is read too), sinks ``[Hq]`` or None."""
    return _forward(q, k, v, sinks, host, softmax_scale, window, softcap)


@_prefix_attention_fwd.register_fake
def _(q, k, v, sinks, host, softmax_scale, window, softcap):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("prefix_grouper::prefix_attention_bwd", mutates_args=())
def _prefix_attention_bwd(
    dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, sinks: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
    host: torch.Tensor, softmax_scale: float, window: Optional[int], softcap: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq [T, Hq, D], dk [T, Hkv, D], dv [T, Hkv, D], dsinks)``; dlse ``[T, Hq]`` may be
    None; dsinks is ``[Hq]`` float32, or empty ``[0]`` without sinks."""
    return _backward(dout, dlse, q, k, v, sinks, out, lse, host, softmax_scale, window, softcap)


@_prefix_attention_bwd.register_fake
def _(dout, dlse, q, k, v, sinks, out, lse, host, softmax_scale, window, softcap):
    dsinks = q.new_empty(0 if sinks is None else sinks.shape[0], dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _save_for_backward(ctx, inputs, output):
    q, k, v, sinks, host, softmax_scale, window, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, sinks, out, lse, host)
    # Most callers never use lse: let its gradient arrive as None instead of a zero tensor.
    ctx.set_materialize_grads(False)
    ctx.scalars = (softmax_scale, window, softcap)


def _input_grads(ctx, dout, dlse, backward):
    """The forward inputs' gradients, with ``backward`` the op or its plain implementation."""
    q, k, v, sinks, out, lse, host = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dsinks = backward(dout, dlse, q, k, v, sinks, out, lse, host, *ctx.scalars)
    return dq, dk, dv, None if sinks is None else dsinks.to(sinks.dtype), None, None, None, None


_prefix_attention_fwd.register_autograd(lambda ctx, dout, dlse: _input_grads(ctx, dout, dlse, _prefix_attention_bwd),
                                        setup_context=_save_for_backward)


class _EagerPrefixAttention(torch.autograd.Function):
    """The custom ops' computation without torch.library's dispatch, for eager calls, which
    pay host time per layer in the forward, the recomputation and the backward (stubbed
    kernels on a 2-vCPU x86 VM, fwd+bwd median: 137 us through this, 196 us through the
    ops). torch.compile'd code takes the ops."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, host, softmax_scale, window, softcap):
        output = _forward(q, k, v, sinks, host, softmax_scale, window, softcap)
        _save_for_backward(ctx, (q, k, v, sinks, host, softmax_scale, window, softcap), output)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        return _input_grads(ctx, dout, dlse, _backward)


def triton_prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: GroupLayout, softmax_scale: float, *,
    window: Optional[int] = None, softcap: Optional[float] = None, sinks: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared-prefix attention with the fused Triton kernels (inputs validated by the caller):
    every token sees its segment's ancestor runs and, causally, its own segment.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]``, ``Hq % Hkv == 0``, fp16/bf16/fp32,
            ``D <= 256``; any strides (a non-unit last-dim stride costs a copy).
        layout: the batch's :class:`GroupLayout` on q's device, one-level or a prefix tree.
        softmax_scale: multiplier of ``q . k`` before the softmax.
        window: an int >= 1: key j is visible from query i only when ``pos_i - window <
            pos_j`` (``layout.position_ids``); key blocks wholly outside are skipped.
        softcap: scores become ``softcap * tanh(scores / softcap)`` before the softmax.
        sinks: ``[Hq]`` logits joining every row's softmax denominator (no value, not
            scaled or capped); differentiable.

    Returns ``(out [T, Hq, D] in q.dtype, lse [T, Hq] float32)``, both differentiable; the
    lse includes the sinks.
    """
    # Only tensors and scalars cross into the ops: torch.compile traces no schedule
    # building and does not specialize on the layout's lengths.
    host = layout.host_segments
    # Tensor subclasses (FakeTensor, FunctionalTensor, ...) take the op, whose fake they need.
    plain_eager = not torch.compiler.is_compiling() and all(type(x) is torch.Tensor for x in (q, k, v))
    op = _EagerPrefixAttention.apply if plain_eager else _prefix_attention_fwd
    return op(q, k, v, sinks, host, float(softmax_scale), None if window is None else int(window),
              None if softcap is None else float(softcap))
