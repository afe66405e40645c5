"""Cutting a batch of prefix groups into whole groups: host-side arithmetic on Python ints.

A batch holds its groups one after the other: group ``g`` owns ``group_sizes[g]`` consecutive
rows (one per completion). These helpers never touch a device, so they never synchronize one.
"""
from __future__ import annotations

from typing import Sequence

from .checks import as_length_list, check_int


def _group_sizes(group_sizes: Sequence[int]) -> list[int]:
    sizes = as_length_list(group_sizes, "group_sizes")
    for g, size in enumerate(sizes):
        if size < 1:
            raise ValueError(f"group_sizes[{g}] = {size}: every group must have at least one completion row")
    return sizes


def group_row_ranges(group_sizes: Sequence[int]) -> list[range]:
    """The rows of each group in a batch laid out group after group.

    ``group_row_ranges([2, 3]) == [range(0, 2), range(2, 5)]``.
    """
    ranges, row = [], 0
    for size in _group_sizes(group_sizes):
        ranges.append(range(row, row + size))
        row += size
    return ranges


def micro_batch_groups(group_sizes: Sequence[int], *, max_rows: int | None = None,
                       tokens_per_group: Sequence[int] | None = None,
                       max_tokens: int | None = None) -> list[range]:
    """Consecutive whole groups per micro-batch, as ranges of group indices.

    Each micro-batch holds at most ``max_rows`` rows and/or ``max_tokens`` packed tokens, where
    ``tokens_per_group[g]`` is group ``g``'s packed length (its prefix once plus its completions).
    A group is never split: one over a budget runs alone in its own micro-batch. At least one
    budget must be given; ``tokens_per_group`` goes with ``max_tokens`` and only with it.

    ``micro_batch_groups([2, 2, 6, 1], max_rows=4) == [range(0, 2), range(2, 3), range(3, 4)]``.
    """
    sizes = _group_sizes(group_sizes)
    if max_rows is None and max_tokens is None:
        raise ValueError("micro_batch_groups needs a budget: give max_rows and/or max_tokens")
    if max_rows is not None:
        max_rows = check_int(max_rows, "max_rows", 1)
    if (max_tokens is None) != (tokens_per_group is None):
        given, missing = ("max_tokens", "tokens_per_group") if tokens_per_group is None else (
            "tokens_per_group", "max_tokens")
        raise ValueError(f"{given} was given without {missing}: a token budget needs both")
    tokens: list[int] = []
    if max_tokens is not None:
        max_tokens = check_int(max_tokens, "max_tokens", 1)
        tokens = as_length_list(tokens_per_group, "tokens_per_group")
        if len(tokens) != len(sizes):
            raise ValueError(f"tokens_per_group has {len(tokens)} entries but group_sizes has {len(sizes)} groups")
        for g, count in enumerate(tokens):
            if count < 1:
                raise ValueError(f"tokens_per_group[{g}] = {count}: a group packs at least one token")

    batches: list[range] = []
    first = rows = used_tokens = 0
    for g, size in enumerate(sizes):
        over_rows = max_rows is not None and rows + size > max_rows
        over_tokens = max_tokens is not None and used_tokens + tokens[g] > max_tokens
        if g > first and (over_rows or over_tokens):
            batches.append(range(first, g))
            first, rows, used_tokens = g, 0, 0
        rows += size
        used_tokens += tokens[g] if tokens else 0
    if sizes:
        batches.append(range(first, len(sizes)))
    return batches
