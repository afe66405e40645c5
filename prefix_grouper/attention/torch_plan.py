"""The torch backend's plan of a layout: the attention calls of its parts (see
:mod:`prefix_grouper.attention.torch_backend`), read from the layout's segmentation (host
ints, built once per layout, no device sync), as batches of packed runs
(:mod:`prefix_grouper.attention.torch_rows`): part (1), every unit causal over itself, in
length buckets; part (2), every run against the queries of its subtree that see it.

A unit is a chain of segments each of which is its parent's only non-empty child, packed
right after it (a G=1 group's prompt and completion; a tree's unbranched chains): its
queries see the chain's earlier runs whole and their own causally, which is one causal call
over the chain. Fusing them removes a cross call and a merge per chain exactly, and makes a
layout with nothing shared run as the unpacked rows do, one causal call per sequence.
With a window, the window calls and buckets are those of the segments themselves.

Where the units are equally long and tile the packed axis (nothing shared, equal rows), part
(1) is one call over all of them: its results are then the packed outputs and gradients
themselves, with no copy into buffers of the backend's own (see :func:`schedule`).
"""
from __future__ import annotations

from itertools import groupby

import torch

from ..layout import GroupLayout
from ..layout.segmentation import Segment, Segmentation
from .torch_rows import Rows, broadcast_rows, evenly_spaced, rows_of, tiles

EXACT_LENGTHS_FROM = 64
"""Segments of at least this many tokens are batched with equal lengths only (no padding)."""

CALL_BYTES = 2**20
"""Most bytes of one of q/k/v a call reads when its results are copied into the packed
outputs: larger calls measured slower there (benchmarks/results/torch_backend_calls_cpu.md).
A call whose results are the packed outputs themselves is not cut: it has nothing to copy."""

__all__ = ["attention_plan", "cross_calls", "fused_chains", "schedule"]

Call = tuple[Rows, Rows, int]
"""``(queries, keys, query_offset)`` of one batched attention call."""


def fused_chains(segmentation: Segmentation) -> Segmentation:
    """The non-empty segments with every only child packed right after its parent fused into
    the parent's unit (its key runs then the unit's prefix plus its own, positions continuing)."""
    units: list[Segment] = []
    unit_of: dict[int, int] = {}  # non-empty segment -> its unit
    for index in segmentation.nonempty():
        start, length, parent = segmentation.segments[index]
        while parent >= 0 and not segmentation.segments[parent].length:
            parent = segmentation.segments[parent].parent  # empty ancestors own no keys
        if parent >= 0:
            tail = units[unit_of[parent]]
            parent_end = segmentation.segments[parent].start + segmentation.segments[parent].length
            # The parent ends its unit, this segment follows it, and the parent's subtree holds no other tokens.
            if tail.start + tail.length == parent_end == start and \
                    segmentation.subtree_end(index) == segmentation.subtree_end(parent):
                units[unit_of[parent]] = Segment(tail.start, tail.length + length, tail.parent)
                unit_of[index] = unit_of[parent]
                continue
        unit_of[index] = len(units)
        units.append(Segment(start, length, -1 if parent < 0 else unit_of[parent]))
    return Segmentation(units)  # empty segments own no tokens: the units continue the packed axis


def _segment_plan(segmentation: Segmentation, device: torch.device) -> dict:
    """Length buckets of the causal part, each member ``(start, length, ordinal among its
    siblings)``; the (descendant queries, run) slices of the dense part, per segment with
    descendants; the (segment, ancestor run, gap) triples of windows."""
    segments, cross, ancestor_pairs = [], [], []
    children: dict[int, int] = {}  # parent -> its non-empty children so far
    for index in segmentation.nonempty():
        start, length, parent = segmentation.segments[index]
        ordinal = children.get(parent, 0) if parent >= 0 else 0
        children[parent] = ordinal + 1
        segments.append((start, length, ordinal))
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
        # Short segments share a call padded to their bucket's longest (padding at most
        # doubles one, and a call costs more than its work there); longer ones share a call
        # only with their exact length: padding costs quadratic work, a call per length little.
        length = segment[1]
        return (0, (length - 1).bit_length()) if length < EXACT_LENGTHS_FROM else (1, length)

    causal = [list(members) for _, members in groupby(sorted(segments, key=bucket), key=bucket)]
    return {"causal": causal, "cross": cross, "ancestor_pairs": ancestor_pairs}


def attention_plan(layout: GroupLayout) -> dict:
    """The plan of ``layout``: its fused units' parts (``causal``, ``cross``), the segments'
    own parts for windows (built on first use), the device and the longest row."""
    fused = _segment_plan(fused_chains(layout.segmentation), layout.device)
    return {**fused, "segmentation": layout.segmentation, "device": layout.device,
            "longest_row": layout.segmentation.longest_row}


