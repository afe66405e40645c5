"""The torch backend's plan of a layout: the attention calls of its parts (see
:mod:`prefix_grouper.attention.torch_backend`), read from the layout's segmentation (host
ints, built once per layout, no device sync), and the packed <-> batched views of them:
part (1), every segment causal over itself, in length buckets; part (2), every run against
the queries of its subtree that see it.
"""
from __future__ import annotations

from itertools import groupby

import torch

from ..layout import GroupLayout

__all__ = ["attention_plan", "cross_calls", "from_buckets", "heads_first", "key_batch", "packed_rows", "query_batch",
           "to_buckets"]


def attention_plan(layout: GroupLayout) -> dict:
    """Length buckets of the causal part; the (descendant queries, run) slices of the dense part, per segment with
    descendants, and per (segment, ancestor run) pair for windows; where every packed token's causal-part row lies,
    and the longest row; all read from the layout's segmentation (host ints, no device sync)."""
    segmentation = layout.segmentation
    segments, cross, ancestor_pairs = [], [], []  # (packed start, length) of non-empty segments; slices
    for index in segmentation.nonempty():
        start, length, parent = segmentation.segments[index]
        segments.append((start, length))
        run = slice(start, start + length)
        # Pre-order packing: every token after the run up to the subtree's end descends from it.
        descendants = slice(run.stop, segmentation.subtree_end(index))
        if descendants.stop > descendants.start:
            cross.append((descendants, run))
        if parent < 0:
            continue
        # Key runs of the path, root first, then this segment's own; positions continue along it.
        first_position, run_end_position = segmentation.first_positions[index], 0
        for run_start, run_length in segmentation.key_runs(index)[:-1]:
            run_end_position += run_length
            if run_length:
                ancestor = slice(run_start, run_start + run_length)
                ancestor_pairs.append((run, ancestor, first_position - run_end_position))

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
    return {"self_index": self_index, "bucket_shapes": shapes, "row_of_token": row_of_token, "cross": cross,
            "ancestor_pairs": ancestor_pairs, "longest_row": segmentation.longest_row}


def cross_calls(plan: dict, window: int | None) -> list[tuple[slice | torch.Tensor, slice, int]]:
    """``(queries, keys, query_offset)`` of part (2): descendant tokens against the ancestor keys they see.

    ``queries`` is a packed slice, or with a window a ``[R, Lq]`` index of R segments'
    first tokens that meet the same ancestor keys at the same offset (a batched call: the
    keys' K/V is broadcast, not copied; each segment holds at most one row of a call).
    Memoized in the plan per window.
    """
    if window is None:
        return [(queries, run, run.stop - run.start) for queries, run in plan["cross"]]
    memo = plan.setdefault("window_calls", {})
    if window not in memo:
        batches: dict[tuple[int, int, int, int], list[int]] = {}  # (keys start, stop, offset, Lq) -> first queries
        for segment, ancestor, gap in plan["ancestor_pairs"]:
            # The segment's token a sits gap + a positions after the ancestor's last key's next
            # position (gap: the tokens of the ancestors in between) and sees an ancestor key
            # iff it lies within window - 1 positions before it: only a < window - 1 - gap
            # sees any, and only the ancestor's last window - 1 - gap keys.
            reach = window - 1 - gap
            seeing = min(segment.stop - segment.start, reach)
            if seeing > 0:
                first_key = max(ancestor.start, ancestor.stop - reach)
                key = (first_key, ancestor.stop, ancestor.stop - first_key + gap, seeing)
                batches.setdefault(key, []).append(segment.start)
        calls = []
        for (first_key, last_key, query_offset, seeing), starts in batches.items():
            if len(starts) == 1:
                queries = slice(starts[0], starts[0] + seeing)
            else:
                queries = (torch.tensor(starts, dtype=torch.long, device=plan["row_of_token"].device)[:, None]
                           + torch.arange(seeing, device=plan["row_of_token"].device))
            calls.append((queries, slice(first_key, last_key), query_offset))
        memo[window] = calls
    return memo[window]


def query_batch(x: torch.Tensor, queries: slice | torch.Tensor) -> torch.Tensor:
    """Packed ``x [T, H, ...]`` at a call's queries as ``[R, H, Lq, ...]``."""
    rows = x[queries]
    return (rows[None] if isinstance(queries, slice) else rows).transpose(1, 2)


def packed_rows(batch: torch.Tensor, queries: slice | torch.Tensor) -> tuple[slice | torch.Tensor, torch.Tensor]:
    """Inverse of :func:`query_batch`: ``(packed index, [R * Lq, H, ...] values)``."""
    values = batch.transpose(1, 2).flatten(0, 1)
    return (queries if isinstance(queries, slice) else queries.flatten()), values


def key_batch(x: torch.Tensor, keys: slice, batch: int) -> torch.Tensor:
    """Packed ``x [T, H, D]`` at a call's keys as ``[R, H, Lk, D]``, broadcast over the R rows (a view)."""
    return heads_first(x[keys])[None].expand(batch, -1, -1, -1)


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """``[L, H, D]`` <-> ``[H, L, D]`` (a view)."""
    return x.transpose(-3, -2)


def to_buckets(x: torch.Tensor, plan: dict, padding: float) -> list[torch.Tensor]:
    """Packed ``x [T, H, ...]`` as the causal part's batches ``[n, H, W, ...]``, ``padding``
    on the padded slots (an appended row: a clamped neighbour's NaN would reach the padded
    slots' gradients through their zero probabilities)."""
    padded = torch.cat([x, x.new_full((1, *x.shape[1:]), padding)])[plan["self_index"]]
    sizes = [n * width for n, width in plan["bucket_shapes"]]
    return [chunk.view(n, width, *x.shape[1:]).transpose(1, 2)
            for chunk, (n, width) in zip(padded.split(sizes), plan["bucket_shapes"])]


def from_buckets(chunks: list[torch.Tensor], plan: dict) -> torch.Tensor:
    """Inverse of :func:`to_buckets`: ``[n, H, W, ...]`` batches back to packed ``[T, H, ...]``."""
    return torch.cat([chunk.transpose(1, 2).flatten(0, 1) for chunk in chunks])[plan["row_of_token"]]
