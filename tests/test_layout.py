"""GroupLayout against hand-built examples."""
import numpy as np
import pytest
import torch

from prefix_grouper import GroupLayout
from prefix_grouper.layout import Segment, Segmentation, cached_per_layout, segmentation_of

# Two groups: prefix [a0 a1] with completions [x0 x1], [y0]; prefix [b0] with [z0 z1], [].
PREFIX, SUFFIX = [2, 1], [[2, 1], [2, 0]]


@pytest.fixture
def layout():
    return GroupLayout.from_lengths(PREFIX, SUFFIX)


def test_sizes(layout):
    assert layout.total_tokens == 2 + 2 + 1 + 1 + 2
    assert layout.num_groups == 2
    assert layout.num_completions == 4
    assert layout.num_completion_tokens == 5
    assert layout.unpacked_tokens() == (2 + 2) + (2 + 1) + (1 + 2) + (1 + 0)


def test_offsets_and_positions(layout):
    # packed: a0 a1 x0 x1 y0 | b0 z0 z1
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 2, 0, 1, 2]
    assert layout.cu_group_seqlens.tolist() == [0, 5, 8]
    assert layout.cu_seqlens.tolist() == [0, 2, 4, 5, 6, 8, 8]
    assert layout.prefix_starts.tolist() == [0, 5]
    assert layout.suffix_starts.tolist() == [2, 4, 6, 8]
    assert layout.completion_group.tolist() == [0, 0, 1, 1]
    assert layout.token_group.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert layout.token_completion.tolist() == [-1, -1, 0, 0, 1, -1, 2, 2]


def test_completion_positions(layout):
    assert layout.completion_positions().tolist() == [2, 3, 4, 6, 7]
    # x0 and y0 are predicted by a1 (index 1), x1 by x0, z0 by b0 (5), z1 by z0.
    assert layout.completion_logit_positions().tolist() == [1, 2, 1, 5, 6]


def test_pack_padded_and_lists(layout):
    prompts = torch.tensor([[10, 11], [0, 20]])  # left-padded
    completions = torch.tensor([[1, 2], [3, 0], [4, 5], [0, 0]])  # right-padded
    expected = [10, 11, 1, 2, 3, 20, 4, 5]
    assert layout.pack(prompts, completions).tolist() == expected
    as_lists = layout.pack([torch.tensor([10, 11]), torch.tensor([20])],
                           [torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([4, 5]),
                            torch.tensor([], dtype=torch.long)])
    assert as_lists.tolist() == expected


def test_pack_keeps_trailing_dims(layout):
    prompts = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    completions = -torch.arange(4 * 2 * 4, dtype=torch.float32).reshape(4, 2, 4)
    packed = layout.pack(prompts, completions)
    assert packed.shape == (8, 4)
    torch.testing.assert_close(packed[5], prompts[1, 2])
    torch.testing.assert_close(packed[0], prompts[0, 1])
    torch.testing.assert_close(packed[7], completions[2, 1])


def test_unpack_completions(layout):
    values, mask = layout.unpack_completions(torch.arange(8) * 10)
    assert values.tolist() == [[20, 30], [40, 0], [60, 70], [0, 0]]
    assert mask.tolist() == [[True, True], [True, False], [True, True], [False, False]]
    only_completions, _ = layout.unpack_completions(torch.tensor([1, 2, 3, 4, 5]))
    assert only_completions.tolist() == [[1, 2], [3, 0], [4, 5], [0, 0]]


def test_from_padded_matches_from_lengths():
    prompt_mask = torch.tensor([[1, 1, 1], [0, 0, 1]])
    completion_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    layout = GroupLayout.from_padded(prompt_mask, completion_mask, group_sizes=[2, 2])
    assert layout.prefix_lens_list == (3, 1)
    assert layout.suffix_lens_per_group == [(2, 1), (3, 0)]