def _windowed(plan: dict) -> dict:
    if "windowed" not in plan:
        plan["windowed"] = _segment_plan(plan["segmentation"], plan["device"])
    return plan["windowed"]


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
        for segment, ancestor, gap in _windowed(plan)["ancestor_pairs"]:
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
                queries = (torch.tensor(starts, dtype=torch.long, device=plan["device"])[:, None]
                           + torch.arange(seeing, device=plan["device"]))
            calls.append((queries, slice(first_key, last_key), query_offset))
        memo[window] = calls
    return memo[window]


def _calls(members: list[tuple[int, int, int]], token_bytes: int, device: torch.device) -> list[Rows]:
    """A bucket's runs as calls of at most :data:`CALL_BYTES` per tensor (one run at least),
    cut either in packed order or per ordinal (the i-th children of equal groups are evenly
    spaced where siblings are not): whichever gathers fewer calls, then makes fewer."""
    per_call = max(1, CALL_BYTES // (max(length for _, length, _ in members) * token_bytes))

    def cut(runs):
        return [runs[first:first + per_call] for first in range(0, len(runs), per_call)]

    in_order = cut(sorted(members))
    per_ordinal = [call for _, same in groupby(sorted(members, key=lambda m: (m[2], m[0])), key=lambda m: m[2])
                   for call in cut(list(same))]

    def cost(calls):
        return sum(not evenly_spaced([m[0] for m in call], [m[1] for m in call]) for call in calls), len(calls)

    return [rows_of([m[0] for m in call], [m[1] for m in call], device)
            for call in min(in_order, per_ordinal, key=cost)]


def schedule(plan: dict, window: int | None, token_bytes: int) -> tuple[list[Rows], list[Call]]:
    """``(causal batches, cross calls)`` the backend runs for tokens of ``token_bytes`` (one
    token's q): without a window, the fused units, part (2) batching the runs of one shape
    (``Lq``, ``Lk``); with a window, the segments' buckets and :func:`cross_calls`' window
    calls; every batch cut into calls of about :data:`CALL_BYTES`, except one that tiles the
    packed axis (its results are the outputs). Memoized per window and size."""
    memo = plan.setdefault("schedules", {})
    if (window, token_bytes) in memo:
        return memo[window, token_bytes]
    device = plan["device"]
    causal_groups = plan["causal"] if window is None else _windowed(plan)["causal"]
    if window is None and not plan["cross"] and len(causal_groups) == 1:
        # Nothing shared: where the units are equally long and tile the packed axis (a G=1
        # batch of equal rows), one uncut call's results are the packed outputs themselves.
        starts, lengths, _ = map(list, zip(*causal_groups[0]))
        if evenly_spaced(starts, lengths) and tiles(whole := rows_of(starts, lengths, device),
                                                    plan["segmentation"].total_tokens):
            memo[window, token_bytes] = [whole], []
            return memo[window, token_bytes]
    causal = [rows for members in causal_groups for rows in _calls(members, token_bytes, device)]
    # (query starts, Lq, key starts (None: one run broadcast), key run, query offset) of each batch of part (2)
    groups: list[tuple[list[int], int, list[int] | None, slice, int]] = []
    if window is None:
        shapes: dict[tuple[int, int], list[tuple[slice, slice]]] = {}
        for queries, run in plan["cross"]:
            shapes.setdefault((queries.stop - queries.start, run.stop - run.start), []).append((queries, run))
        # Disjoint: two runs with queries of one length are never ancestor and descendant.
        for (num_queries, num_keys), members in shapes.items():
            groups.append(([q.start for q, _ in members], num_queries, [r.start for _, r in members],
                           members[0][1], num_keys))
    else:
        for queries, keys, query_offset in cross_calls(plan, window):
            starts = [queries.start] if isinstance(queries, slice) else queries[:, 0].tolist()
            width = (queries.stop - queries.start) if isinstance(queries, slice) else queries.shape[1]
            groups.append((starts, width, None, keys, query_offset))
    calls: list[Call] = []
    for query_starts, num_queries, key_starts, keys, query_offset in groups:
        num_keys = keys.stop - keys.start
        per_call = max(1, CALL_BYTES // ((num_queries + num_keys) * token_bytes))
        for first in range(0, len(query_starts), per_call):
            chunk = query_starts[first:first + per_call]
            key_rows = (broadcast_rows(keys.start, num_keys, len(chunk)) if key_starts is None
                        else rows_of(key_starts[first:first + per_call], [num_keys] * len(chunk), device))
            calls.append((rows_of(chunk, [num_queries] * len(chunk), device), key_rows, query_offset))
    memo[window, token_bytes] = causal, calls
    return memo[window, token_bytes]
