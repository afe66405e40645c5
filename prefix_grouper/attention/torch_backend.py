"""Efficient pure-PyTorch shared-prefix attention (differentiable, any device).

Three exact parts merged by log-sum-exp, each an attention call that returns its LSE:

1. every segment (a prompt or a non-empty completion) causal over itself: one batched
   call per length bucket (segments whose lengths share ``ceil(log2(L))``, padded to the
   bucket's longest, so padding at most doubles a segment and stays linear in tokens);
2. every completion token of a group against the group's whole prompt: one dense,
   mask-free call per group on contiguous slices of the packed axis (no copy of the
   prompt's K/V per completion, no padding to the batch's longest prompt);
3. the merge of (1) and (2) on the completion tokens:
   ``lse = logaddexp(lse_1, lse_2)``, ``out = out_1 exp(lse_1 - lse) + out_2 exp(lse_2 - lse)``.

Every call returns its LSE and runs on an :class:`AttentionEngine` (:func:`engine_for`):
on CPU :data:`CPU_FLASH`, the fused flash kernel (tiled, never holding a score matrix);
elsewhere :data:`CHUNKED`, query chunks of at most ``SCORE_BLOCK_BYTES`` of scores,
recomputed in the backward. Both take GQA natively (K/V never repeated). The backward runs
every part's kernel against the merged out and lse: with ``P = exp(S - merged lse)`` each
part's softmax gradient is its share of the merged attention's exact gradient, so the merge
has no backward of its own. Extra memory is O(T) plus tiles.

Containment of NaN/inf: a masked key still enters its row's ``probs @ V`` product with a
zero probability, and ``0 * NaN = NaN``. So no call mixes segments that must not see each
other (a batch row of (1) is one segment; a call of (2) one group's completions against
its prompt), and padding gathers an appended zero row rather than the neighbouring tokens.
A non-finite K/V of a completion token then reaches only that completion's rows, one of a
prefix token only its group's rows, as in the naive layout.
"""
from __future__ import annotations

from itertools import groupby
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ..layout import GroupLayout

__all__ = ["CHUNKED", "CPU_FLASH", "SCORE_BLOCK_BYTES", "AttentionEngine", "engine_for", "torch_prefix_attention"]

SCORE_BLOCK_BYTES = 64 * 2**20
"""Most bytes of scores :data:`CHUNKED` holds at once (one query chunk; its backward holds
the chunk's scores, probabilities and their gradient)."""


class AttentionEngine(NamedTuple):
    """One attention kernel family; q ``[R, Hq, Lq, D]``, k/v ``[R, Hkv, Lk, D]``,
    ``Hq % Hkv == 0`` (GQA native: K/V never repeated), ``causal`` top-left aligned with
    ``Lq == Lk``, else every key visible.

    ``forward(q, k, v, causal, scale) -> (out [R, Hq, Lq, D], lse [R, Hq, Lq])``.
    ``backward(grad_out, q, k, v, out, lse, grad_lse, causal, scale) -> (dq, dk, dv)``: the
    softmax gradient ``dS = P * (dO V^T - rowsum(dO * out) + grad_lse)`` with
    ``P = exp(S - lse)``, ``grad_lse`` None for zero. Given a merged ``out``/``lse`` of
    several calls (a row's attention over all its keys), it returns this call's share of
    the merged attention's exact gradient, so merges need no backward of their own.
    """

    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _cpu_flash_forward(q, k, v, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _cpu_flash_backward(grad_out, q, k, v, out, lse, grad_lse, causal, scale):
    head_dim = q.shape[-1]
    if grad_lse is not None:
        # The kernel forms rowsum(grad_out * out) itself. One extra head-dim column holding
        # -grad_lse in grad_out and 1 in out adds grad_lse there; it is zero in q, k and v,
        # so the scores and dO V^T are unchanged.
        grad_out = torch.cat([grad_out, -grad_lse[..., None]], -1)
        out = F.pad(out, (0, 1), value=1.0)
        q, k, v = (F.pad(x, (0, 1)) for x in (q, k, v))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.contiguous(), q, k, v, out, lse, 0.0, causal, scale=scale)
    return dq[..., :head_dim], dk[..., :head_dim], dv[..., :head_dim]


CPU_FLASH = AttentionEngine(_cpu_flash_forward, _cpu_flash_backward)
"""``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward (tiled, no score matrix)."""


