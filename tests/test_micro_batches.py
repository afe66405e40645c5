"""Host-side segmentation helpers: whole groups per micro-batch under row and token budgets."""
import pytest

from prefix_grouper.micro_batches import group_row_ranges, micro_batch_groups


def test_group_row_ranges():
    assert group_row_ranges([2, 3, 1]) == [range(0, 2), range(2, 5), range(5, 6)]
    assert group_row_ranges([1]) == [range(0, 1)]
    assert group_row_ranges([]) == []


def test_budget_by_rows():
    assert micro_batch_groups([4, 2, 3, 1], max_rows=4) == [range(0, 1), range(1, 2), range(2, 4)]
    assert micro_batch_groups([2, 2, 6, 1], max_rows=4) == [range(0, 2), range(2, 3), range(3, 4)]
    assert micro_batch_groups([3, 3], max_rows=100) == [range(0, 2)]


def test_budget_by_tokens():
    # Group 1 (9 tokens) fits after group 0 (5) in 14 but not with group 2 too.
    assert micro_batch_groups([2, 2, 2], tokens_per_group=[5, 9, 4], max_tokens=14) == [range(0, 2), range(2, 3)]
    assert micro_batch_groups([1, 1, 1], tokens_per_group=[3, 3, 3], max_tokens=6) == [range(0, 2), range(2, 3)]


def test_both_budgets_bind():
    # Rows cut after group 1 (3 + 2 = 5 rows); tokens cut after group 2 alone.
    got = micro_batch_groups([3, 2, 1, 1], max_rows=5, tokens_per_group=[4, 4, 20, 2], max_tokens=21)
    assert got == [range(0, 2), range(2, 3), range(3, 4)]
    got = micro_batch_groups([1, 1, 1], max_rows=2, tokens_per_group=[1, 1, 1], max_tokens=100)
    assert got == [range(0, 2), range(2, 3)]


def test_oversize_group_runs_alone():
    assert micro_batch_groups([1, 9, 1], max_rows=4) == [range(0, 1), range(1, 2), range(2, 3)]
    assert micro_batch_groups([1, 1, 1], tokens_per_group=[2, 50, 2], max_tokens=10) == [
        range(0, 1), range(1, 2), range(2, 3)]
    assert micro_batch_groups([9], max_rows=1) == [range(0, 1)]


def test_every_group_once_in_order():
    sizes = [3, 1, 4, 1, 5, 9, 2, 6]
    tokens = [11, 3, 20, 7, 13, 40, 5, 17]
    for max_rows in (1, 4, 7, 100):
        for max_tokens in (1, 25, 60, 1000):
            batches = micro_batch_groups(sizes, max_rows=max_rows, tokens_per_group=tokens, max_tokens=max_tokens)
            assert [g for b in batches for g in b] == list(range(len(sizes)))
            for b in batches:
                if len(b) > 1:
                    assert sum(sizes[g] for g in b) <= max_rows
                    assert sum(tokens[g] for g in b) <= max_tokens


def test_empty_batch():
    assert micro_batch_groups([], max_rows=4) == []
    assert micro_batch_groups([], tokens_per_group=[], max_tokens=4) == []


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(group_sizes=[2]), ValueError, "max_rows and/or max_tokens"),
    (dict(group_sizes=[2], max_rows=0), ValueError, "max_rows"),
    (dict(group_sizes=[2], max_rows=2.0), TypeError, "max_rows"),
    (dict(group_sizes=[2], max_tokens=5), ValueError, "tokens_per_group"),
    (dict(group_sizes=[2], max_rows=2, tokens_per_group=[5]), ValueError, "max_tokens"),
    (dict(group_sizes=[2], tokens_per_group=[5, 6], max_tokens=5), ValueError, "tokens_per_group has 2"),
    (dict(group_sizes=[2], tokens_per_group=[0], max_tokens=5), ValueError, r"tokens_per_group\[0\]"),
    (dict(group_sizes=[2], tokens_per_group=[5], max_tokens=0), ValueError, "max_tokens"),
    (dict(group_sizes=[2, 0], max_rows=2), ValueError, r"group_sizes\[1\]"),
    (dict(group_sizes=[2, 1.5], max_rows=2), TypeError, "group_sizes"),
    (dict(group_sizes={2, 3}, max_rows=2), TypeError, "group_sizes"),
])
def test_validation_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        micro_batch_groups(**kwargs)


def test_group_row_ranges_validation():
    with pytest.raises(ValueError, match=r"group_sizes\[0\]"):
        group_row_ranges([0])
    with pytest.raises(TypeError, match="group_sizes"):
        group_row_ranges(3)
