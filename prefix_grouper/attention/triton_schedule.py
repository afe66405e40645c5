"""Tile schedules of the Triton kernels, built on the host from a layout's lengths.

* :func:`query_tile_rows`: the forward and dQ programs' query tiles
  (:class:`~.triton_common.QueryTile`); a window needs no other tiles, the kernels skip the
  key blocks it hides.
* :func:`key_tile_rows`: the dK/dV programs (:class:`~.triton_common.KeyTile`), a key tile
  against one chunk of the queries that see it, and the split key tiles
  (:class:`~.triton_common.SplitKeyTile`) whose partials the reduction kernel sums. Without
  a window the queries that see a key tile form one packed range; with one, only the
  queries whose window reaches the tile are listed, one range per segment.

An empty completion owns no rows, hence no tiles. Groups are listed heaviest first and
a group's tiles stay adjacent, heaviest first, so the programs running together mostly
read the same prefix K/V (L2 reuse) and the long ones start early (less tail).
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..layout.segmentation import Segmentation
from .triton_common import KeyTile, QueryTile, SplitKeyTile

__all__ = ["dkdv_chunk_rows", "key_tile_rows", "longest_row", "query_tile_rows"]


def longest_row(prefix_lens: Sequence[int], suffix_lens_per_group: Sequence[Sequence[int]]) -> int:
    """Tokens of the longest unpacked row (prompt + completion): a window at least this long
    hides nothing."""
    return Segmentation.from_lengths(prefix_lens, suffix_lens_per_group).longest_row


def _shared_run(segmentation: Segmentation, index: int) -> tuple[int, int]:
    """``(start, length)`` of the keys segment ``index``'s queries see before its own: a
    completion's prefix; for a prefix, nothing (an empty run at its start). The kernels take
    one such run: a flat layout's key runs are at most the prefix's, then the segment's own."""
    *ancestors, (own_start, _) = segmentation.key_runs(index)
    if not ancestors:
        return own_start, 0
    (shared,) = ancestors
    return shared


def _group_end(segmentation: Segmentation, group: range) -> int:
    last = segmentation.segments[group[-1]]
    return last.start + last.length


def _heaviest_first(per_group: list[list[tuple[int, tuple]]]) -> list[tuple]:
    """Flatten ``(work, row)`` lists: groups by total work, then rows by work, descending."""
    per_group = sorted(per_group, key=lambda tiles: -sum(work for work, _ in tiles))
    return [row for tiles in per_group for _, row in sorted(tiles, key=lambda t: -t[0])]


def query_tile_rows(prefix_lens: Sequence[int], suffix_lens_per_group: Sequence[Sequence[int]],
                    tile: int, window: Optional[int] = None) -> list[QueryTile]:
    """The :class:`QueryTile` of every query tile of ``tile`` rows, in launch order (a
    ``window`` only changes the order: the work of a tile)."""
    segmentation = Segmentation.from_lengths(prefix_lens, suffix_lens_per_group)
    per_group = []
    for group in segmentation.groups:
        tiles = []
        for index in group:
            seg_start, seg_len, _ = segmentation.segments[index]
            shared_start, shared_len = _shared_run(segmentation, index)
            for q_start in range(seg_start, seg_start + seg_len, tile):
                keys_before = shared_len + q_start - seg_start
                work = (keys_before if window is None else min(keys_before, window)) + tile
                tiles.append((work, QueryTile(q_start=q_start, seg_start=seg_start, seg_end=seg_start + seg_len,
                                              shared_start=shared_start, shared_len=shared_len)))
        per_group.append(tiles)
    return _heaviest_first(per_group)


def _windowed_range(start: int, end: int, reach: int, pos_shift: int) -> list[tuple[int, int, int]]:
    """``[(start, min(end, start + reach), pos_shift)]``, or nothing when that is empty."""
    end = min(end, start + reach)
    return [(start, end, pos_shift)] if end > start else []


