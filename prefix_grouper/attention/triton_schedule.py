"""Tile schedules of the Triton kernels, built on the host from a layout's
:class:`~prefix_grouper.layout.segmentation.Segmentation` (a prefix tree; a one-level
layout is the depth-1 tree).

* :func:`query_tile_rows`: the forward and dQ programs' query tiles
  (:class:`~.triton_common.QueryTile`) and the runs table they index, each segment's
  ancestor key runs (:class:`~.triton_common.AncestorRun`, CSR-style); a window needs no
  other tiles, the kernels skip the key blocks it hides.
* :func:`key_tile_rows`: the dK/dV programs (:class:`~.triton_common.KeyTile`), a key tile
  against one chunk of the queries that see it, and the split key tiles
  (:class:`~.triton_common.SplitKeyTile`) whose partials the reduction kernel sums. Without
  a window the queries that see a key tile form one packed range; with one, only the
  queries whose window reaches the tile are listed, one range per segment (its own and
  each descendant's).

An empty completion owns no rows, hence no tiles. Groups are listed heaviest first and
a group's tiles stay adjacent, heaviest first, so the programs running together mostly
read the same prefix K/V (L2 reuse) and the long ones start early (less tail).
"""
from __future__ import annotations

from collections import namedtuple
from typing import Optional

from ..layout.segmentation import Segmentation

# One int32 row per tile in each schedule. The builders below fill these named tuples; the
# kernels (triton_common) read their columns in the same field order. Host-only: no triton here.
# A query tile's keys: the rows runs_begin:runs_end of the runs table (its segment's
# ancestor runs, root first), then its own segment causally.
QueryTile = namedtuple("QueryTile", ["q_start", "seg_start", "seg_end", "runs_begin", "runs_end"])
# A run of ancestor keys; for every row of the segments listing it and every key of the
# run, position(row) - position(key) = row - key + pos_shift (only a window reads it).
AncestorRun = namedtuple("AncestorRun", ["start", "length", "pos_shift"])
# One dK/dV program: the keys of a tile against one chunk [chunk_start, chunk_end) of the
# queries that see them. ``partial_slot`` is -1 when the chunk is the tile's whole query
# range (the program writes dK/dV), else the slot of the fp32 scratch it writes, summed by
# the reduction kernel in the order of its SplitKeyTile row. ``pos_shift``: for every query
# row and key of the program, position(row) - position(key) = row - key + pos_shift (0 when
# the chunk is in the key's own segment); only a window reads it.
KeyTile = namedtuple("KeyTile", ["k_start", "k_end", "chunk_start", "chunk_end", "partial_slot", "pos_shift"])
# A key tile whose queries were split: its partials fill slots [first_slot, first_slot + num_slots).
SplitKeyTile = namedtuple("SplitKeyTile", ["k_start", "k_end", "first_slot", "num_slots"])

__all__ = ["dkdv_chunk_rows", "key_tile_rows", "query_tile_rows"]


def _ancestor_runs(segmentation: Segmentation, index: int) -> list[AncestorRun]:
    """The :class:`AncestorRun` rows of segment ``index``'s non-empty ancestor runs, root
    first (a root has none; a one-level completion has its prefix)."""
    *ancestors, (own_start, _) = segmentation.key_runs(index)
    own_position = segmentation.first_positions[index]
    rows, run_position = [], 0
    for start, length in ancestors:
        if length:
            # pos(row) - pos(key) = (row - key) + pos_shift for a row of the segment and a key of the run.
            rows.append(AncestorRun(start, length, (own_position - own_start) - (run_position - start)))
        run_position += length
    return rows


def _heaviest_first(per_group: list[list[tuple[int, tuple]]]) -> list[tuple]:
    """Flatten ``(work, row)`` lists: groups by total work, then rows by work, descending."""
    per_group = sorted(per_group, key=lambda tiles: -sum(work for work, _ in tiles))
    return [row for tiles in per_group for _, row in sorted(tiles, key=lambda t: -t[0])]


