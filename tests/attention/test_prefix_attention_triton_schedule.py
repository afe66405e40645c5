"""The Triton backend's host-side tile schedules: query tiles cover every token once with their
segment's ancestor runs; dK/dV programs cover every (query, key) pair a query sees exactly once,
with and without a window, on one-level layouts and trees; launch sizes fill a Hopper GPU;
head packing. No kernel runs here."""
import pytest
import torch
from attention_oracle import random_tree_sequences

from prefix_grouper import GroupLayout
from prefix_grouper.attention import prefix_sharing_mask
from prefix_grouper.attention.triton_common import HeadPacking, head_packing
from prefix_grouper.attention.triton_schedule import dkdv_chunk_rows, key_tile_rows, query_tile_rows
from prefix_grouper.attention.triton_backend import HOPPER_SMS


RAGGED = ([1, 7, 20], [[0, 1, 7], [19], [7, 0, 1, 19]])  # empty completions, G = 3, 1, 4
LONG = ([97, 5], [[1, 40], [33]])  # a prefix of several tiles, completions behind it


def test_prefix_attention_triton_tile_schedules_cover_the_layout_once():
    tile = 4
    layout = GroupLayout.from_lengths([1, 9], [[0, 5, 0], [4, 8]])
    segments = layout.cu_seqlens.tolist()
    query_rows, runs = query_tile_rows(layout.segmentation, tile)
    covered = sorted(r for q_start, _, seg_end, _, _ in query_rows
                     for r in range(q_start, min(q_start + tile, seg_end)))
    assert covered == list(range(layout.total_tokens))
    for q_start, seg_start, seg_end, runs_begin, runs_end in query_rows:
        assert (seg_start, seg_end) in zip(segments, segments[1:]) and seg_start <= q_start < seg_end
        assert (q_start - seg_start) % tile == 0
        group = layout.token_group[q_start].item()
        is_suffix = layout.token_completion[q_start].item() >= 0
        # A completion's one ancestor run is its group's prefix; a prefix has none.
        prefix = (layout.prefix_starts[group].item(), layout.prefix_lens[group].item())
        assert [tuple(run[:2]) for run in runs[runs_begin:runs_end]] == ([prefix] if is_suffix else [])
    mask = prefix_sharing_mask(layout)
    for chunk_rows in (tile, 2 * tile, 64 * tile):  # every range split, some, none
        programs, split = key_tile_rows(layout.segmentation, tile, chunk_rows)
        chunks_per_tile = {}
        for k_start, k_end, chunk_start, chunk_end, slot, pos_shift in programs:
            assert k_start <= chunk_start < chunk_end <= chunk_start + chunk_rows and pos_shift == 0
            chunks_per_tile.setdefault((k_start, k_end), []).append((chunk_start, chunk_end, slot))
        assert sorted(r for k_start, k_end in chunks_per_tile
                      for r in range(k_start, min(k_start + tile, k_end))) == list(range(layout.total_tokens))
        for (k_start, _), chunks in chunks_per_tile.items():
            # The chunks tile exactly who sees the tile's first key, [k_start, q_end).
            seen_by = mask[:, k_start].nonzero().flatten().tolist()
            assert sorted(r for start, end, _ in chunks for r in range(start, end)) == seen_by
            assert (len(chunks) == 1) == (chunks[0][2] == -1)
        # Each split tile's partial slots are its own chunks' slots, numbered once.
        assert sorted((k_start, k_end, first, count) for k_start, k_end, first, count in split) == sorted(
            (k_start, k_end, min(c[2] for c in chunks), len(chunks))
            for (k_start, k_end), chunks in chunks_per_tile.items() if len(chunks) > 1)
        assert sorted(p.partial_slot for p in programs if p.partial_slot >= 0) == list(range(sum(s.num_slots for s in split)))


# The issue's GQA shapes (bf16, D=128 and 64: key tiles of 128 rows) on a 132-SM Hopper GPU.
ISSUE_SHAPES = {  # name: (P, S, G, kv heads)
    "P4096 S512 G8 16/16 heads": (4096, 512, 8, 16),
    "Qwen2.5-1.5B 12/2 heads P4096 S256 G8": (4096, 256, 8, 2),
    "Qwen2.5-0.5B 14/2 heads P4096 S256 G8": (4096, 256, 8, 2),
}


@pytest.mark.parametrize("name", ISSUE_SHAPES)
def test_prefix_attention_triton_dkdv_launch_fills_hopper(name):
    """At least two dK/dV programs per SM (before the split: 96 at 12/2 heads), and no
    program walks more than a fair share of the queries."""
    prefix, suffix, groups, kv_heads = ISSUE_SHAPES[name]
    tile, sms = 128, HOPPER_SMS
    segmentation = GroupLayout.from_lengths([prefix], [[suffix] * groups]).segmentation
    chunk_rows = dkdv_chunk_rows(segmentation, tile, kv_heads, 2 * sms)
    programs, _ = key_tile_rows(segmentation, tile, chunk_rows)
    assert len(programs) * kv_heads >= 2 * sms * 0.9, (len(programs), chunk_rows)
    query_rows = [end - start for _, _, start, end, _, _ in programs]
    assert max(query_rows) <= chunk_rows and max(query_rows) <= 2 * sum(query_rows) / len(query_rows) * kv_heads