def _key_tile_query_ranges(prefix_lens: Sequence[int], suffix_lens_per_group: Sequence[Sequence[int]],
                           tile: int, window: Optional[int] = None) -> list[list[tuple[int, int, list]]]:
    """Per group, ``(k_start, k_end, ranges)`` of each key tile of ``tile`` rows: ``ranges``
    lists ``(start, end, pos_shift)`` packed query ranges holding every query that sees a
    key of the tile (:class:`KeyTile` defines ``pos_shift``). Without a window that is one
    range, of exactly the queries that see the tile's first key."""
    segmentation = Segmentation.from_lengths(prefix_lens, suffix_lens_per_group)
    per_group = []
    for group in segmentation.groups:
        group_end = _group_end(segmentation, group)
        prefix_start, prefix_len, _ = segmentation.segments[group.start]
        prefix_end = prefix_start + prefix_len
        completions = [segmentation.segments[index] for index in group[1:]]
        tiles = []
        for index in group:
            seg_start, seg_len, parent = segmentation.segments[index]
            seg_end, is_prefix = seg_start + seg_len, parent < 0
            for k_start in range(seg_start, seg_end, tile):
                if window is None:
                    # Prefix keys are seen by the causal prefix queries and every suffix
                    # query of the group, which together fill [key, group_end); suffix keys
                    # only by their suffix.
                    ranges = [(k_start, group_end if is_prefix else seg_end, 0)]
                else:
                    # Queries see the tile's last key while pos(query) - pos(last) < window:
                    # in its own segment up to last + window, and, for a prefix tile, the
                    # first ``reach`` tokens of each completion (positions P, P+1, ...).
                    last = min(k_start + tile, seg_end) - 1
                    ranges = _windowed_range(k_start, seg_end, last + window - k_start, 0)
                    if is_prefix:
                        reach = (last - prefix_start) + window - prefix_len
                        for start, length, _ in completions:
                            ranges += _windowed_range(start, start + length, reach, prefix_end - start)
                tiles.append((k_start, seg_end, ranges))
        per_group.append(tiles)
    return per_group


def dkdv_chunk_rows(prefix_lens: Sequence[int], suffix_lens_per_group: Sequence[Sequence[int]],
                    tile: int, num_kv_heads: int, min_programs: int, window: Optional[int] = None) -> int:
    """Query rows per dK/dV program: a multiple of ``tile`` such that splitting every key
    tile's query ranges into chunks of that many rows gives the launch about
    ``min_programs`` programs over ``num_kv_heads`` heads, or more (never fewer than one
    program per key tile and head)."""
    total_rows = sum(end - start
                     for tiles in _key_tile_query_ranges(prefix_lens, suffix_lens_per_group, tile, window)
                     for _, _, ranges in tiles for start, end, _ in ranges)
    wanted_chunks = -(-min_programs // num_kv_heads)
    return max(tile, -(-total_rows // (wanted_chunks * tile)) * tile)


def key_tile_rows(prefix_lens: Sequence[int], suffix_lens_per_group: Sequence[Sequence[int]],
                  tile: int, chunk_rows: int, window: Optional[int] = None,
                  ) -> tuple[list[KeyTile], list[SplitKeyTile]]:
    """The dK/dV programs, a :class:`KeyTile` per ``chunk_rows`` queries of each query range
    of each key tile of ``tile`` rows in launch order, and the :class:`SplitKeyTile` of every
    key tile that got more than one chunk (partial slots numbered from 0)."""
    per_group, split, num_slots = [], [], 0
    for tiles in _key_tile_query_ranges(prefix_lens, suffix_lens_per_group, tile, window):
        programs = []
        for k_start, k_end, ranges in tiles:
            chunks = [(chunk_start, min(chunk_start + chunk_rows, end), pos_shift)
                      for start, end, pos_shift in ranges for chunk_start in range(start, end, chunk_rows)]
            if len(chunks) == 1:
                (chunk_start, chunk_end, pos_shift), = chunks
                programs.append((chunk_end - chunk_start,
                                 KeyTile(k_start, k_end, chunk_start, chunk_end, -1, pos_shift)))
                continue
            split.append(SplitKeyTile(k_start, k_end, first_slot=num_slots, num_slots=len(chunks)))
            for chunk_start, chunk_end, pos_shift in chunks:
                programs.append((chunk_end - chunk_start,
                                 KeyTile(k_start, k_end, chunk_start, chunk_end, num_slots, pos_shift)))
                num_slots += 1
        per_group.append(programs)
    return _heaviest_first(per_group), split