def query_tile_rows(segmentation: Segmentation, tile: int, window: Optional[int] = None,
                    ) -> tuple[list[QueryTile], list[AncestorRun]]:
    """``(tiles, runs)``: the :class:`QueryTile` of every query tile of ``tile`` rows, in
    launch order (a ``window`` only changes the order: the work of a tile), and the runs
    table its ``runs_begin:runs_end`` index (each segment's ancestor runs, listed once per
    segment in packed order)."""
    runs: list[AncestorRun] = []
    per_group = []
    for group in segmentation.groups:
        tiles = []
        for index in group:
            seg_start, seg_len, _ = segmentation.segments[index]
            if not seg_len:
                continue
            runs_begin = len(runs)
            runs += _ancestor_runs(segmentation, index)
            for q_start in range(seg_start, seg_start + seg_len, tile):
                keys_before = segmentation.first_positions[index] + q_start - seg_start
                work = (keys_before if window is None else min(keys_before, window)) + tile
                tiles.append((work, QueryTile(q_start=q_start, seg_start=seg_start, seg_end=seg_start + seg_len,
                                              runs_begin=runs_begin, runs_end=len(runs))))
        per_group.append(tiles)
    return _heaviest_first(per_group), runs


def _windowed_range(start: int, end: int, reach: int, pos_shift: int) -> list[tuple[int, int, int]]:
    """``[(start, min(end, start + reach), pos_shift)]``, or nothing when that is empty."""
    end = min(end, start + reach)
    return [(start, end, pos_shift)] if end > start else []


def _descendants(segmentation: Segmentation, index: int) -> list[int]:
    """Indices of the non-empty segments below segment ``index`` (pre-order: the segments
    packed in its subtree after its own run)."""
    start, length, _ = segmentation.segments[index]
    subtree_end, found = segmentation.subtree_end(index), []
    for other in range(index + 1, len(segmentation.segments)):
        other_start, other_len, _ = segmentation.segments[other]
        if other_start >= subtree_end:
            break
        if other_len:
            found.append(other)
    return found


def _key_tile_query_ranges(segmentation: Segmentation, tile: int, window: Optional[int] = None,
                           ) -> list[list[tuple[int, int, list]]]:
    """Per group, ``(k_start, k_end, ranges)`` of each key tile of ``tile`` rows: ``ranges``
    lists ``(start, end, pos_shift)`` packed query ranges holding every query that sees a
    key of the tile (:class:`KeyTile` defines ``pos_shift``). Without a window that is one
    range, of exactly the queries that see the tile's first key: its own segment's later
    tokens and its whole subtree, ``[k_start, subtree_end)`` (pre-order packing)."""
    per_group = []
    for group in segmentation.groups:
        tiles = []
        for index in group:
            seg_start, seg_len, _ = segmentation.segments[index]
            seg_end = seg_start + seg_len
            below = _descendants(segmentation, index) if window is not None and seg_len else []
            for k_start in range(seg_start, seg_end, tile):
                if window is None:
                    ranges = [(k_start, segmentation.subtree_end(index), 0)]
                else:
                    # Queries see the tile's last key while pos(query) - pos(last) < window:
                    # in its own segment up to last + window, and in each descendant the
                    # first ``reach`` tokens (their positions continue the path).
                    last = min(k_start + tile, seg_end) - 1
                    last_position = segmentation.first_positions[index] + last - seg_start
                    ranges = _windowed_range(k_start, seg_end, last + window - k_start, 0)
                    for other in below:
                        start, length, _ = segmentation.segments[other]
                        first_position = segmentation.first_positions[other]
                        ranges += _windowed_range(start, start + length, last_position + window - first_position,
                                                  (first_position - start) - (last_position - last))
                tiles.append((k_start, seg_end, ranges))
        per_group.append(tiles)
    return per_group


def dkdv_chunk_rows(segmentation: Segmentation, tile: int, num_kv_heads: int, min_programs: int,
                    window: Optional[int] = None) -> int:
    """Query rows per dK/dV program: a multiple of ``tile`` such that splitting every key
    tile's query ranges into chunks of that many rows gives the launch about
    ``min_programs`` programs over ``num_kv_heads`` heads, or more (never fewer than one
    program per key tile and head)."""
    total_rows = sum(end - start
                     for tiles in _key_tile_query_ranges(segmentation, tile, window)
                     for _, _, ranges in tiles for start, end, _ in ranges)
    wanted_chunks = -(-min_programs // num_kv_heads)
    return max(tile, -(-total_rows // (wanted_chunks * tile)) * tile)


def key_tile_rows(segmentation: Segmentation, tile: int, chunk_rows: int, window: Optional[int] = None,
                  ) -> tuple[list[KeyTile], list[SplitKeyTile]]:
    """The dK/dV programs, a :class:`KeyTile` per ``chunk_rows`` queries of each query range
    of each key tile of ``tile`` rows in launch order, and the :class:`SplitKeyTile` of every
    key tile that got more than one chunk (partial slots numbered from 0)."""
    per_group, split, num_slots = [], [], 0
    for tiles in _key_tile_query_ranges(segmentation, tile, window):
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