def _chunks(q: torch.Tensor, k: torch.Tensor, causal: bool):
    """``(rows, queries, keys, first_query)`` slices whose scores take at most
    ``SCORE_BLOCK_BYTES`` (one query row of one batch row at least); ``first_query`` is the
    causal offset of the chunk's first query, None when not causal."""
    r, hq, lq, _ = q.shape
    row_bytes = hq * k.shape[2] * q.element_size()  # the scores of one query of one batch row
    rows_per_chunk = max(1, SCORE_BLOCK_BYTES // (row_bytes * lq))
    for row in range(0, r, rows_per_chunk):
        rows = slice(row, min(r, row + rows_per_chunk))
        queries_per_chunk = max(1, SCORE_BLOCK_BYTES // (row_bytes * (rows.stop - row)))
        for start in range(0, lq, queries_per_chunk):
            stop = min(lq, start + queries_per_chunk)
            yield rows, slice(start, stop), slice(0, stop if causal else None), start if causal else None


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[R, Hq, L, D]`` -> ``[R, Hkv, Hq / Hkv, L, D]``: a KV head's query heads on one dim."""
    return x.reshape(x.shape[0], kv_heads, -1, *x.shape[2:])


def _chunk_scores(q_chunk, k_chunk, first_query, scale):
    """Scaled, masked scores ``[R, Hkv, Hq / Hkv, C, K]`` of grouped queries against ``[R, Hkv, K, D]``."""
    scores = (q_chunk * scale) @ k_chunk[:, :, None].transpose(-1, -2)
    if first_query is not None:
        positions = torch.arange(k_chunk.shape[2], device=q_chunk.device)
        visible = positions[None, :] <= positions[:q_chunk.shape[3], None] + first_query
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def _chunked_forward(q, k, v, causal, scale):
    hkv = k.shape[1]
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:3])
    for rows, queries, keys, first_query in _chunks(q, k, causal):
        scores = _chunk_scores(_grouped(q[rows, :, queries], hkv), k[rows, :, keys], first_query, scale)
        chunk_lse = torch.logsumexp(scores, -1)  # causal rows see at least their own key
        chunk_out = torch.exp(scores - chunk_lse[..., None]) @ v[rows, :, keys][:, :, None]
        out[rows, :, queries] = chunk_out.flatten(1, 2)
        lse[rows, :, queries] = chunk_lse.flatten(1, 2)
    return out, lse


def _chunked_backward(grad_out, q, k, v, out, lse, grad_lse, causal, scale):
    hkv = k.shape[1]
    delta = (grad_out * out).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rows, queries, keys, first_query in _chunks(q, k, causal):
        q_chunk, grad_chunk = (_grouped(x[rows, :, queries], hkv) for x in (q, grad_out))
        k_chunk, v_chunk = k[rows, :, keys], v[rows, :, keys]
        scores = _chunk_scores(q_chunk, k_chunk, first_query, scale)
        probs = torch.exp(scores - _grouped(lse[rows, :, queries], hkv)[..., None])
        grad_scores = probs * (grad_chunk @ v_chunk[:, :, None].transpose(-1, -2)
                               - _grouped(delta[rows, :, queries], hkv)[..., None])
        dq[rows, :, queries] = (grad_scores @ k_chunk[:, :, None]).flatten(1, 2) * scale
        dk[rows, :, keys] += (grad_scores.transpose(-1, -2) @ q_chunk).sum(2) * scale
        dv[rows, :, keys] += (probs.transpose(-1, -2) @ grad_chunk).sum(2)
    return dq, dk, dv


CHUNKED = AttentionEngine(_chunked_forward, _chunked_backward)
"""Plain torch ops on any device: query chunks of at most ``SCORE_BLOCK_BYTES`` of scores,
recomputed in the backward."""


def engine_for(device: torch.device) -> AttentionEngine:
    """:data:`CPU_FLASH` on CPU, :data:`CHUNKED` elsewhere."""
    return CPU_FLASH if device.type == "cpu" else CHUNKED


def _plan(layout: GroupLayout) -> dict:
    """Length buckets of the causal part, the (completion tokens, prompt) slices of the dense part, and where
    every packed token's causal-part row lies."""
    segments, cross = [], []  # (packed start, length) of non-empty segments; (completion tokens, prompt) slices
    start = 0
    for prefix_len, suffix_lens in zip(layout.prefix_lens_list, layout.suffix_lens_per_group):
        prompt = slice(start, start + prefix_len)
        segments.append((start, prefix_len))
        start += prefix_len
        for suffix_len in suffix_lens:
            if suffix_len:
                segments.append((start, suffix_len))
            start += suffix_len
        if start > prompt.stop:
            cross.append((slice(prompt.stop, start), prompt))

    def bucket(segment):
        return (segment[1] - 1).bit_length()

    device, zero_row = layout.device, layout.total_tokens
    indices, shapes = [], []
    for _, members in groupby(sorted(segments, key=bucket), key=bucket):
        host_starts, host_lens = zip(*members)
        starts, lens = (torch.tensor(column, dtype=torch.long, device=device) for column in (host_starts, host_lens))
        columns = torch.arange(max(host_lens), device=device)
        indices.append(torch.where(columns[None, :] < lens[:, None], starts[:, None] + columns[None, :], zero_row))
        shapes.append(tuple(indices[-1].shape))
    self_index = torch.cat([index.flatten() for index in indices])
    row_of_token = torch.empty(layout.total_tokens, dtype=torch.long, device=device)
    is_token = self_index != zero_row
    row_of_token[self_index[is_token]] = torch.arange(self_index.numel(), device=device)[is_token]
    return {"self_index": self_index, "bucket_shapes": shapes, "row_of_token": row_of_token, "cross": cross}


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """``[L, H, D]`` <-> ``[H, L, D]`` (a view)."""
    return x.transpose(-3, -2)


