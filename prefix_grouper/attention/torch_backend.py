"""Efficient pure-PyTorch shared-prefix attention on any prefix tree (differentiable, any device).

A token sees, causally, its own segment and every key of its ancestors' runs (a one-level
batch is the depth-1 tree: a completion's one ancestor is its prompt). Three exact parts
merged by log-sum-exp, each an attention call that returns its LSE:

1. every unit (a segment, or a chain of only children fused: see
   :mod:`~prefix_grouper.attention.torch_plan`) causal over itself, batched by length
   (short units padded to their ``ceil(log2(L))`` bucket's longest, longer ones by exact
   length), each batch cut into calls of about ``CALL_BYTES`` (equal-length runs batched as
   strided views, per sibling ordinal where that spaces them evenly); where the units tile
   the packed axis (nothing shared, equal rows) one call, whose results are the outputs;
2. every segment's run against all the queries that see the whole run: the tokens of its
   subtree after it, one contiguous packed range ``[end of the run, subtree_end)`` in the
   pre-order packing. So one dense, mask-free call per segment with descendants, on
   contiguous slices of the packed axis: a run's K/V is read once for all its descendants,
   never copied per descendant or padded (a one-level batch: one call per group, its
   completions against its prompt; groups of the same shape share a batched call, a view
   of the packed axis when they are evenly spaced). With a window, the only tokens that still see an
   ancestor are a segment's first ones, against the ancestor's last keys: one call per
   (ancestor keys, offset, query count), batching the segments that share them (a
   group's completions) with the keys' K/V broadcast, not copied;
3. the merge of (1) and (2) on every non-root token, one ancestor run at a time:
   ``lse = logaddexp(lse_1, lse_2)``, ``out = out_1 exp(lse_1 - lse) + out_2 exp(lse_2 - lse)``;
   attention sinks join the merge as one more term with no value:
   ``lse' = logaddexp(lse, sink)``, ``out' = out exp(lse - lse')``.

Every call returns its LSE and runs on an :class:`AttentionEngine` (:func:`engine_for`):
on CPU :data:`CPU_FLASH`, the fused flash kernel (tiled, never holding a score matrix);
elsewhere, or with a window or softcap (which the flash kernel cannot express),
:func:`chunked_engine`: explicit scores in query chunks of at most ``SCORE_BLOCK_BYTES``
(``CPU_SCORE_BLOCK_BYTES`` on CPU), recomputed in the backward, skipping the keys outside a
chunk's window. Both take GQA natively (K/V never repeated). The backward runs every part's kernel against the merged
out and lse: with ``P = exp(S - merged lse)`` each part's softmax gradient is its share of
the merged attention's exact gradient, so the merge has no backward of its own; a sink's
gradient is ``-sum_rows exp(sink - lse) (rowsum(dO * out) - grad_lse)``. Extra memory is
O(T) plus tiles.

Containment of NaN/inf: a masked key still enters its row's ``probs @ V`` product with a
zero probability, and ``0 * NaN = NaN``. So no call mixes segments that must not see each
other (a batch row of (1) is one segment; a call of (2) one run against its descendants),
and padded slots are filled (zeros; lse +inf) rather than holding neighbouring tokens. A non-finite
K/V of a token then reaches only the rows of its segment's subtree (a completion's: that
completion; a prompt's: its group), as in the unpacked sequences.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ..layout import GroupLayout
from .torch_plan import attention_plan, schedule
from .flash_merge import merge_pair_, merge_sinks, sink_gradient
from .torch_rows import accumulate, batch, packed, tiles, write

__all__ = ["CHUNKED", "CPU_FLASH", "CPU_SCORE_BLOCK_BYTES", "SCORE_BLOCK_BYTES", "AttentionEngine", "chunked_engine",
           "engine_for", "torch_prefix_attention"]

SCORE_BLOCK_BYTES = 64 * 2**20
"""Most bytes of scores a chunked engine holds at once off the CPU (one query chunk; its
backward holds the chunk's probabilities and their gradient, and the softcap's derivative)."""

CPU_SCORE_BLOCK_BYTES = 4 * 2**20
"""The same on CPU: chunks nearer the cache run a chunk's dozen elementwise passes faster
(the measurement: benchmarks/results/design_measurements.md)."""

MIN_WINDOW_QUERIES = 64
"""With a window, query chunks are ``max(window, MIN_WINDOW_QUERIES)`` long at most: each then
sees at most ``window - 1`` keys more than its own, and small windows are not cut into
tiny, slow chunks."""


class AttentionEngine(NamedTuple):
    """One attention kernel family; q ``[R, Hq, Lq, D]``, k/v ``[R, Hkv, Lk, D]``,
    ``Hq % Hkv == 0`` (GQA native: K/V never repeated). Query i sits at key position
    ``query_offset + i`` and sees key j iff ``j <= query_offset + i`` (and, for an engine
    with a window, ``j > query_offset + i - window``); every query sees at least one key.
    The calls here use ``query_offset`` 0 with ``Lq == Lk`` (causal), ``Lk`` (every key
    before every query) or, with a window only, ``Lk + gap`` (an ancestor's last keys
    against a descendant's first queries, ``gap`` positions of other ancestors between).

    ``forward(q, k, v, query_offset, scale) -> (out [R, Hq, Lq, D], lse [R, Hq, Lq])``.
    ``backward(grad_out, q, k, v, out, lse, grad_lse, query_offset, scale) -> (dq, dk, dv)``:
    the softmax gradient ``dS = P * (dO V^T - rowsum(dO * out) + grad_lse)`` with
    ``P = exp(S - lse)``, ``grad_lse`` None for zero. Given a merged ``out``/``lse`` of
    several calls (a row's attention over all its keys), it returns this call's share of
    the merged attention's exact gradient, so merges need no backward of their own.
    """

    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _cpu_flash_forward(q, k, v, query_offset, scale):
    causal = query_offset == 0  # else query_offset == Lk: every key visible
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _cpu_flash_backward(grad_out, q, k, v, out, lse, grad_lse, query_offset, scale):
    head_dim = q.shape[-1]
    if grad_lse is not None:
        # The kernel forms rowsum(grad_out * out) itself. One extra head-dim column holding
        # -grad_lse in grad_out and 1 in out adds grad_lse there; it is zero in q, k and v,
        # so the scores and dO V^T are unchanged.
        grad_out = torch.cat([grad_out, -grad_lse[..., None]], -1)
        out = F.pad(out, (0, 1), value=1.0)
        q, k, v = (F.pad(x, (0, 1)) for x in (q, k, v))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, query_offset == 0, scale=scale)
    return dq[..., :head_dim], dk[..., :head_dim], dv[..., :head_dim]


CPU_FLASH = AttentionEngine(_cpu_flash_forward, _cpu_flash_backward)
"""``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward (tiled, no score
matrix; no window or softcap)."""


def _chunks(q: torch.Tensor, k: torch.Tensor, query_offset: int, window: int | None):
    """``(rows, queries, keys, first_position)`` slices whose scores take at most
    ``SCORE_BLOCK_BYTES`` (``CPU_SCORE_BLOCK_BYTES`` on CPU; one query row of one batch row
    at least). ``keys`` holds only the keys the chunk's queries can see: a window skips the
    keys before it, and keys after the last query are never visible. ``first_position`` is
    the chunk's first query's position counted from ``keys.start``."""
    r, hq, lq, _ = q.shape
    lk = k.shape[2]
    budget = CPU_SCORE_BLOCK_BYTES if q.device.type == "cpu" else SCORE_BLOCK_BYTES
    max_queries = lq if window is None else max(window, MIN_WINDOW_QUERIES)
    span = lk if window is None else min(lk, max_queries + window - 1)  # the most keys one chunk sees
    query_bytes = hq * span * q.element_size()  # the scores of one query of one batch row
    rows_per_chunk = max(1, budget // (query_bytes * min(lq, max_queries)))
    for row in range(0, r, rows_per_chunk):
        rows = slice(row, min(r, row + rows_per_chunk))
        queries_per_chunk = min(max_queries, max(1, budget // (query_bytes * (rows.stop - row))))
        for start in range(0, lq, queries_per_chunk):
            stop = min(lq, start + queries_per_chunk)
            first_key = 0 if window is None else max(0, query_offset + start - window + 1)
            yield (rows, slice(start, stop), slice(first_key, min(lk, query_offset + stop)),
                   query_offset + start - first_key)


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[R, Hq, L, D]`` -> ``[R, Hkv, Hq / Hkv, L, D]``: a KV head's query heads on one dim."""
    return x.reshape(x.shape[0], kv_heads, -1, *x.shape[2:])


def _chunk_scores(q_chunk, k_chunk, first_position, scale, window, softcap, need_derivative=False):
    """Scores ``[R, Hkv, Hq / Hkv, C, K]`` of grouped queries against ``[R, Hkv, K, D]``:
    scaled, capped, masked (-inf); and ``d capped / d scaled``, ``1 - tanh^2``, when
    ``need_derivative`` and capped (else None)."""
    scores = (q_chunk * scale) @ k_chunk[:, :, None].transpose(-1, -2)
    derivative = None
    if softcap is not None:
        tanh = scores.div_(softcap).tanh_()
        if need_derivative:
            derivative = tanh.square().neg_().add_(1)
        scores = tanh.mul_(softcap)
    num_queries, num_keys = q_chunk.shape[3], k_chunk.shape[2]
    some_key_later = first_position < num_keys - 1
    some_key_outside_window = window is not None and first_position + num_queries - 1 - window >= 0
    if some_key_later or some_key_outside_window:
        device = q_chunk.device
        # key position minus query position, both counted from the chunk's first key
        offset = (torch.arange(num_keys, device=device)[None, :]
                  - torch.arange(first_position, first_position + num_queries, device=device)[:, None])
        visible = offset <= 0
        if window is not None:
            visible &= offset > -window
        scores = scores.masked_fill_(~visible, float("-inf"))
    return scores, derivative


def _chunked_forward(q, k, v, query_offset, scale, window=None, softcap=None):
    hkv = k.shape[1]
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:3])
    for rows, queries, keys, first_position in _chunks(q, k, query_offset, window):
        scores, _ = _chunk_scores(_grouped(q[rows, :, queries], hkv), k[rows, :, keys], first_position, scale,
                                  window, softcap)
        # The softmax in place, normalized after P V: two passes over the scores fewer than logsumexp.
        row_max = scores.amax(-1, keepdim=True)  # finite: every query sees a key
        denominator = scores.sub_(row_max).exp_().sum(-1, keepdim=True)
        chunk_out = (scores @ v[rows, :, keys][:, :, None]).div_(denominator)
        out[rows, :, queries] = chunk_out.flatten(1, 2)
        lse[rows, :, queries] = (row_max + denominator.log()).squeeze(-1).flatten(1, 2)
    return out, lse


