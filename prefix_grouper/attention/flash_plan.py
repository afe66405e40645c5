"""The varlen calls of ``backend="flash"``, read from a layout's segmentation (host ints, built
once per layout and window, cached on the layout; no device sync).

Shared-prefix attention is a sum over key runs: a segment's queries see their own run
causally and every ancestor's run in full. So:

- **self**: one causal varlen call, an entry per non-empty segment (every packed row).
- **depth d** (no window): one non-causal call per tree depth with an entry per depth-d
  segment that has descendants: its run as keys, its whole subtree after it (one packed
  range in pre-order) as queries. Subtrees of one depth are disjoint and in packed order, so
  the entries' query and key ranges both increase: the run is read once for every query
  under it, straight from the packed K/V (views, no copy). The varlen format delimits entry
  ``b`` by ``cu_seq[b]..cu_seq[b+1]`` on both sides (FlashAttention's backward takes no
  ``seqused_k``), so the rows and keys between two entries become filler entries: queries
  with no keys (``out 0``; their LSE is masked to ``-inf`` before the merge, ``empty_rows``)
  and keys with no queries (zero gradients).
- **window** (``window`` set and shorter than the longest row): only a segment's first
  ``window - 1 - gap`` tokens see an ancestor's last keys (``gap``: the ancestors' tokens in
  between). With bottom-right alignment such an entry (``Lq`` queries, the ancestor's tail
  as keys) is exact with ``window_left = window - 1 - gap - Lq`` and no right bound, so the
  entries are grouped by ``window_left``; siblings read the same tail, and an entry's keys
  may not overlap another's, so each group is split into calls of non-overlapping key
  ranges. Their queries are few and scattered: they are gathered (``rows`` is an index).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..layout import GroupLayout

__all__ = ["FlashPlan", "VarlenCall", "flash_plan"]


class VarlenCall(NamedTuple):
    """One varlen call: ``q[rows]`` against ``k[keys]``, ``v[keys]`` (``keys`` always a slice: a
    view of the packed K/V).

    rows: a packed slice, or (window calls) an int64 index of the gathered query rows.
    cu_seq_q, cu_seq_k: int32 ``[B+1]`` offsets into ``q[rows]`` and ``k[keys]``.
    host_cu_seq_q, host_cu_seq_k: the same as tuples of ints.
    empty_rows: bool ``[rows]`` marking filler rows (no keys), or None.
    """
    rows: slice | torch.Tensor
    keys: slice
    cu_seq_q: torch.Tensor
    cu_seq_k: torch.Tensor
    host_cu_seq_q: tuple
    host_cu_seq_k: tuple
    max_q: int
    max_k: int
    causal: bool
    window_left: int
    window_right: int
    empty_rows: torch.Tensor | None


class FlashPlan(NamedTuple):
    """The calls of a layout: ``self_call`` and the range ``calls`` (depth calls; none with a
    window) whose rows are slices, and ``window_calls`` whose rows are gathered."""
    self_call: VarlenCall
    calls: tuple
    window_calls: tuple


def _offsets(lengths):
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return tuple(offsets)


def _call(device, rows, keys, entries, causal=False, window_left=-1, window_right=-1, empty=None):
    """A :class:`VarlenCall` from ``entries`` = ``[(Lq, Lk), ...]`` and the filler rows ``empty``."""
    cu_q, cu_k = _offsets(q for q, _ in entries), _offsets(k for _, k in entries)
    empty_rows = None
    if empty:
        empty_rows = torch.zeros(cu_q[-1], dtype=torch.bool, device=device)
        for start, stop in empty:
            empty_rows[start:stop] = True
    as_tensor = (lambda offsets: torch.tensor(offsets, dtype=torch.int32, device=device))
    return VarlenCall(rows, keys, as_tensor(cu_q), as_tensor(cu_k), cu_q, cu_k,
                      max((q for q, _ in entries), default=0), max((k for _, k in entries), default=0),
                      causal, window_left, window_right, empty_rows)


def _depth_calls(layout: GroupLayout) -> list[VarlenCall]:
    segmentation = layout.segmentation
    depth, by_depth = [], {}
    for index, (start, length, parent) in enumerate(segmentation.segments):
        depth.append(0 if parent < 0 else depth[parent] + 1)
        if length and segmentation.subtree_end(index) > start + length:
            by_depth.setdefault(depth[-1], []).append(index)
    calls = []
    for _, members in sorted(by_depth.items()):
        first = segmentation.segments[members[0]]
        row_cursor = row_start = first.start + first.length
        key_cursor = key_start = first.start
        entries, empty = [], []
        for index in members:
            start, length, _ = segmentation.segments[index]
            run_stop, subtree_stop = start + length, segmentation.subtree_end(index)
            if run_stop > row_cursor:  # rows between two subtrees: queries without keys
                empty.append((row_cursor - row_start, run_stop - row_start))
                entries.append((run_stop - row_cursor, 0))
            if start > key_cursor:  # keys between two runs: keys without queries
                entries.append((0, start - key_cursor))
            entries.append((subtree_stop - run_stop, length))
            row_cursor, key_cursor = subtree_stop, run_stop
        calls.append(_call(layout.device, slice(row_start, row_cursor), slice(key_start, key_cursor), entries,
                           empty=empty))
    return calls


def _window_calls(layout: GroupLayout, window: int) -> list[VarlenCall]:
    segmentation = layout.segmentation
    groups: dict[int, list[tuple[int, int, int, int]]] = {}  # window_left -> (key start, key stop, row start, Lq)
    for index in segmentation.nonempty():
        start, length, parent = segmentation.segments[index]
        if parent < 0:
            continue
        position = segmentation.first_positions[index]
        run_end_position = 0
        for run_start, run_length in segmentation.key_runs(index)[:-1]:
            run_end_position += run_length
            reach = window - 1 - (position - run_end_position)  # keys seen at the run's end
            queries = min(length, reach)
            if run_length and queries > 0:
                key_start = max(run_start, run_start + run_length - reach)
                groups.setdefault(reach - queries, []).append((key_start, run_start + run_length, start, queries))
    calls = []
    for window_left, members in sorted(groups.items()):
        # Each lane: entries with increasing, disjoint keys, and at most one entry per segment
        # (the merge updates a call's rows at once, so a row may appear once per call).
        lanes: list[list[tuple[int, int, int, int]]] = []
        for member in sorted(members):
            lane = next((lane for lane in lanes
                         if lane[-1][1] <= member[0] and all(entry[2] != member[2] for entry in lane)), None)
            if lane is None:
                lanes.append([member])
            else:
                lane.append(member)
        for lane in lanes:
            entries, rows, key_cursor = [], [], lane[0][0]
            for key_start, key_stop, row_start, queries in lane:
                if key_start > key_cursor:
                    entries.append((0, key_start - key_cursor))
                entries.append((queries, key_stop - key_start))
                rows.extend(range(row_start, row_start + queries))
                key_cursor = key_stop
            index = torch.tensor(rows, dtype=torch.long, device=layout.device)
            calls.append(_call(layout.device, index, slice(lane[0][0], key_cursor), entries,
                               window_left=window_left, window_right=-1))
    return calls


def flash_plan(layout: GroupLayout, window: int | None) -> FlashPlan:
    """The calls of ``layout`` (``window`` None, or shorter than the longest row), cached per window."""
    def build() -> FlashPlan:
        segmentation = layout.segmentation
        lengths = [segmentation.segments[index].length for index in segmentation.nonempty()]
        whole = slice(0, layout.total_tokens)
        self_call = _call(layout.device, whole, whole, [(n, n) for n in lengths], causal=True,
                          window_left=-1 if window is None else window - 1, window_right=-1 if window is None else 0)
        if window is None:
            return FlashPlan(self_call, tuple(_depth_calls(layout)), ())
        return FlashPlan(self_call, (), tuple(_window_calls(layout, window)))
    return layout.cached(("flash_plan", window), build)
