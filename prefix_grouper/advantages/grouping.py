"""Compact arbitrary integer ids into contiguous segments, once, with torch.

Every backend normalizes values within groups named by arbitrary int64 ids (unsorted,
non-consecutive, negative, huge). This module turns such ids into what the kernels read:
a permutation that lists the rows of group 0, then group 1, ... and the segment offsets.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["Segments"]


class Segments:
    """Rows grouped by id.

    Attributes (all on the ids' device):
        perm: ``[N]`` int64, the rows of segment 0, then segment 1, ... each in their original
            order (stable sort of the ids), or ``None`` when the ids are already sorted, so the
            rows already are in that order.
        offsets: ``[G+1]`` int64, segment ``g`` holds sorted positions ``offsets[g]..offsets[g+1]``.
        num_groups: ``G``, the number of distinct ids.
        ids: ``[N]`` int64, the segment of every row in original order, in ``[0, G)``, numbered by
            increasing original id (computed on first use).
    """

    def __init__(self, group_index: torch.Tensor) -> None:
        ids = group_index.long()
        n = ids.numel()
        # Already sorted ids (the usual case: a prompt's completions are adjacent) skip the sort.
        is_sorted = n < 2 or not bool((ids[1:] < ids[:-1]).any())
        if is_sorted:
            self.perm = None
            sorted_ids = ids
        else:
            sorted_ids, self.perm = torch.sort(ids, stable=True)
        self._starts = torch.ones(n, dtype=torch.bool, device=ids.device)
        self._starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
        first = torch.nonzero(self._starts).flatten()
        self.num_groups = first.numel()
        self.offsets = torch.cat([first, first.new_tensor([n])])

    @functools.cached_property
    def ids(self) -> torch.Tensor:
        segment_of_sorted = torch.cumsum(self._starts, 0) - 1
        if self.perm is None:
            return segment_of_sorted
        return torch.empty_like(segment_of_sorted).scatter_(0, self.perm, segment_of_sorted)

    @functools.cached_property
    def counts(self) -> torch.Tensor:
        """``[G]`` int64 rows per segment."""
        return self.offsets[1:] - self.offsets[:-1]

    def first_rows(self) -> torch.Tensor:
        """``[G]`` int64 original row of the first member of every segment."""
        starts = self.offsets[:-1]
        return starts if self.perm is None else self.perm.index_select(0, starts)
