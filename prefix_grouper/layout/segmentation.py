"""Which packed tokens form which segment, and which keys each segment's queries see.

The one owner of a layout's segmentation: the layout's index tensors and every attention
backend read it rather than walking the lengths themselves. Host-side Python ints, built
once per layout (memoized with its ``host_segments``).

A segment is a run of packed tokens: a prefix (a root, ``parent == -1``) or a completion
(``parent`` = the index of its group's prefix segment). Its queries see, causally, the keys
of its ancestors' runs, then its own. Prefix trees generalize this unchanged: a segment's
parent may itself have a parent, and its key runs are its ancestors' runs then its own
(a prefix tree, packed in pre-order so that every subtree is one packed range).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .host import cached_per_layout, decode_host_segments

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

    Segments are listed in packed order, the pre-order of a forest: every segment follows
    its parent, and a segment's whole subtree is one packed range ``[start, subtree_end)``
    (a group, a root's subtree, is ``[start of root, start of next root)``). ``groups`` holds
    the segment indices of every root's subtree; ``first_positions[s]`` is the position of
    segment ``s``'s first token in its sequences (its ancestors' lengths summed).
    With the flat layout, segment ``s`` is the ``s``-th entry of ``GroupLayout.cu_seqlens``:
    each group's prefix, then its completions, empty ones included (length 0).
    """

    __slots__ = ("segments", "groups", "total_tokens", "longest_row", "first_positions", "_key_runs",
                 "_subtree_ends")

    def __init__(self, segments: Sequence[Segment]) -> None:
        self.segments: tuple[Segment, ...] = tuple(Segment(*s) for s in segments)
        key_runs: list[tuple[KeyRun, ...]] = []
        group_starts, end = [], 0
        first_positions: list[int] = []
        subtree_ends = [0] * len(self.segments)
        open_path: list[int] = []  # the segments whose subtrees are still open, root first
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
            while open_path and open_path[-1] != parent:
                subtree_ends[open_path.pop()] = start
            if parent != -1 and not open_path:
                raise ValueError(f"segment {index} has parent {parent}, whose subtree ended before it: "
                                 f"segments must be in pre-order (a subtree is one packed range)")
            open_path.append(index)
            own = (start, length)
            key_runs.append((own,) if parent == -1 else key_runs[parent] + (own,))
            first_positions.append(0 if parent == -1 else first_positions[parent] + self.segments[parent].length)
            end = start + length
        for index in open_path:
            subtree_ends[index] = end
        self._key_runs = tuple(key_runs)
        self._subtree_ends = tuple(subtree_ends)
        self.first_positions: tuple[int, ...] = tuple(first_positions)
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

    def subtree_end(self, segment: int) -> int:
        """Packed end of segment ``segment``'s subtree: its descendants are the segments
        packed in ``[start, subtree_end)``. The queries that see its keys are its own
        later tokens (causal) and every token of that range after its own run."""
        return self._subtree_ends[segment]

    def nonempty(self) -> list[int]:
        """Indices of the segments that own tokens (an empty completion owns none)."""
        return [index for index, segment in enumerate(self.segments) if segment.length]

    def __len__(self) -> int:
        return len(self.segments)

    def __repr__(self) -> str:
        return f"Segmentation(segments={len(self.segments)}, groups={len(self.groups)}, tokens={self.total_tokens})"


def segmentation_of(host: torch.Tensor) -> Segmentation:
    """The :class:`Segmentation` of the layout whose ``host_segments`` this is, built once
    per tensor (a flat layout's ``host_lengths`` shares that cache, so it answers too)."""
    return cached_per_layout(host, ("segmentation",), lambda: Segmentation(decode_host_segments(host)))