def _to_buckets(x: torch.Tensor, plan: dict, padding: float) -> list[torch.Tensor]:
    """Packed ``x [T, H, ...]`` as the causal part's batches ``[n, H, W, ...]``, ``padding``
    on the padded slots (an appended row: a clamped neighbour's NaN would reach the padded
    slots' gradients through their zero probabilities)."""
    padded = torch.cat([x, x.new_full((1, *x.shape[1:]), padding)])[plan["self_index"]]
    sizes = [n * width for n, width in plan["bucket_shapes"]]
    return [chunk.view(n, width, *x.shape[1:]).transpose(1, 2)
            for chunk, (n, width) in zip(padded.split(sizes), plan["bucket_shapes"])]


def _from_buckets(chunks: list[torch.Tensor], plan: dict) -> torch.Tensor:
    """Inverse of :func:`_to_buckets`: ``[n, H, W, ...]`` batches back to packed ``[T, H, ...]``."""
    return torch.cat([chunk.transpose(1, 2).flatten(0, 1) for chunk in chunks])[plan["row_of_token"]]


class _PrefixAttention(torch.autograd.Function):
    """The three parts and their merge; the backward runs every part's kernel against the
    merged out/lse, which is the merged attention's exact gradient."""

    @staticmethod
    def forward(ctx, q, k, v, plan: dict, scale: float):
        engine = engine_for(q.device)
        parts = [engine.forward(*chunks, True, scale) for chunks in zip(*(_to_buckets(x, plan, 0.0) for x in (q, k, v)))]
        out = _from_buckets([part_out for part_out, _ in parts], plan)
        lse = _from_buckets([part_lse for _, part_lse in parts], plan)
        for queries, prompt in plan["cross"]:
            cross_out, cross_lse = engine.forward(_heads_first(q[queries])[None], _heads_first(k[prompt])[None],
                                                  _heads_first(v[prompt])[None], False, scale)
            cross_out, cross_lse = _heads_first(cross_out[0]), cross_lse[0].transpose(0, 1)
            merged_lse = torch.logaddexp(cross_lse, lse[queries])
            out[queries] = (cross_out * torch.exp(cross_lse - merged_lse)[..., None]
                            + out[queries] * torch.exp(lse[queries] - merged_lse)[..., None])
            lse[queries] = merged_lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        ctx.plan, ctx.scale = plan, scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        engine = engine_for(q.device)
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        # Padded slots get lse = +inf: probability 0, so they add nothing to the real keys' gradients.
        bucketed = [_to_buckets(x, plan, 0.0) for x in (grad_out, q, k, v, out)]
        bucketed.append(_to_buckets(lse, plan, float("inf")))
        bucketed.append(_to_buckets(grad_lse, plan, 0.0) if grad_lse is not None else [None] * len(bucketed[0]))
        grads = [engine.backward(*chunks, True, scale) for chunks in zip(*bucketed)]
        dq, dk, dv = (_from_buckets([grad[i] for grad in grads], plan) for i in range(3))
        for queries, prompt in plan["cross"]:
            cross_dq, cross_dk, cross_dv = engine.backward(
                *(_heads_first(x[queries])[None] for x in (grad_out, q)),
                *(_heads_first(x[prompt])[None] for x in (k, v)),
                _heads_first(out[queries])[None], lse[queries].transpose(0, 1)[None],
                None if grad_lse is None else grad_lse[queries].transpose(0, 1)[None], False, scale)
            dq[queries] += _heads_first(cross_dq[0])
            dk[prompt] += _heads_first(cross_dk[0])
            dv[prompt] += _heads_first(cross_dv[0])
        return dq, dk, dv, None, None


def torch_prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: GroupLayout, softmax_scale: float, *,
    window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shared-prefix attention in plain PyTorch.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]``, ``Hq % Hkv == 0``, validated by the caller.
        need_lse: also return the LSE (it is computed either way: the merge needs it).

    Returns ``(out [T, Hq, D] in q.dtype, lse [T, Hq] float32 (float64 for fp64 inputs) or
    None when not ``need_lse``)``. Half-precision inputs are computed in float32.
    """
    unsupported = [name for name, value in (("window", window), ("softcap", softcap), ("sinks", sinks))
                   if value is not None]
    if unsupported:
        raise NotImplementedError(f"backend='torch' does not implement {', '.join(unsupported)} yet")
    plan = layout.cached(("torch_backend_plan",), lambda: _plan(layout))
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out, lse = _PrefixAttention.apply(q.to(compute), k.to(compute), v.to(compute), plan, softmax_scale)
    return out.to(q.dtype), (lse if need_lse else None)