def test_from_padded_round_trip_of_log_prob_indices():
    """Log-probs read through the layout equal those read from the padded naive rows."""
    g = torch.Generator().manual_seed(0)
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    completion_mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    prompt_ids = torch.randint(1, 50, (2, 3), generator=g) * prompt_mask
    completion_ids = torch.randint(1, 50, (3, 3), generator=g) * completion_mask
    layout = GroupLayout.from_padded(prompt_mask, completion_mask, group_sizes=[2, 1])
    packed = layout.pack(prompt_ids, completion_ids)
    # Target of each completion token, and the token right before it in the naive row.
    targets = packed[layout.completion_positions()]
    predictors = packed[layout.completion_logit_positions()]
    expected_targets, expected_predictors = [], []
    group_of = [0, 0, 1]
    for j in range(3):
        prompt = prompt_ids[group_of[j]][prompt_mask[group_of[j]].bool()].tolist()
        completion = completion_ids[j][completion_mask[j].bool()].tolist()
        row = prompt + completion
        for s in range(len(completion)):
            expected_targets.append(row[len(prompt) + s])
            expected_predictors.append(row[len(prompt) + s - 1])
    assert targets.tolist() == expected_targets
    assert predictors.tolist() == expected_predictors


def test_to_device_is_identity_on_same_device(layout):
    assert layout.to("cpu") is layout
    assert layout.to("cpu:0") is layout


def test_device_is_normalized():
    """An index-less or indexed device name must compare equal to the tensors' device."""
    assert GroupLayout.from_lengths([2], [[1]], device="cpu:0").device == torch.zeros(1).device


@pytest.mark.parametrize(
    "prefix, suffix, match",
    [
        ([], [], "at least one group"),
        ([2, 3], [[1]], "one sequence of completion lengths per group"),
        ([0], [[1]], r"prefix_lens\[0\] = 0"),
        ([2], [[]], r"suffix_lens\[0\] is empty"),
        ([2], [[3, -1]], r"suffix_lens\[0\]\[1\] = -1"),
    ],
)
def test_from_lengths_errors(prefix, suffix, match):
    with pytest.raises(ValueError, match=match):
        GroupLayout.from_lengths(prefix, suffix)


def test_from_lengths_rejects_flat_or_scalar_lengths():
    with pytest.raises(TypeError, match=r"suffix_lens\[0\] must be a sequence of integers, got int 3"):
        GroupLayout.from_lengths([5], [3])
    with pytest.raises(TypeError, match="prefix_lens must be a sequence of integers, got int 5"):
        GroupLayout.from_lengths(5, [[3]])
    with pytest.raises(TypeError, match="suffix_lens must hold one sequence of completion lengths per group"):
        GroupLayout.from_lengths([5], 3)


def test_from_lengths_rejects_non_integers():
    with pytest.raises(TypeError, match="prefix_lens must hold integers"):
        GroupLayout.from_lengths([2.5], [[1]])
    with pytest.raises(TypeError, match="prefix_lens must hold integers"):
        GroupLayout.from_lengths(torch.tensor([2.0]), [[1]])