def _chunked_backward(grad_out, q, k, v, out, lse, grad_lse, query_offset, scale, window=None, softcap=None):
    hkv = k.shape[1]
    delta = (grad_out * out).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rows, queries, keys, first_position in _chunks(q, k, query_offset, window):
        q_chunk, grad_chunk = (_grouped(x[rows, :, queries], hkv) for x in (q, grad_out))
        k_chunk, v_chunk = k[rows, :, keys], v[rows, :, keys]
        scores, derivative = _chunk_scores(q_chunk, k_chunk, first_position, scale, window, softcap,
                                           need_derivative=True)
        probs = scores.sub_(_grouped(lse[rows, :, queries], hkv)[..., None]).exp_()
        grad_scores = ((grad_chunk @ v_chunk[:, :, None].transpose(-1, -2))
                       .sub_(_grouped(delta[rows, :, queries], hkv)[..., None]).mul_(probs))
        if derivative is not None:
            grad_scores.mul_(derivative)  # back through the cap to the scaled scores
        dq[rows, :, queries] = (grad_scores @ k_chunk[:, :, None]).flatten(1, 2) * scale
        dk[rows, :, keys] += (grad_scores.transpose(-1, -2) @ q_chunk).sum(2) * scale
        dv[rows, :, keys] += (probs.transpose(-1, -2) @ grad_chunk).sum(2)
    return dq, dk, dv


