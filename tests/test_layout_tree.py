"""GroupLayout.from_sequences (the radix tree of token sequences) against brute force on
random trees: random depth, branching, ragged runs, duplicates, sequences that prefix others."""
import random

import pytest
import torch

from prefix_grouper import GroupLayout
from prefix_grouper.layout import (CompletionLayout, FlatLayout, NotOneLevelError, Segmentation, TreeLayout,
                                   decode_host_segments, segmentation_of)


def random_sequences(seed: int, vocab: int = 3) -> list[list[int]]:
    """Branching random walks from a few roots, with duplicates and prefixes of others."""
    rng = random.Random(seed)
    sequences: list[list[int]] = []
    for _ in range(rng.randint(1, 3)):
        frontier = [[rng.randrange(vocab) for _ in range(rng.randint(1, 4))]]
        for _depth in range(rng.randint(0, 4)):
            children = []
            for node in frontier:
                for _ in range(rng.randint(1, 3)):
                    children.append(node + [rng.randrange(vocab) for _ in range(rng.randint(0, 5))])
            frontier = children
        sequences.extend(s for s in frontier if s)
    picks = [rng.choice(sequences) for _ in range(rng.randint(0, 3))]
    sequences += [list(s) for s in picks]  # exact duplicates
    sequences += [s[:rng.randint(1, len(s))] for s in picks]  # prefixes of others
    rng.shuffle(sequences)
    return sequences


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check_tree(layout: GroupLayout, sequences: list[list[int]], min_shared: int) -> None:
    packed = layout.pack_sequences([torch.tensor(s) for s in sequences])
    assert packed.shape == (layout.total_tokens,)
    positions = [layout.sequence_positions(i).tolist() for i in range(len(sequences))]
    for i, sequence in enumerate(sequences):
        assert packed[positions[i]].tolist() == sequence
        assert layout.position_ids[positions[i]].tolist() == list(range(len(sequence)))
    # Every packed token belongs to some sequence.
    assert sorted({p for ps in positions for p in ps}) == list(range(layout.total_tokens))
    for i, a in enumerate(sequences):
        for j, b in enumerate(sequences):
            lcp = common_prefix(a, b)
            shared = common_prefix(positions[i], positions[j])
            # Shared tokens form a common prefix, kept whole unless shorter than min_shared.
            assert shared <= lcp and (shared == lcp or lcp - shared < min_shared), (a, b, shared)
            assert not set(positions[i][shared:]) & set(positions[j][shared:])
    segmentation = layout.segmentation
    segments = segmentation.segments
    for s, (start, length, parent) in enumerate(segments):
        assert length >= 1
        own = (start, length)
        assert layout.key_runs(s) == ((own,) if parent == -1 else layout.key_runs(parent) + (own,))
        descendants = [t for t in range(len(segments)) if s in ancestors(segments, t)]
        assert layout.subtree_end(s) == max([start + length] + [segments[t].start + segments[t].length
                                                                 for t in descendants])
        assert descendants == list(range(s + 1, s + 1 + len(descendants)))  # pre-order: contiguous
        if descendants:
            assert length >= min_shared
    roots = [s for s, segment in enumerate(segments) if segment.parent == -1]
    token_segment = layout.token_segment.tolist()
    for t in range(layout.total_tokens):
        root = max(r for r in range(len(roots)) if segments[roots[r]].start <= t)
        assert layout.token_root[t] == root
        assert segments[token_segment[t]].start <= t < segments[token_segment[t]].start + segments[token_segment[t]].length


def ancestors(segments, s: int) -> list[int]:
    out = []
    while segments[s].parent != -1:
        s = segments[s].parent
        out.append(s)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_random_trees_share_every_common_prefix(seed):
    sequences = random_sequences(seed)
    layout = GroupLayout.from_sequences(sequences)
    distinct_prefixes = {tuple(s[:k]) for s in sequences for k in range(1, len(s) + 1)}
    assert layout.total_tokens == len(distinct_prefixes)
    assert layout.num_sequences == len(sequences)
    assert layout.sequence_lens_list == tuple(len(s) for s in sequences)
    assert layout.unpacked_tokens() == sum(len(s) for s in sequences)
    assert not layout.is_flat
    check_tree(layout, sequences, 1)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("min_shared", [2, 3, 6])