def test_from_padded_errors():
    good_prompt = torch.tensor([[0, 1]])
    good_completion = torch.tensor([[1, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        GroupLayout.from_padded(torch.tensor([[1, 0]]), good_completion, [1])
    with pytest.raises(ValueError, match="right-padded"):
        GroupLayout.from_padded(good_prompt, torch.tensor([[0, 1]]), [1])
    with pytest.raises(ValueError, match="group_sizes sums to 2"):
        GroupLayout.from_padded(good_prompt, good_completion, [2])
    with pytest.raises(ValueError, match=r"prompt_mask has 2 rows: expected one per group \(group_sizes has 1 "):
        GroupLayout.from_padded(torch.tensor([[0, 1], [1, 1]]), torch.ones(3, 1, dtype=torch.long), [3])
    with pytest.raises(ValueError, match=r"group_sizes\[1\] = 0: every group needs at least one completion"):
        GroupLayout.from_padded(torch.tensor([[0, 1], [1, 1]]), good_completion, [1, 0])
    with pytest.raises(ValueError, match="prompt_mask row 0 has no real token"):
        GroupLayout.from_padded(torch.tensor([[0, 0]]), good_completion, [1])
    with pytest.raises(ValueError, match="prompt_mask must be a 2-D tensor"):
        GroupLayout.from_padded(torch.tensor([1]), good_completion, [1])
    with pytest.raises(TypeError, match="completion_mask must be bool or integer"):
        GroupLayout.from_padded(good_prompt, good_completion.float(), [1])


def test_pack_and_unpack_errors(layout):
    with pytest.raises(ValueError, match=r"prompts has 3 rows, the layout needs 2 \(one per group\) or 4"):
        layout.pack(torch.zeros(3, 2, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="completions has length 1"):
        layout.pack(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected a tensor with 1 rows"):
        layout.pack([torch.zeros(2), torch.zeros(2)], torch.zeros(4, 2))
    with pytest.raises(ValueError, match="share trailing shape and dtype"):
        layout.pack(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="T=8 or num_completion_tokens=5 rows"):
        layout.unpack_completions(torch.zeros(6))
    with pytest.raises(TypeError, match="x must be a tensor with a leading token dim"):
        layout.unpack_completions([1, 2, 3, 4, 5])
    with pytest.raises(TypeError, match="x must be a tensor with a leading token dim"):
        layout.unpack_completions(torch.tensor(1.0))
    with pytest.raises(TypeError, match="must be an ordered sequence of integers, got a set"):
        GroupLayout.from_lengths({3, 4}, [[1], [2]])


@pytest.mark.parametrize("length", [np.float64(3.0), 3.0, torch.tensor(3.7), torch.tensor(3.0)])
def test_non_integer_lengths_are_refused(length):
    """Float lengths were truncated (3.7 became 3): a float length is a caller bug."""
    with pytest.raises(TypeError, match=r"prefix_lens must hold integers"):
        GroupLayout.from_lengths([length], [[1]])
    with pytest.raises(TypeError, match=r"suffix_lens\[0\] must hold integers"):
        GroupLayout.from_lengths([2], [[1, length]])


@pytest.mark.parametrize("container", [{(1,), (2, 3)}, {0: [1], 1: [2, 3]}])
def test_unordered_suffix_lens_are_refused(container):
    """A set of groups was accepted and reordered against prefix_lens."""
    with pytest.raises(TypeError, match="suffix_lens must be an ordered sequence"):
        GroupLayout.from_lengths([2, 3], container)


def test_impossible_sizes_are_refused_before_allocating():
    with pytest.raises(ValueError, match=r"prefix_lens\[0\] = 1099511627776 is larger than any packable length"):
        GroupLayout.from_lengths([2**40], [[1]])
    with pytest.raises(ValueError, match=r"suffix_lens\[0\]\[0\] = 1099511627776 is larger"):
        GroupLayout.from_lengths([1], [[2**40]])
    with pytest.raises(ValueError, match=r"packs 3221225472 tokens, more than any packable length"):
        GroupLayout.from_lengths([2**30, 2**30], [[2**30], [0]])


def test_pack_refuses_mixed_dtypes_and_devices(layout):
    """A list of prompts with different dtypes was cast silently to the first one's."""
    completions = torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"prompts\[1\] is a \(1,\) torch.int32 tensor on cpu but prompts\[0\] a "
                                         r"\(2,\) torch.int64 one"):
        layout.pack([torch.tensor([10, 11]), torch.tensor([20], dtype=torch.int32)], completions)
    with pytest.raises(ValueError, match=r"prompts\[1\] is a \(1,\) torch.int64 tensor on meta"):
        layout.pack([torch.tensor([10, 11]), torch.tensor([20], device="meta")], completions)


def test_first_completion_and_completion_mask(layout):
    assert layout.first_completion.tolist() == [0, 2]
    assert layout.completion_mask().tolist() == [[True, True], [True, False], [True, True], [False, False]]


# TRL / verl: one left-padded prompt row per completion, a group's rows consecutive.
TRL_PROMPT_IDS = torch.tensor([[0, 5, 6], [0, 5, 6], [7, 8, 9], [7, 8, 9], [7, 8, 9], [0, 0, 4]])
TRL_PROMPT_MASK = (TRL_PROMPT_IDS != 0).long()
TRL_COMPLETION_MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]])


def test_from_padded_groups_identical_consecutive_prompts():
    layout = GroupLayout.from_padded(TRL_PROMPT_MASK, TRL_COMPLETION_MASK, prompt_ids=TRL_PROMPT_IDS)
    assert layout.prefix_lens_list == (2, 3, 1)
    assert layout.suffix_lens_per_group == [(2, 1), (3, 1, 0), (2,)]
    given = GroupLayout.from_padded(TRL_PROMPT_MASK, TRL_COMPLETION_MASK, [2, 3, 1], prompt_ids=TRL_PROMPT_IDS)
    assert given.prefix_lens_list == layout.prefix_lens_list
    assert given.suffix_lens_per_group == layout.suffix_lens_per_group
    # Equal prompts that are not consecutive are different groups (TRL keeps a group's rows together).
    reordered = TRL_PROMPT_IDS[[0, 2, 1, 3, 4, 5]]
    apart = GroupLayout.from_padded((reordered != 0).long(), TRL_COMPLETION_MASK, prompt_ids=reordered)
    assert apart.group_sizes_list == (1, 1, 1, 2, 1)


def test_from_padded_one_row_per_completion_errors():
    with pytest.raises(ValueError, match=r"one row per completion \(N=6\) and no group_sizes: pass prompt_ids"):
        GroupLayout.from_padded(TRL_PROMPT_MASK, TRL_COMPLETION_MASK)
    with pytest.raises(ValueError, match="prompt rows 0 and 2 are given as one group but hold prompts of different "
                                         "lengths"):
        GroupLayout.from_padded(TRL_PROMPT_MASK, TRL_COMPLETION_MASK, [3, 2, 1])
    same_lengths = TRL_PROMPT_IDS.clone()
    same_lengths[3, 2] = 10
    with pytest.raises(ValueError, match="prompt rows 2 and 3 are given as one group but hold different prompts"):
        GroupLayout.from_padded(TRL_PROMPT_MASK, TRL_COMPLETION_MASK, [2, 3, 1], prompt_ids=same_lengths)
    with pytest.raises(ValueError, match="prompt rows 2 and 3 are given as one group but hold different prompts"):
        GroupLayout.from_padded(TRL_PROMPT_MASK, TRL_COMPLETION_MASK, [2, 3, 1], prompt_ids=same_lengths)
    with pytest.raises(ValueError, match="group_sizes is required unless prompt_mask has one row per completion"):
        GroupLayout.from_padded(TRL_PROMPT_MASK[:3], TRL_COMPLETION_MASK, prompt_ids=TRL_PROMPT_IDS[:3])
    with pytest.raises(TypeError, match="prompt_ids must be an integer tensor, got torch.float32"):
        GroupLayout.from_padded(TRL_PROMPT_MASK, TRL_COMPLETION_MASK, prompt_ids=TRL_PROMPT_IDS.float())
    with pytest.raises(ValueError, match=r"prompt_ids must match prompt_mask's shape \(6, 3\)"):
        GroupLayout.from_padded(TRL_PROMPT_MASK, TRL_COMPLETION_MASK, prompt_ids=TRL_PROMPT_IDS[:, 1:])


def test_pack_takes_one_prompt_row_per_completion():
    layout = GroupLayout.from_padded(TRL_PROMPT_MASK, TRL_COMPLETION_MASK, prompt_ids=TRL_PROMPT_IDS)
    completions = torch.arange(1, 19).reshape(6, 3) * TRL_COMPLETION_MASK
    one_per_group = TRL_PROMPT_IDS[[0, 2, 5]]
    expected = layout.pack(one_per_group, completions)
    assert expected.tolist() == [5, 6, 1, 2, 4, 7, 8, 9, 7, 8, 9, 10, 4, 16, 17]
    assert layout.pack(TRL_PROMPT_IDS, completions).tolist() == expected.tolist()
    as_list = [row[mask.bool()] for row, mask in zip(TRL_PROMPT_IDS, TRL_PROMPT_MASK)]
    assert layout.pack(as_list, completions).tolist() == expected.tolist()
    # Padding may differ between a group's rows; the prompt tokens may not.
    repadded = TRL_PROMPT_IDS.clone()
    repadded[1, 0] = 3
    assert layout.pack(repadded, completions).tolist() == expected.tolist()
    repadded[4, 2] = 3
    with pytest.raises(ValueError, match="prompts: rows 2 and 4 belong to group 1 but hold different prompts"):
        layout.pack(repadded, completions)


def test_segments_and_key_runs(layout):
    # packed: a0 a1 | x0 x1 | y0 | b0 | z0 z1 | (empty)
    assert layout.segments == (Segment(0, 2, -1), Segment(2, 2, 0), Segment(4, 1, 0),
                               Segment(5, 1, -1), Segment(6, 2, 3), Segment(8, 0, 3))
    # One segment per cu_seqlens entry, token_segment indexes them.
    assert [s.start for s in layout.segments] == layout.cu_seqlens.tolist()[:-1]
    for token, segment in enumerate(layout.token_segment.tolist()):
        start, length, _ = layout.segments[segment]
        assert start <= token < start + length
    assert layout.key_runs(0) == ((0, 2),)
    assert layout.key_runs(1) == ((0, 2), (2, 2))
    assert layout.key_runs(2) == ((0, 2), (4, 1))
    assert layout.key_runs(3) == ((5, 1),)
    assert layout.key_runs(4) == ((5, 1), (6, 2))
    assert layout.key_runs(5) == ((5, 1), (8, 0))
    assert layout.segmentation.groups == (range(0, 3), range(3, 6))
    assert layout.segmentation.nonempty() == [0, 1, 2, 3, 4]
    assert layout.segmentation.longest_row == 4  # a0 a1 x0 x1


def test_key_runs_match_the_attention_mask():
    from prefix_grouper.attention.reference import prefix_sharing_mask
    layout = GroupLayout.from_lengths([3, 1, 4], [[2, 0, 5], [1], [0, 3]])
    mask = prefix_sharing_mask(layout)
    for index, (start, length, _) in enumerate(layout.segments):
        keys = {k for run_start, run_length in layout.key_runs(index)
                for k in range(run_start, run_start + run_length)}
        for q in range(start, start + length):
            assert set(mask[q].nonzero().flatten().tolist()) == {k for k in keys if k <= q}


def test_segmentation_is_built_once_and_shared_with_host_lengths(layout):
    assert layout.segmentation is layout.segmentation
    assert segmentation_of(layout.host_lengths) is layout.segmentation


def test_segmentation_generalizes_to_nested_parents():
    # A prefix tree: root 0, a shared middle 1, two leaves under it, one leaf under the root.
    tree = Segmentation([Segment(0, 3, -1), Segment(3, 2, 0), Segment(5, 1, 1), Segment(6, 4, 1),
                         Segment(10, 2, 0), Segment(12, 1, -1), Segment(13, 2, 5)])
    assert tree.key_runs(3) == ((0, 3), (3, 2), (6, 4))
    assert tree.key_runs(4) == ((0, 3), (10, 2))
    assert tree.groups == (range(0, 5), range(5, 7))
    assert tree.longest_row == 9 and tree.total_tokens == 15


@pytest.mark.parametrize("segments, match", [
    ([Segment(0, 2, 0)], "parent 0"),
    ([Segment(1, 2, -1)], "does not continue"),
    ([Segment(0, 2, -1), Segment(2, 1, 3)], "parent 3"),
    ([Segment(0, -1, -1)], "length -1"),
    ([Segment(0, 2, -1), Segment(2, 1, -1), Segment(3, 1, 0)], "before its group's root 1"),
])
def test_segmentation_errors(segments, match):
    with pytest.raises(ValueError, match=match):
        Segmentation(segments)


def test_cache_has_one_key_format(layout):
    built = []
    value = layout.cached(("probe", 4), lambda: built.append(1) or "x")
    assert value == "x" and layout.cached(("probe", 4), lambda: "y") == "x"
    assert cached_per_layout(layout.host_lengths, ("probe", 4), lambda: "z") == "x" and built == [1]
    # A bare name is the key (name,).
    assert layout.cached("probe_name", lambda: 1) == layout.cached(("probe_name",), lambda: 2) == 1
    for bad in (("probe",)[0:0], (4, "probe"), 7):
        with pytest.raises(TypeError, match="key must be"):
            layout.cached(bad, lambda: None)


def test_layout_micro_batch_groups():
    # Group tokens: 3 + 2 + 1 = 6, 1 + 4 = 5, 2 + 0 + 0 + 1 = 3; rows 2, 1, 3.
    layout = GroupLayout.from_lengths([3, 1, 2], [[2, 1], [4], [0, 0, 1]])
    assert layout.micro_batch_groups(max_rows=3) == [range(0, 2), range(2, 3)]
    assert layout.micro_batch_groups(max_tokens=8) == [range(0, 1), range(1, 3)]
    assert layout.micro_batch_groups(max_rows=3, max_tokens=5) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(ValueError, match="max_rows and/or max_tokens"):
        layout.micro_batch_groups()