def test_prefix_attention_triton_head_packing():
    # Qwen2.5-1.5B (12/2 heads) and 0.5B (14/2): a KV head's query heads share 128 score rows.
    assert head_packing(128, 6) == HeadPacking(block_m=128, heads_per_program=6, tile_tokens=21)
    assert head_packing(128, 7) == HeadPacking(block_m=128, heads_per_program=7, tile_tokens=18)
    assert head_packing(128, 1) == HeadPacking(block_m=128, heads_per_program=1, tile_tokens=128)
    # More heads than rows: the largest divisor that fits, packs never straddle KV heads.
    assert head_packing(32, 96) == HeadPacking(block_m=32, heads_per_program=32, tile_tokens=1)
    assert head_packing(32, 66) == HeadPacking(block_m=32, heads_per_program=22, tile_tokens=1)


@pytest.mark.parametrize("lengths", [LONG, RAGGED, ([9, 40], [[40, 3, 0], [1, 70]])])
@pytest.mark.parametrize("window", [1, 7, 16, 33, 60])
def test_prefix_attention_triton_windowed_key_schedule_lists_exactly_the_visible_pairs(lengths, window):
    """dK/dV programs cover each visible (query, key) pair once and only chunks whose
    queries see a key of their tile, so a window removes work instead of masking it."""
    layout = GroupLayout.from_lengths(*lengths)
    mask = prefix_sharing_mask(layout, window)
    tile = 8
    for chunk_rows in (tile, 3 * tile, 10**6):
        programs, split = key_tile_rows(layout.segmentation, tile, chunk_rows, window)
        covered = torch.zeros(mask.shape, dtype=torch.long)
        for k_start, k_end, chunk_start, chunk_end, _, pos_shift in programs:
            keys = torch.arange(k_start, min(k_start + tile, k_end))
            rows = torch.arange(chunk_start, chunk_end)
            # The kernel's masks: causal on packed indices, window through pos_shift.
            seen = (rows[:, None] >= keys[None, :]) & (rows[:, None] < keys[None, :] + window - pos_shift)
            assert seen.any(dim=1).all(), "a chunk row that sees no key of its tile"
            covered[rows[:, None], keys[None, :]] += seen.long()
        assert torch.equal(covered, mask.long())
        plain_rows = sum(p.chunk_end - p.chunk_start
                         for p in key_tile_rows(layout.segmentation, tile, chunk_rows)[0])
        windowed_rows = sum(p.chunk_end - p.chunk_start for p in programs)
        assert windowed_rows < plain_rows if window <= 16 else windowed_rows <= plain_rows
        assert sorted(p.partial_slot for p in programs if p.partial_slot >= 0) == list(
            range(sum(s.num_slots for s in split)))


@pytest.mark.parametrize("window", [None, 3, 17])
def test_prefix_attention_triton_tree_key_schedule_covers_each_visible_pair_once(window):
    """dK/dV programs of a tree list each (query, key) pair a query sees exactly once (the
    kernel's masks: causal on packed indices, the window through pos_shift)."""
    layout = GroupLayout.from_sequences(random_tree_sequences(8, max_run=10, max_depth=3, max_roots=2, vocabulary=10**6))
    assert not layout.is_flat
    segmentation = layout.segmentation
    t, tile = layout.total_tokens, 8
    visible = torch.zeros(t, t, dtype=torch.long)
    position = layout.position_ids.cpu()
    for i in range(layout.num_sequences):
        p = layout.sequence_positions(i)
        i_idx, j_idx = p[:, None], p[None, :]
        seen = j_idx <= i_idx
        if window is not None:
            seen &= position[i_idx] - window < position[j_idx]
        visible[i_idx.expand_as(seen)[seen], j_idx.expand_as(seen)[seen]] = 1
    for chunk_rows in (tile, 10**6):
        programs, _ = key_tile_rows(segmentation, tile, chunk_rows, window)
        covered = torch.zeros(t, t, dtype=torch.long)
        for k_start, k_end, chunk_start, chunk_end, _, pos_shift in programs:
            keys = torch.arange(k_start, min(k_start + tile, k_end))
            rows = torch.arange(chunk_start, chunk_end)
            seen = rows[:, None] >= keys[None, :]
            if window is not None:
                seen &= rows[:, None] < keys[None, :] + window - pos_shift
            covered[rows[:, None], keys[None, :]] += seen.long()
        assert torch.equal(covered, visible)
    # Query tiles: every token once, each tile's runs its segment's ancestors.
    tiles, runs = query_tile_rows(segmentation, tile, window)
    covered = sorted(r for q_start, _, seg_end, _, _ in tiles for r in range(q_start, min(q_start + tile, seg_end)))
    assert covered == list(range(t))
    for q_start, seg_start, _, begin, end in tiles:
        index = int(layout.token_segment[q_start])
        assert [tuple(run[:2]) for run in runs[begin:end]] == [
            r for r in segmentation.key_runs(index)[:-1] if r[1]]