def test_min_shared_keeps_short_shared_runs_apart(seed, min_shared):
    sequences = random_sequences(seed)
    layout = GroupLayout.from_sequences(sequences, min_shared=min_shared)
    check_tree(layout, sequences, min_shared)
    assert layout.total_tokens >= GroupLayout.from_sequences(sequences).total_tokens


def test_min_shared_example():
    # Two tokens shared by all, then [5, 6, 7] shared by two of them.
    sequences = [[1, 2, 5, 6, 7, 8], [1, 2, 5, 6, 7, 9], [1, 2, 3]]
    assert GroupLayout.from_sequences(sequences).total_tokens == 2 + 3 + 1 + 1 + 1
    layout = GroupLayout.from_sequences(sequences, min_shared=3)
    # [1, 2] is not split out: the first two sequences share [1 2 5 6 7], the third its own copy.
    assert layout.total_tokens == 5 + 1 + 1 + 3
    assert sorted(s.length for s in layout.segments if s.parent == -1) == [3, 5]
    assert GroupLayout.from_sequences(sequences, min_shared=6).total_tokens == 6 + 6 + 3


def test_duplicates_and_prefixes_end_on_shared_nodes():
    sequences = [[4, 5, 6], [4, 5], [4, 5, 6], [4, 5, 6, 7]]
    layout = GroupLayout.from_sequences(sequences)
    assert layout.total_tokens == 4
    assert layout.sequence_positions(0).tolist() == layout.sequence_positions(2).tolist() == [0, 1, 2]
    assert layout.sequence_positions(1).tolist() == [0, 1]
    assert layout.sequence_positions(3).tolist() == [0, 1, 2, 3]


def test_token_log_prob_positions():
    sequences = [[1, 2, 3], [1, 2, 4, 5], [9]]
    layout = GroupLayout.from_sequences(sequences)
    packed = layout.pack_sequences(sequences)
    logits_at, targets_at = layout.token_log_prob_positions(1)
    assert packed[targets_at].tolist() == [2, 4, 5]
    assert layout.position_ids[logits_at].tolist() == [0, 1, 2]
    all_logits, all_targets = layout.token_log_prob_positions()
    assert all_targets.tolist() == (layout.sequence_positions(0)[1:].tolist()
                                    + layout.sequence_positions(1)[1:].tolist())
    assert all_logits.tolist() == (layout.sequence_positions(0)[:-1].tolist()
                                   + layout.sequence_positions(1)[:-1].tolist())
    assert [t.numel() for t in layout.token_log_prob_positions(2)] == [0, 0]


