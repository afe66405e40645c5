"""Cutting a rank's batch into micro-batches of packed tokens, and giving ranks whole groups
(host-side; no verl import).

* :func:`token_budget_micro_batches` (``use_dynamic_bsz=True``): samples in lexicographic
  order (sharing samples are neighbours), cut into runs of at most ``max_tokens`` packed
  (tree) tokens; a cut never falls inside a group, or between samples sharing a run, while
  the whole run fits the budget.
* :func:`group_count_micro_batches` (``micro_batch_size_per_gpu``): consecutive groups,
  ``groups_per_micro_batch`` of them per micro-batch, in order.
* Both take ``count``: the number of micro-batches every data-parallel rank must run (the
  largest any rank needs; FSDP hangs when ranks run different numbers): the largest
  micro-batches are halved until there are that many.
* :func:`balanced_group_order`: the trainer's order giving data-parallel ranks whole groups
  (same prompt uid), balanced by packed tokens.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .tree import SortedSamples, group_sizes_of

__all__ = ["balanced_group_order", "group_count_micro_batches", "token_budget_micro_batches"]


def _halve(parts: list[list[int]], cuts_of, count: int, what: str) -> list[list[int]]:
    """Split the part of most samples in two (at its preferred cut, ``cuts_of(part)``, nearest
    its middle) until there are ``count`` parts."""
    parts = [list(p) for p in parts]
    while len(parts) < count:
        index = max(range(len(parts)), key=lambda k: len(parts[k]))
        part = parts[index]
        if len(part) < 2:
            raise ValueError(f"every data-parallel rank must run {count} micro-batches (the most any rank needs), "
                             f"but this rank holds only {sum(map(len, parts))} samples in {what}: balance the "
                             f"ranks' batches (the trainer's balancing does) or raise the budget")
        cut = min(cuts_of(part) or range(1, len(part)), key=lambda c: abs(2 * c - len(part)))
        parts[index:index + 1] = [part[:cut], part[cut:]]
    return parts


def token_budget_micro_batches(tokens: list[np.ndarray], prompt_lens: Sequence[int], max_tokens: int,
                               count: int = 1) -> list[list[int]]:
    """Sample indices of each micro-batch: at most ``max_tokens`` packed tokens each, at least
    ``count`` micro-batches (see the module docstring). ``tokens``: every sample's ids (host).

    Sorted samples are joined while they fit: runs sharing nothing with their neighbours
    first; a run over the budget is cut between its groups, a group over the budget between
    its samples."""
    if max_tokens < 1:
        raise ValueError(f"max_token_len_per_gpu must give a positive token budget, got {max_tokens}")
    longest = max(range(len(tokens)), key=lambda i: len(tokens[i]))
    if len(tokens[longest]) > max_tokens:
        raise ValueError(f"sample {longest} has {len(tokens[longest])} tokens, more than the micro-batch budget of "
                         f"{max_tokens} packed tokens (max_token_len_per_gpu x ulysses_sequence_parallel_size)")
    samples = SortedSamples(tokens, [int(p) for p in prompt_lens])
    # How strongly sorted neighbours hold together: 2 in one group, 1 sharing a run, 0 not.
    bond = np.where(samples.in_group(0, len(tokens)), 2, np.where(samples.shared() > 0, 1, 0)).tolist()

    def pieces(start: int, stop: int, level: int) -> list[tuple[int, int]]:
        """Sorted run ``start:stop`` cut wherever the bond is below ``level``."""
        cuts = [j + 1 for j in range(start, stop - 1) if bond[j] < level]
        return list(zip([start] + cuts, cuts + [stop]))

    def pack(runs: list[tuple[int, int]], level: int) -> list[tuple[int, int]]:
        """Consecutive runs joined while they fit; a run over the budget is cut at the next level."""
        parts: list[tuple[int, int]] = []
        for start, stop in runs:
            if parts and samples.packed_tokens(parts[-1][0], stop) <= max_tokens:
                parts[-1] = (parts[-1][0], stop)
            elif samples.packed_tokens(start, stop) <= max_tokens:
                parts.append((start, stop))
            else:
                parts += pack(pieces(start, stop, level + 1), level + 1)
        return parts

    parts = [list(range(start, stop)) for start, stop in pack(pieces(0, len(tokens), 1), 1)]

    def cuts_of(part):  # halves cut at the weakest bond
        bonds = [bond[j - 1] for j in part[1:]]
        return [k + 1 for k, b in enumerate(bonds) if b == min(bonds)]

    parts = _halve(parts, cuts_of, count, "its token-budget micro-batches")
    for part in parts:  # a half can lose a group partner and with it a shared prompt run
        if samples.packed_tokens(part[0], part[-1] + 1) > max_tokens:
            raise ValueError(f"a micro-batch packs {samples.packed_tokens(part[0], part[-1] + 1)} tokens after the "
                             f"split for an equal micro-batch count over ranks, over the budget of {max_tokens}")
    return [[samples.order[j] for j in part] for part in parts]


def group_count_micro_batches(tokens: list[np.ndarray], prompt_lens: Sequence[int], groups_per_micro_batch: int,
                              count: int = 1) -> list[list[int]]:
    """Sample indices of each micro-batch: ``groups_per_micro_batch`` consecutive groups
    (samples with the same prompt), in order; at least ``count`` micro-batches."""
    if groups_per_micro_batch < 1:
        raise ValueError(f"micro_batch_size_per_gpu must be >= 1, got {groups_per_micro_batch}")
    sizes = group_sizes_of([torch.from_numpy(t) for t in tokens], [int(p) for p in prompt_lens])
    starts = np.cumsum([0] + sizes).tolist()
    parts = [list(range(starts[g], starts[min(g + groups_per_micro_batch, len(sizes))]))
             for g in range(0, len(sizes), groups_per_micro_batch)]
    group_starts = set(starts)
    return _halve(parts, lambda part: [k for k in range(1, len(part)) if part[k] in group_starts], count,
                  "its micro-batches of whole groups")


def balanced_group_order(keys: list, seq_lens: list[int], dp_size: int, prompt_lens: list[int] | None = None,
                         ) -> list[int]:
    """Sample order giving every data-parallel rank (an equal, contiguous slice of
    ``len(keys) / dp_size`` samples) whole groups where they fit, balanced by packed tokens.

    Samples are grouped by prompt uid, the part of their TransferQueue key
    (``{uid}_{session}_{index}``) before the first ``_``; groups of any size (one sample per
    agent step, GiGPO, filtered groups) are accepted. A group's packed tokens are its
    samples' tokens with its shortest prompt counted once (``prompt_lens`` given; else every
    sample's tokens). Heaviest group first, each goes whole to the least loaded rank with
    room for it; a group no rank has room for is spread over the least loaded ranks with room.
    A group keeps its samples in their order.
    """
    if len(keys) % dp_size:
        raise ValueError(f"the batch of {len(keys)} samples must divide by the data-parallel size {dp_size}")
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(str(key).split("_", 1)[0], []).append(i)
    members = list(groups.values())

    def packed(m):
        total = sum(seq_lens[i] for i in m)
        return total if prompt_lens is None else total - (len(m) - 1) * min(prompt_lens[i] for i in m)

    tokens = [packed(m) for m in members]
    per_token = [t / len(m) for t, m in zip(tokens, members)]
    capacity = [len(keys) // dp_size] * dp_size
    ranks: list[list[int]] = [[] for _ in range(dp_size)]
    loads = [0.0] * dp_size
    for g in sorted(range(len(members)), key=lambda g: (-tokens[g], g)):
        rest = list(members[g])
        while rest:
            fitting = [r for r in range(dp_size) if capacity[r] >= len(rest)]
            rank = min(fitting or [r for r in range(dp_size) if capacity[r] > 0], key=lambda r: (loads[r], r))
            take = rest[:capacity[rank]]
            rest = rest[len(take):]
            ranks[rank] += take
            capacity[rank] -= len(take)
            loads[rank] += per_token[g] * len(take)
    return [i for rank in ranks for i in rank]
