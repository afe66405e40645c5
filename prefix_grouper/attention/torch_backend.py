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

Each call runs through :func:`attention_with_lse`: on CPU the fused flash kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``, tiled, never holding a score
matrix), elsewhere :func:`chunked_attention_with_lse` (query chunks whose score block is
at most ``SCORE_BLOCK_BYTES``, recomputed in the backward). Both take GQA natively (no
repeated K/V) and are differentiable in out and lse, so autograd through the merge is exact.
Extra memory is O(T) plus tiles.

Containment of NaN/inf: a masked key still enters its row's ``probs @ V`` product with a
zero probability, and ``0 * NaN = NaN``. So no call mixes segments that must not see each
other (a batch row of (1) is one segment; a call of (2) one group's completions against
its prompt), and padding gathers an appended zero row rather than the neighbouring tokens.
A non-finite K/V of a completion token then reaches only that completion's rows, one of a
prefix token only its group's rows, as in the naive layout.
"""
from __future__ import annotations

from itertools import groupby

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..layout import GroupLayout

__all__ = ["SCORE_BLOCK_BYTES", "attention_with_lse", "chunked_attention_with_lse", "torch_prefix_attention"]

SCORE_BLOCK_BYTES = 64 * 2**20
"""Most bytes of scores :func:`chunked_attention_with_lse` holds at once (one query chunk)."""


class _FusedCpuAttention(torch.autograd.Function):
    """``aten._scaled_dot_product_flash_attention_for_cpu`` with a gradient for its LSE too."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        ctx.causal, ctx.scale = causal, scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        head_dim = q.shape[-1]
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        if grad_lse is not None:
            # The scores' gradient is P * (dP - (rowsum(dO * O) - dlse)), and the fused
            # backward forms rowsum(grad_out * out) itself. One extra head-dim column holding
            # -dlse in grad_out and 1 in out subtracts dlse there; it is zero in q, k and v,
            # so the scores and dP = dO V^T are unchanged.
            grad_out = torch.cat([grad_out, -grad_lse[..., None]], -1)
            out = F.pad(out, (0, 1), value=1.0)
            q, k, v = (F.pad(x, (0, 1)) for x in (q, k, v))
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.contiguous(), q, k, v, out, lse, 0.0, ctx.causal, scale=ctx.scale)
        return dq[..., :head_dim], dk[..., :head_dim], dv[..., :head_dim], None, None