def chunked_engine(window: int | None = None, softcap: float | None = None) -> AttentionEngine:
    """Plain torch ops on any device: explicit scores in query chunks of at most
    ``SCORE_BLOCK_BYTES``, recomputed in the backward; optionally a sliding ``window``
    (keys wholly outside a chunk's window are skipped, not only masked) and a ``softcap``."""
    return AttentionEngine(partial(_chunked_forward, window=window, softcap=softcap),
                           partial(_chunked_backward, window=window, softcap=softcap))


CHUNKED = chunked_engine()
"""The chunked engine without window or softcap."""


def engine_for(device: torch.device, window: int | None = None, softcap: float | None = None) -> AttentionEngine:
    """:data:`CPU_FLASH` on CPU, :data:`CHUNKED` elsewhere; :func:`chunked_engine` with a
    window or softcap, which the flash kernel cannot express."""
    if window is None and softcap is None:
        return CPU_FLASH if device.type == "cpu" else CHUNKED
    return chunked_engine(window, softcap)


class _PrefixAttention(torch.autograd.Function):
    """The three parts, their merge and the sinks; the backward runs every part's kernel
    against the merged out/lse, which is the merged attention's exact gradient. Every call
    reads its batch of packed runs (a view where the runs are regular) and writes its result
    straight into the packed outputs: no full-size copy, one batch alive at a time."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, plan: dict, scale: float, window: int | None, softcap: float | None):
        engine = engine_for(q.device, window=window, softcap=softcap)
        causal, cross = schedule(plan, window, q.shape[1] * q.shape[2] * q.element_size())
        if len(causal) == 1 and tiles(causal[0], q.shape[0]):
            # Nothing shared, equal rows: one call's results are the packed outputs (no copy).
            out, lse = map(packed, engine.forward(batch(q, causal[0]), batch(k, causal[0]), batch(v, causal[0]), 0,
                                                  scale))
        else:
            out, lse = torch.empty_like(q), q.new_empty(q.shape[:2])
            for rows in causal:  # every token in exactly one batch: out and lse written whole
                part_out, part_lse = engine.forward(batch(q, rows), batch(k, rows), batch(v, rows), 0, scale)
                write(out, rows, part_out)
                write(lse, rows, part_lse)
                del part_out, part_lse
        for queries, keys, query_offset in cross:
            cross_out, cross_lse = engine.forward(batch(q, queries), batch(k, keys), batch(v, keys), query_offset,
                                                  scale)
            row_out, row_lse = batch(out, queries), batch(lse, queries)  # views: merged in place
            merged_lse = merge_pair_(row_out, row_lse, cross_out, cross_lse)
            if queries.stride is None:  # gathered copies: back to the packed axis
                write(out, queries, row_out)
                write(lse, queries, merged_lse)
            else:
                row_lse.copy_(merged_lse)
            del cross_out, cross_lse, row_out, row_lse, merged_lse
        if sinks is not None:
            lse = merge_sinks(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.set_materialize_grads(False)
        ctx.plan, ctx.scale, ctx.window, ctx.softcap = plan, scale, window, softcap
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        scale = ctx.scale
        engine = engine_for(q.device, window=ctx.window, softcap=ctx.softcap)
        causal, cross = schedule(ctx.plan, ctx.window, q.shape[1] * q.shape[2] * q.element_size())
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out

        def call_backward(queries, keys, query_offset):
            # Padded query slots get lse = +inf: probability 0, so they add nothing to the real keys' gradients.
            return engine.backward(batch(grad_out, queries), batch(q, queries), batch(k, keys), batch(v, keys),
                                   batch(out, queries), batch(lse, queries, float("inf")),
                                   None if grad_lse is None else batch(grad_lse, queries), query_offset, scale)

        if len(causal) == 1 and tiles(causal[0], q.shape[0]):
            dq, dk, dv = map(packed, call_backward(causal[0], causal[0], 0))
        else:
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            for rows in causal:  # every token in exactly one batch: the gradients written whole
                for whole, grad in zip((dq, dk, dv), call_backward(rows, rows, 0)):
                    write(whole, rows, grad)
        for queries, keys, query_offset in cross:
            cross_dq, cross_dk, cross_dv = call_backward(queries, keys, query_offset)
            accumulate(dq, queries, cross_dq)
            accumulate(dk, keys, cross_dk)
            accumulate(dv, keys, cross_dv)
        grad_sinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            grad_sinks = sink_gradient(grad_out, out, lse, grad_lse, sinks)
        return dq, dk, dv, grad_sinks, None, None, None, None


def torch_prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: GroupLayout, softmax_scale: float, *,
    window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shared-prefix attention in plain PyTorch.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]``, ``Hq % Hkv == 0``; window, softcap, sinks
            as in :func:`prefix_attention`; all validated by the caller.
        need_lse: also return the LSE (it is computed either way: the merge needs it).

    Returns ``(out [T, Hq, D] in q.dtype, lse [T, Hq] float32 (float64 for fp64 inputs) or
    None when not ``need_lse``)``. Half-precision inputs (and sinks) are computed in float32.
    """
    plan = layout.cached(("torch_plan",), lambda: attention_plan(layout))
    if window is not None and window >= plan["longest_row"]:
        window = None  # every row already sees all its causal keys: the flash kernel may run
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    # The calls read strided views of the packed axis; torch 2.11's CPU flash kernel reads a
    # last dim of stride != 1 wrongly (measured: O(1) errors), so that dim is made contiguous.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out, lse = _PrefixAttention.apply(q.to(compute), k.to(compute), v.to(compute),
                                      None if sinks is None else sinks.to(compute), plan, softmax_scale,
                                      window, softcap)
    return out.to(q.dtype), (lse if need_lse else None)
