"""Which packed tokens form which segment, and which keys each segment's queries see.

The one owner of a layout's segmentation: the layout's index tensors and every attention
backend read it rather than walking the lengths themselves. Host-side Python ints, built
once per layout (memoized with its ``host_lengths``).

A segment is a run of packed tokens: a prefix (a root, ``parent == -1``) or a completion
(``parent`` = the index of its group's prefix segment). Its queries see, causally, the keys
of its ancestors' runs, then its own. Prefix trees generalize this unchanged: a segment's
parent may itself have a parent, and its key runs are its ancestors' runs then its own.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .host import cached_per_layout, decode_host_lengths, split_by_group

__all__ = ["KeyRun", "Segment", "Segmentation", "segmentation_of"]


class Segment(NamedTuple):
    """``length`` packed tokens from ``start``; ``parent`` is the index of the segment whose
    keys this one extends, ``-1`` for a root (a prefix)."""
    start: int
    length: int
    parent: int


KeyRun = tuple[int, int]
"""``(start, length)``: a run of consecutive packed keys."""


class Segmentation:
    """The segments of a packed batch in packed order, and what each one's queries see.

    Segments are listed in packed order, a root before its descendants, which follow it
    up to the next root (the group's tokens are ``[start of root, start of next root)``).
    With the flat layout, segment ``s`` is the ``s``-th entry of ``GroupLayout.cu_seqlens``:
    each group's prefix, then its completions, empty ones included (length 0).
    """

    __slots__ = ("segments", "groups", "total_tokens", "longest_row", "_key_runs")

    def __init__(self, segments: Sequence[Segment]) -> None:
        self.segments: tuple[Segment, ...] = tuple(Segment(*s) for s in segments)
        key_runs: list[tuple[KeyRun, ...]] = []
        group_starts, end = [], 0
        for index, (start, length, parent) in enumerate(self.segments):
            if start != end:
                raise ValueError(f"segment {index} = {self.segments[index]} does not continue the packed axis at {end}")
            if length < 0:
                raise ValueError(f"segment {index} has length {length}: lengths must be >= 0")
            if not -1 <= parent < index:
                raise ValueError(f"segment {index} has parent {parent}: a parent is an earlier segment, or -1")
            if parent == -1:
                group_starts.append(index)
            elif parent < group_starts[-1]:
                raise ValueError(f"segment {index} has parent {parent}, before its group's root {group_starts[-1]}: "
                                 f"a group's segments follow its root")
            own = (start, length)
            key_runs.append((own,) if parent == -1 else key_runs[parent] + (own,))
            end = start + length
        self._key_runs = tuple(key_runs)
        # Segment indices of each group (a root and its descendants), in packed order.
        self.groups: tuple[range, ...] = tuple(
            range(first, stop) for first, stop in zip(group_starts, group_starts[1:] + [len(self.segments)]))
        self.total_tokens = end
        # Tokens of the longest unpacked row (e.g. prompt + completion): the most keys a query sees.
        self.longest_row = max((sum(length for _, length in runs) for runs in key_runs), default=0)

    @classmethod
    def from_lengths(cls, prefix_lens: Sequence[int],
                     suffix_lens_per_group: Sequence[Sequence[int]]) -> "Segmentation":
        """Each group's prefix, then its completions, group after group."""
        segments, start = [], 0
        for prefix_len, suffix_lens in zip(prefix_lens, suffix_lens_per_group):
            root = len(segments)
            segments.append(Segment(start, prefix_len, -1))
            start += prefix_len
            for suffix_len in suffix_lens:
                segments.append(Segment(start, suffix_len, root))
                start += suffix_len
        return cls(segments)

    def key_runs(self, segment: int) -> tuple[KeyRun, ...]:
        """``(start, length)`` runs of the packed keys segment ``segment``'s queries see, in
        order: its ancestors' runs (a completion: its prefix), then its own (causal)."""
        return self._key_runs[segment]

    def nonempty(self) -> list[int]:
        """Indices of the segments that own tokens (an empty completion owns none)."""
        return [index for index, segment in enumerate(self.segments) if segment.length]

    def __len__(self) -> int:
        return len(self.segments)

    def __repr__(self) -> str:
        return f"Segmentation(segments={len(self.segments)}, groups={len(self.groups)}, tokens={self.total_tokens})"


def segmentation_of(host_lengths: torch.Tensor) -> Segmentation:
    """The :class:`Segmentation` of the layout whose ``host_lengths`` this is, built once."""
    def build() -> Segmentation:
        prefix_lens, group_sizes, suffix_lens = decode_host_lengths(host_lengths)
        return Segmentation.from_lengths(prefix_lens, split_by_group(suffix_lens, group_sizes))
    return cached_per_layout(host_lengths, ("segmentation",), build)