def _attention_block(q, k, v, first_query: int | None, scale: float):
    """Scores of one query block: q ``[R, Hq, C, D]``, k/v ``[R, Hkv, K, D]``; causal with the
    block's first query at position ``first_query`` (None: every key visible)."""
    r, hq, c, d = q.shape
    hkv, keys = k.shape[1], k.shape[2]
    # GQA: the query heads of one KV head form a broadcast dim, so K/V are never repeated.
    scores = (q.reshape(r, hkv, hq // hkv, c, d) * scale) @ k[:, :, None].transpose(-1, -2)
    if first_query is not None:
        positions = torch.arange(keys, device=q.device)
        visible = positions[None, :] <= positions[:c, None] + first_query
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, -1)  # causal rows see at least their own key
    out = torch.exp(scores - lse[..., None]) @ v[:, :, None]
    return out.reshape(r, hq, c, d), lse.reshape(r, hq, c)


def chunked_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in plain torch ops on any device, chunked over rows and queries.

    Args:
        q: ``[R, Hq, Lq, D]``; k, v: ``[R, Hkv, Lk, D]``, ``Hq % Hkv == 0``; ``causal``
            (top-left aligned, ``Lq == Lk``) or every key visible.

    Returns ``(out [R, Hq, Lq, D], lse [R, Hq, Lq])``. Each chunk's scores, at most
    ``SCORE_BLOCK_BYTES`` (one query row of one batch row at least), are recomputed in the
    backward instead of kept.
    """
    r, hq, lq, _ = q.shape
    row_bytes = hq * k.shape[2] * q.element_size()  # the scores of one query row of one batch row
    rows_per_chunk = max(1, SCORE_BLOCK_BYTES // (row_bytes * lq))
    row_outs, row_lses = [], []
    for row in range(0, r, rows_per_chunk):
        rows = slice(row, row + rows_per_chunk)
        queries_per_chunk = max(1, SCORE_BLOCK_BYTES // (row_bytes * q[rows].shape[0]))
        outs, lses = [], []
        for start in range(0, lq, queries_per_chunk):
            stop = min(lq, start + queries_per_chunk)
            keys = slice(0, stop if causal else None)
            out, lse = checkpoint(_attention_block, q[rows, :, start:stop], k[rows, :, keys], v[rows, :, keys],
                                  start if causal else None, scale, use_reentrant=False)
            outs.append(out)
            lses.append(lse)
        row_outs.append(torch.cat(outs, 2))
        row_lses.append(torch.cat(lses, 2))
    return torch.cat(row_outs), torch.cat(row_lses)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention returning its log-sum-exp, differentiable in both.

    Args:
        q: ``[R, Hq, Lq, D]``; k, v: ``[R, Hkv, Lk, D]``, ``Hq % Hkv == 0``, float32 or
            float64; ``causal`` (top-left aligned, ``Lq == Lk``) or every key visible.

    Returns ``(out [R, Hq, Lq, D], lse [R, Hq, Lq])``: the fused CPU flash kernel on CPU,
    :func:`chunked_attention_with_lse` on other devices.
    """
    if q.device.type == "cpu":
        return _FusedCpuAttention.apply(q, k, v, causal, scale)
    return chunked_attention_with_lse(q, k, v, causal, scale)


def _plan(layout: GroupLayout) -> dict:
    """Length buckets of the causal part, the packed pieces of the dense part, and where
    every packed token's causal-part row lies."""
    segments, pieces = [], []  # (packed start, length) of non-empty segments; [P_b, completion tokens of b]...
    start = 0
    for prefix_len, suffix_lens in zip(layout.prefix_lens_list, layout.suffix_lens_per_group):
        segments.append((start, prefix_len))
        start += prefix_len
        for suffix_len in suffix_lens:
            if suffix_len:
                segments.append((start, suffix_len))
            start += suffix_len
        pieces += [prefix_len, sum(suffix_lens)]

    def bucket(segment):
        return (segment[1] - 1).bit_length()

    device, zero_row = layout.device, layout.total_tokens
    indices, shapes = [], []
    for _, members in groupby(sorted(segments, key=bucket), key=bucket):
        starts, lens = (torch.tensor(column, dtype=torch.long, device=device) for column in zip(*members))
        columns = torch.arange(int(lens.max()), device=device)
        indices.append(torch.where(columns[None, :] < lens[:, None], starts[:, None] + columns[None, :], zero_row))
        shapes.append(tuple(indices[-1].shape))
    self_index = torch.cat([index.flatten() for index in indices])
    row_of_token = torch.empty(layout.total_tokens, dtype=torch.long, device=device)
    is_token = self_index != zero_row
    row_of_token[self_index[is_token]] = torch.arange(self_index.numel(), device=device)[is_token]
    return {"self_index": self_index, "bucket_shapes": shapes, "row_of_token": row_of_token,
            "pieces": pieces + [1]}  # the zero row closes the packed axis


def _with_zero_row(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x [T, ...]`` in ``dtype`` with a zero row appended at index T, which padding gathers:
    a clamped neighbour token's NaN would otherwise reach a padded batch's rows through
    their zero probabilities (and their gradients)."""
    return torch.cat([x.to(dtype), x.new_zeros((1, *x.shape[1:]), dtype=dtype)])


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """``[..., L, H, D]`` -> ``[..., H, L, D]`` (a view)."""
    return x.transpose(-3, -2)


def torch_prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: GroupLayout, softmax_scale: float,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shared-prefix attention in plain PyTorch.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]``, ``Hq % Hkv == 0``, validated by the caller.
        need_lse: also return the LSE (it is computed either way: the merge needs it).

    Returns ``(out [T, Hq, D] in q.dtype, lse [T, Hq] float32 (float64 for fp64 inputs) or
    None when not ``need_lse``)``. Half-precision inputs are computed in float32.
    """
    plan = layout.cached(("torch_backend_plan",), lambda: _plan(layout))
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = (_with_zero_row(x, compute) for x in (q, k, v))

    # One gather per tensor (its backward one scatter), cut into the buckets' [n, W] batches.
    bucket_sizes = [n * width for n, width in plan["bucket_shapes"]]
    gathered = [x[plan["self_index"]].split(bucket_sizes) for x in (qc, kc, vc)]
    outs, lses = [], []
    for i, (n, width) in enumerate(plan["bucket_shapes"]):
        out, lse = attention_with_lse(*(_heads_first(x[i].view(n, width, *x[i].shape[1:])) for x in gathered),
                                      True, softmax_scale)
        outs.append(_heads_first(out).reshape(-1, *q.shape[1:]))
        lses.append(lse.transpose(1, 2).reshape(-1, q.shape[1]))
    out = torch.cat(outs)[plan["row_of_token"]]
    lse = torch.cat(lses)[plan["row_of_token"]]
    if layout.num_completion_tokens == 0:
        return out.to(q.dtype), (lse if need_lse else None)

    # Split, not slices: the backward of B slices would write B zero-filled copies of x.
    pieces = [x.split(plan["pieces"]) for x in (qc, kc, vc)]
    cross_outs, cross_lses = [], []
    for group in range(layout.num_groups):
        queries, prompt_keys, prompt_values = pieces[0][2 * group + 1], pieces[1][2 * group], pieces[2][2 * group]
        if queries.shape[0]:
            cross_out, cross_lse = attention_with_lse(*(_heads_first(x)[None] for x in (queries, prompt_keys, prompt_values)),
                                                      False, softmax_scale)
            cross_outs.append(_heads_first(cross_out[0]))
            cross_lses.append(cross_lse[0].transpose(0, 1))
    # The groups' completion tokens, in packed order, are exactly completion_positions().
    positions = layout.completion_positions()
    cross_out, cross_lse = torch.cat(cross_outs), torch.cat(cross_lses)
    own_out, own_lse = out[positions], lse[positions]
    merged_lse = torch.logaddexp(cross_lse, own_lse)
    merged_out = (cross_out * torch.exp(cross_lse - merged_lse)[..., None]
                  + own_out * torch.exp(own_lse - merged_lse)[..., None])
    out = out.index_copy(0, positions, merged_out)
    lse = lse.index_copy(0, positions, merged_lse)
    return out.to(q.dtype), (lse if need_lse else None)
