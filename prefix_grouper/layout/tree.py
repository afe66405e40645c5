"""The radix tree of a batch of token sequences, in the packed (pre-order) segment form.

Sorting the sequences lexicographically puts the ones that share a prefix next to each
other; the longest common prefix (LCP) of sorted neighbours (one vectorized comparison per
pair) is all a stack pass over the N sequences needs to build the tree (the classic
LCP-interval construction): no Python loop over tokens.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from ..checks import MAX_LENGTH, check_int
from .segmentation import Segment

__all__ = ["SequenceTree", "checked_sequences", "sequence_tree", "tree_from_groups"]


class SequenceTree(NamedTuple):
    """``segments`` in packed pre-order; ``sequence_segments[i]``: the segment where
    sequence ``i`` ends (its path from a root holds exactly its tokens)."""
    segments: list[Segment]
    sequence_segments: list[int]


def checked_sequences(sequences: Any, name: str = "sequences") -> list[np.ndarray]:
    """Every sequence as a 1-D int64 host array of token ids (>= 0, at least one token)."""
    if isinstance(sequences, torch.Tensor) or not isinstance(sequences, (list, tuple)):
        raise TypeError(f"{name} must be a list of 1-D integer tensors or lists, one token sequence each; "
                        f"got {type(sequences).__name__}")
    if not sequences:
        raise ValueError(f"{name} is empty: a layout needs at least one sequence")
    out = []
    for i, sequence in enumerate(sequences):
        if isinstance(sequence, torch.Tensor):
            if sequence.dtype.is_floating_point or sequence.dtype.is_complex or sequence.dtype == torch.bool:
                raise TypeError(f"{name}[{i}] must hold integer token ids, got {sequence.dtype}")
            array = sequence.detach().cpu().numpy()  # its own dtype: a uint64 id above 2**63 stays positive
        else:
            if isinstance(sequence, (list, tuple)) and sequence and all(type(x) is int for x in sequence):
                # numpy would make mixed int64/uint64 ints float64: check the range on the ints.
                if max(sequence) > np.iinfo(np.int64).max:
                    raise ValueError(f"{name}[{i}] holds token id {max(sequence)}, above the largest int64 "
                                     f"({np.iinfo(np.int64).max}): token ids are int64")
            try:
                array = np.asarray(sequence)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"{name}[{i}] must be a 1-D sequence of integer token ids") from exc
            if array.size and array.dtype.kind not in "iu":
                raise TypeError(f"{name}[{i}] must hold integer token ids, got {array.dtype}")
        if array.size and array.dtype.kind == "u" and array.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{name}[{i}] holds token id {int(array.max())}, above the largest int64 "
                             f"({np.iinfo(np.int64).max}): token ids are int64")
        array = array.astype(np.int64)
        if array.ndim != 1:
            raise ValueError(f"{name}[{i}] must be 1-D, got shape {tuple(array.shape)}")
        if array.size == 0:
            raise ValueError(f"{name}[{i}] is empty: every sequence needs at least one token")
        if array.min() < 0:
            raise ValueError(f"{name}[{i}] holds a negative token id {int(array.min())}: ids must be >= 0")
        out.append(array)
    return out


def _sorted_lcp(tokens: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """``(order, lcp)``: the sequences in lexicographic order (a prefix before its
    extensions) and ``lcp[j]`` = common prefix length of sorted sequences ``j`` and ``j+1``."""
    lengths = np.array([len(t) for t in tokens])
    if len(tokens) * int(lengths.max()) <= 4 * int(lengths.sum()) + (1 << 20):
        padded = np.full((len(tokens), int(lengths.max())), -1, dtype=np.int64)  # -1 sorts before every id
        for row, t in enumerate(tokens):
            padded[row, :len(t)] = t
        order = np.lexsort(padded.T[::-1])
    else:  # very ragged: a padded copy would dwarf the tokens
        order = np.array(sorted(range(len(tokens)), key=lambda i: tokens[i].tolist()), dtype=np.int64)
    lcp = []
    for a, b in zip(order[:-1].tolist(), order[1:].tolist()):
        n = min(len(tokens[a]), len(tokens[b]))
        differ = np.flatnonzero(tokens[a][:n] != tokens[b][:n])
        lcp.append(int(differ[0]) if differ.size else n)
    return order, lcp


def sequence_tree(tokens: list[np.ndarray], min_shared: int = 1) -> SequenceTree:
    """The radix tree of ``tokens`` (see ``GroupLayout.from_sequences``)."""
    min_shared = check_int(min_shared, "min_shared", 1)
    order, lcp = _sorted_lcp(tokens)
    lengths = [len(t) for t in tokens]
    # Trie nodes: the string depth where each one ends, its children in lexicographic
    # order, the sequences ending on it; the virtual root (-1) has depth 0.
    depth: list[int] = []
    children: list[list[int]] = []
    ending: list[list[int]] = []
    root_children: list[int] = []

    def kids(node: int) -> list[int]:
        return root_children if node == -1 else children[node]

    def new_node(end: int) -> int:
        depth.append(end), children.append([]), ending.append([])
        return len(depth) - 1

    path: list[int] = [-1]  # the previous sequence's nodes, from the virtual root
    for j, sequence in enumerate(order.tolist()):
        shared = lcp[j - 1] if j else 0
        popped = -1
        while path[-1] != -1 and depth[path[-1]] > shared:
            popped = path.pop()
        if (depth[path[-1]] if path[-1] != -1 else 0) < shared:
            # The previous path runs past the shared part inside node `popped`: split it.
            # `popped` is the last child of path[-1] (the previous sequence's branch).
            split = new_node(shared)
            kids(path[-1])[-1] = split
            children[split].append(popped)
            path.append(split)
        if lengths[sequence] > shared:
            leaf = new_node(lengths[sequence])
            kids(path[-1]).append(leaf)
            path.append(leaf)
        ending[path[-1]].append(sequence)

    # Pre-order, dissolving shared nodes shorter than min_shared into their children (each
    # child then starts where the dissolved node started; sequences ending on it get a copy).
    segments: list[Segment] = []
    sequence_segments = [0] * len(tokens)
    start = 0
    stack = [(node, -1, 0, False) for node in reversed(root_children)]
    while stack:
        node, out_parent, first, as_leaf = stack.pop()
        if not as_leaf and children[node] and depth[node] - first < min_shared:
            stack.extend((child, out_parent, first, False) for child in reversed(children[node]))
            if ending[node]:
                stack.append((node, out_parent, first, True))
            continue
        index = len(segments)
        segments.append(Segment(start, depth[node] - first, out_parent))
        start += depth[node] - first
        for sequence in ending[node]:
            sequence_segments[sequence] = index
        if not as_leaf:
            stack.extend((child, index, depth[node], False) for child in reversed(children[node]))
    if start > MAX_LENGTH:
        raise ValueError(f"the layout packs {start} tokens, more than any packable length ({MAX_LENGTH}); "
                         f"split the batch")
    return SequenceTree(segments, sequence_segments)


def tree_from_groups(prompt_tokens: list[np.ndarray], suffix_lens_per_group: Sequence[Sequence[int]],
                     min_shared: int = 1) -> SequenceTree:
    """The radix tree of the group prompts with every group's completions as leaves under
    its prompt's node, right after it (still a pre-order); its sequences are the
    completions, in order."""
    prompts = sequence_tree(prompt_tokens, min_shared)
    completions_of: dict[int, list[tuple[int, int]]] = {}
    completion = 0
    for group, suffix_lens in enumerate(suffix_lens_per_group):
        for suffix_len in suffix_lens:
            completions_of.setdefault(prompts.sequence_segments[group], []).append((completion, suffix_len))
            completion += 1
    segments: list[Segment] = []
    new_index: list[int] = []
    sequence_segments = [0] * completion
    start = 0
    for index, (_, length, up) in enumerate(prompts.segments):
        new_index.append(len(segments))
        segments.append(Segment(start, length, -1 if up == -1 else new_index[up]))
        start += length
        for sequence, suffix_len in completions_of.get(index, []):
            sequence_segments[sequence] = len(segments)
            segments.append(Segment(start, suffix_len, new_index[index]))
            start += suffix_len
    return SequenceTree(segments, sequence_segments)