def test_pack_sequences_features_and_checks():
    sequences = [[1, 2, 3], [1, 2, 4]]
    layout = GroupLayout.from_sequences(sequences)
    features = [torch.arange(6.0).reshape(3, 2), torch.arange(6.0).reshape(3, 2) + 10]
    packed = layout.pack_sequences(features)
    assert packed.shape == (4, 2)
    assert packed[layout.sequence_positions(0)].tolist() == features[0].tolist()
    assert packed[3].tolist() == features[1][2].tolist()  # shared tokens: the first sequence's values
    with pytest.raises(ValueError, match=r"sequences\[1\] token 1 differs"):
        layout.pack_sequences([[1, 2, 3], [1, 7, 4]])
    with pytest.raises(ValueError, match="expected 2 entries"):
        layout.pack_sequences([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"sequences\[0\]: expected 3 tokens"):
        layout.pack_sequences([[1, 2], [1, 2, 4]])
    with pytest.raises(ValueError, match="share dtype"):
        layout.pack_sequences([torch.zeros(3), torch.zeros(3, dtype=torch.long)])


def test_host_segments_rebuild_the_segmentation():
    layout = GroupLayout.from_sequences([[1, 2, 3], [1, 2, 4], [5]])
    host = layout.host_segments
    assert host.dtype == torch.long and host.device.type == "cpu" and host.shape == (len(layout.segments), 3)
    assert [tuple(s) for s in layout.segments] == decode_host_segments(host)
    assert segmentation_of(host) is layout.segmentation  # one cached Segmentation per layout
    # Not a view: aot_autograd would replay a view of a graph input as a new tensor, missing the
    # identity-keyed cache (torch 2.11 rebuilt every schedule in the compiled backward).
    assert host._base is None
    rebuilt = segmentation_of(host.clone())
    assert rebuilt is not layout.segmentation and rebuilt.segments == layout.segmentation.segments
    assert layout.to("cpu") is layout


def test_one_level_layouts_answer_the_tree_api():
    layout = GroupLayout.from_lengths([2, 1], [[2, 1], [2, 0]])
    assert layout.is_flat and layout.num_sequences == 4
    assert layout.sequence_lens_list == (4, 3, 3, 1)
    assert layout.sequence_positions(1).tolist() == [0, 1, 4]
    assert layout.sequence_positions(3).tolist() == [5]
    assert torch.equal(layout.token_root, layout.token_group)
    assert [layout.subtree_end(s) for s in range(len(layout.segments))] == [5, 4, 5, 8, 8, 8]
    assert segmentation_of(layout.host_segments).segments == layout.segments
    ids = [torch.tensor([7, 8, 1, 2]), torch.tensor([7, 8, 3]), torch.tensor([9, 4, 5]), torch.tensor([9])]
    assert layout.pack_sequences(ids).tolist() == [7, 8, 1, 2, 3, 9, 4, 5]


def test_one_level_members_do_not_exist_on_a_tree():
    """A bare tree has no prompt/completion members by construction (no guard, no trap
    list): hasattr is False, and asking for one names the tree API instead."""
    layout = GroupLayout.from_sequences([[1, 2, 3], [1, 2, 4]])
    assert isinstance(layout, GroupLayout) and isinstance(layout, TreeLayout)
    assert not isinstance(layout, CompletionLayout) and not layout.has_completions and not layout.is_flat
    for name in ("prefix_lens", "host_lengths", "token_group", "cu_seqlens", "suffix_lens_per_group",
                 "completion_group", "completion_mask", "completion_positions", "completion_logit_positions",
                 "pack", "unpack_completions", "micro_batch_groups", "num_groups"):
        assert not hasattr(layout, name), name
        with pytest.raises(NotOneLevelError, match="prefix tree: use sequence_positions"):
            getattr(layout, name)
    with pytest.raises(AttributeError, match="no attribute 'no_such_member'") as caught:
        layout.no_such_member
    assert not isinstance(caught.value, NotOneLevelError)
    assert "__getattr__" not in vars(GroupLayout)  # the core type answers only its own members


@pytest.mark.parametrize("sequences, error, match", [
    ([], ValueError, "sequences is empty"),
    (torch.zeros(2, 3, dtype=torch.long), TypeError, "list of 1-D integer"),
    ([[1, 2], []], ValueError, r"sequences\[1\] is empty"),
    ([[1, -2]], ValueError, r"sequences\[0\] holds a negative token id"),
    ([torch.zeros(3)], TypeError, r"sequences\[0\] must hold integer token ids"),
    ([[0.5, 1.0]], TypeError, r"sequences\[0\] must hold integer token ids"),
    ([torch.zeros(2, 2, dtype=torch.long)], ValueError, r"sequences\[0\] must be 1-D"),
])
def test_from_sequences_errors(sequences, error, match):
    with pytest.raises(error, match=match):
        GroupLayout.from_sequences(sequences)


@pytest.mark.parametrize("min_shared", [0, -1, 1.5])
def test_min_shared_errors(min_shared):
    with pytest.raises((TypeError, ValueError), match="min_shared"):
        GroupLayout.from_sequences([[1, 2]], min_shared=min_shared)


def test_segmentation_refuses_a_split_subtree():
    with pytest.raises(ValueError, match="pre-order"):
        Segmentation([(0, 1, -1), (1, 1, 0), (2, 1, 0), (3, 1, 1)])


def padded_batch(prompts: list[list[int]], completions: list[list[int]], group_sizes: list[int]):
    """One left-padded prompt row per completion (TRL/verl style), right-padded completions."""
    rows = [prompts[b] for b, g in enumerate(group_sizes) for _ in range(g)]
    lp, ls = max(map(len, prompts)), max(1, max(map(len, completions)))
    prompt_ids = torch.zeros(len(rows), lp, dtype=torch.long)
    prompt_mask = torch.zeros(len(rows), lp, dtype=torch.bool)
    completion_ids = torch.zeros(len(rows), ls, dtype=torch.long)
    completion_mask = torch.zeros(len(rows), ls, dtype=torch.bool)
    for r, (p, c) in enumerate(zip(rows, completions)):
        prompt_ids[r, lp - len(p):], prompt_mask[r, lp - len(p):] = torch.tensor(p), True
        completion_ids[r, :len(c)], completion_mask[r, :len(c)] = torch.tensor(c, dtype=torch.long), True
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def random_system_prompt_batch(seed: int):
    rng = random.Random(seed)
    system = [rng.randrange(50) for _ in range(rng.randint(1, 6))]
    prompts = []
    for _ in range(rng.randint(1, 5)):
        own = [rng.randrange(3) for _ in range(rng.randint(0, 3))]
        prompts.append((system if rng.random() < 0.8 else [7]) + own)
    sizes = [rng.randint(1, 3) for _ in prompts]
    completions = [[rng.randrange(50) for _ in range(rng.randint(0, 4))] for _ in range(sum(sizes))]
    return prompts, completions, sizes


@pytest.mark.parametrize("seed", range(30))
def test_share_across_groups_keeps_the_one_level_members(seed):
    prompts, completions, sizes = random_system_prompt_batch(seed)
    prompt_ids, prompt_mask, completion_ids, completion_mask = padded_batch(prompts, completions, sizes)
    flat = GroupLayout.from_padded(prompt_mask, completion_mask, sizes, prompt_ids=prompt_ids,
                                   share_across_groups=False)
    shared = GroupLayout.from_padded(prompt_mask, completion_mask, sizes, prompt_ids=prompt_ids, min_shared=1)
    distinct = {tuple(p[:k]) for p in prompts for k in range(1, len(p) + 1)}
    assert shared.total_tokens == len(distinct) + sum(map(len, completions))
    assert shared.is_flat == (len(distinct) == sum(map(len, prompts)) and len(set(map(tuple, prompts))) == len(prompts))
    for name in ("prefix_lens_list", "group_sizes_list", "suffix_lens_list", "num_completion_tokens",
                 "max_suffix_len", "sequence_lens_list"):
        assert getattr(shared, name) == getattr(flat, name)
    for name in ("prefix_lens", "suffix_lens", "completion_group", "first_completion"):
        assert torch.equal(getattr(shared, name), getattr(flat, name))
    assert torch.equal(shared.completion_mask(), flat.completion_mask())
    assert shared.unpacked_tokens() == flat.unpacked_tokens()
    packed_flat = flat.pack(prompt_ids, completion_ids)
    packed = shared.pack(prompt_ids, completion_ids)
    assert torch.equal(packed, shared.pack([torch.tensor(p) for p in prompts],
                                           [torch.tensor(c, dtype=torch.long) for c in completions]))
    sequences = [torch.tensor(prompts[b] + completions[j], dtype=torch.long)
                 for j, b in enumerate(flat.completion_group.tolist())]
    assert torch.equal(packed, shared.pack_sequences(sequences))
    for layout, ids in ((flat, packed_flat), (shared, packed)):
        for i, sequence in enumerate(sequences):
            assert torch.equal(ids[layout.sequence_positions(i)], sequence)
            assert layout.position_ids[layout.sequence_positions(i)].tolist() == list(range(len(sequence)))
    for member in ("completion_positions", "completion_logit_positions"):
        assert torch.equal(packed[getattr(shared, member)()], packed_flat[getattr(flat, member)()])
        assert torch.equal(shared.position_ids[getattr(shared, member)()],
                           flat.position_ids[getattr(flat, member)()])
    for x, y in zip(shared.unpack_completions(packed), flat.unpack_completions(packed_flat)):
        assert torch.equal(x, y)
    assert torch.equal(shared.token_completion[shared.completion_positions()],
                       torch.repeat_interleave(torch.arange(len(completions)), flat.suffix_lens))
    if not shared.is_flat:
        for name in ("host_lengths", "cu_seqlens", "prefix_starts", "token_group", "cu_group_seqlens"):
            with pytest.raises(NotOneLevelError, match="prefix tree"):
                getattr(shared, name)
        with pytest.raises(NotOneLevelError, match="shares runs across groups"):
            shared.micro_batch_groups(max_rows=1)


def test_share_across_groups_example_and_checks():
    prompts, completions, sizes = [[5, 6, 7, 1, 2], [5, 6, 7, 3], [9, 8]], [[11, 12], [13], [14], [], [17]], [2, 2, 1]
    prompt_ids, prompt_mask, completion_ids, completion_mask = padded_batch(prompts, completions, sizes)
    shared = GroupLayout.from_padded(prompt_mask, completion_mask, prompt_ids=prompt_ids, min_shared=3)
    assert not shared.is_flat and shared.has_completions
    assert shared.total_tokens == 3 + 2 + 1 + 2 + 5  # [5 6 7] once
    # By default (min_shared=4) the 3-token system run is not split out: the flat layout.
    assert GroupLayout.from_padded(prompt_mask, completion_mask, prompt_ids=prompt_ids).is_flat
    assert GroupLayout.from_padded(prompt_mask, completion_mask, prompt_ids=prompt_ids, share_across_groups=False).is_flat
    system = [21, 22, 23, 24]  # a 4-token system prompt is shared by default
    system_batch = padded_batch([system + p for p in prompts], completions, sizes)
    with_system = GroupLayout.from_padded(system_batch[1], system_batch[3], prompt_ids=system_batch[0])
    # [21 22 23 24] once; [5 6 7], shared by two groups, is under 4 tokens: kept per group.
    assert not with_system.is_flat and with_system.total_tokens == 4 + (3 + 2) + (3 + 1) + 2 + 5
    bad = prompt_ids.clone()
    bad[2:4, -4] = 99  # group 1 rewrites the shared run
    with pytest.raises(ValueError, match="shares across groups"):
        shared.pack(bad, completion_ids)
    with pytest.raises(ValueError, match="needs prompt_ids"):
        GroupLayout.from_padded(prompt_mask, completion_mask, sizes, share_across_groups=True)
    with pytest.raises(ValueError, match="min_shared"):
        GroupLayout.from_padded(prompt_mask, completion_mask, prompt_ids=prompt_ids, share_across_groups=False,
                                min_shared=2)


def test_very_ragged_batch_is_sorted_without_a_padded_copy():
    # One long sequence among short ones: the tree is built without padding them all to it.
    long = torch.randint(1, 50, (300_000,), generator=torch.Generator().manual_seed(0))
    head = long[:3].tolist()
    sequences = [long, long[:5], torch.tensor(head + [0]), torch.tensor([0, 7]), torch.tensor([0, 7, 1]),
                 long[:1], torch.tensor(head + [0, 2]), torch.tensor([0])]
    layout = GroupLayout.from_sequences(sequences)
    assert layout.total_tokens == 300_000 + 2 + 3  # + [.. 0, 2] branch, + [0 7 1]
    packed = layout.pack_sequences(sequences)
    for i, sequence in enumerate(sequences):
        assert torch.equal(packed[layout.sequence_positions(i)], sequence)


def test_to_rebuilds_tree_layouts_on_another_device():
    tree = GroupLayout.from_sequences([[1, 2, 3], [1, 2, 4], [5]]).to("meta")
    assert tree.device.type == "meta" and tree.token_root.device.type == "meta" and not tree.has_completions
    prompts, completions, sizes = [[5, 6, 1], [5, 6, 2]], [[3], [4, 4], [7]], [2, 1]
    prompt_ids, prompt_mask, _, completion_mask = padded_batch(prompts, completions, sizes)
    shared = GroupLayout.from_padded(prompt_mask, completion_mask, sizes, prompt_ids=prompt_ids,
                                     min_shared=1).to("meta")
    assert shared.has_completions and not shared.is_flat
    assert shared.completion_group.device.type == "meta" and shared.segments[0] == (0, 2, -1)


def test_every_kind_of_layout_pickles_copies_and_keeps_its_members():
    """The three kinds (flat, shared prompts, bare tree) survive pickle and deepcopy with
    every tensor, their segmentation and their kind; GroupLayout(...) is from_lengths."""
    import copy
    import pickle

    prompts, completions, sizes = [[5, 6, 1], [5, 6, 2]], [[3], [4, 4], [7]], [2, 1]
    prompt_ids, prompt_mask, completion_ids, completion_mask = padded_batch(prompts, completions, sizes)
    layouts = {FlatLayout: GroupLayout.from_lengths([2, 1], [[2, 1], [2, 0]]),
               CompletionLayout: GroupLayout.from_padded(prompt_mask, completion_mask, sizes, prompt_ids=prompt_ids,
                                                         min_shared=1),
               TreeLayout: GroupLayout.from_sequences([[1, 2, 3], [1, 2, 4], [5]])}
    assert type(GroupLayout([2, 1], [[2, 1], [2, 0]])) is FlatLayout
    for kind, layout in layouts.items():
        assert type(layout) is kind
        for clone in (pickle.loads(pickle.dumps(layout)), copy.deepcopy(layout)):
            assert type(clone) is kind and repr(clone) == repr(layout)
            assert clone.segments == layout.segments and clone.host_segments is not layout.host_segments
            for name, value in vars(layout).items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(getattr(clone, name), value), name
        if kind is not TreeLayout:
            packed = layout.pack(prompt_ids[[0, 2]] if kind is CompletionLayout else
                                 [torch.tensor([7, 8]), torch.tensor([9])],
                                 completion_ids if kind is CompletionLayout else
                                 [torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([4, 5]), torch.tensor([], dtype=torch.long)])
            assert packed.shape == (layout.total_tokens,)


def test_uint64_token_ids_above_int64_are_named_not_wrapped():
    import numpy as np

    big = 2**63 + 5
    for sequence in (np.array([big, 1], dtype=np.uint64), torch.tensor([big, 1], dtype=torch.uint64), [big, 1]):
        with pytest.raises(ValueError, match=f"token id {big}, above the largest int64"):
            GroupLayout.from_sequences([sequence])
    prompt_ids = torch.tensor([[7, big]], dtype=torch.uint64)
    with pytest.raises(ValueError, match=f"token id {big} under the mask, above the largest int64"):
        GroupLayout.from_padded(torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool), [1],
                                prompt_ids=prompt_ids)
    small = GroupLayout.from_sequences([torch.tensor([3, 1], dtype=torch.uint64), [3, 2]])
    assert small.total_tokens == 3


def test_min_shared_keeps_exact_duplicates_on_one_node():
    layout = GroupLayout.from_sequences([[1, 2], [1, 2], [1, 2, 3, 4, 5, 6]], min_shared=5)
    assert layout.total_tokens == 2 + 6
    assert layout.sequence_positions(0).tolist() == layout.sequence_positions(1).tolist()
