"""Building a layout: checked lengths from Python lengths or from padded masks (one row per
group, or one row per completion as TRL and verl hold a batch), and the index tensors.

:class:`~prefix_grouper.layout.GroupLayout`'s constructors delegate here; nothing here
knows the class, so the object module stays about what a layout answers.
"""
from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any, Sequence

import numpy as np
import torch

from ..checks import MAX_LENGTH, as_length_list
from .host import split_by_group
from .segmentation import Segmentation
from .tree import SequenceTree, tree_from_groups

__all__ = ["checked_lengths", "completion_tensors", "flat_tensors", "group_prompt_tokens", "lengths_from_padded",
           "padded_batch_tree", "prompt_group_of_tokens", "sequence_tables", "tree_index_tensors"]


def checked_lengths(prefix_lens: Sequence[int],
                    suffix_lens: Sequence[Sequence[int]]) -> tuple[list[int], list[list[int]]]:
    """``(prefix_lens, suffix_lens per group)`` as Python ints, every error naming its argument."""
    prefix = as_length_list(prefix_lens, "prefix_lens")
    if isinstance(suffix_lens, (int, float, str, bytes)) or not hasattr(suffix_lens, "__len__"):
        raise TypeError(f"suffix_lens must hold one sequence of completion lengths per group, "
                        f"got {type(suffix_lens).__name__}")
    if isinstance(suffix_lens, (Set, Mapping)):
        # A set has no group order to line up with prefix_lens (and drops repeats).
        raise TypeError(f"suffix_lens must be an ordered sequence (one entry per group), "
                        f"got a {type(suffix_lens).__name__}")
    if len(prefix) == 0:
        raise ValueError("prefix_lens is empty: a layout needs at least one group")
    if len(suffix_lens) != len(prefix):
        raise ValueError(f"suffix_lens must list one sequence of completion lengths per group: "
                         f"got {len(suffix_lens)} entries for {len(prefix)} prefixes")
    groups = [as_length_list(s, f"suffix_lens[{b}]") for b, s in enumerate(suffix_lens)]
    for b, p in enumerate(prefix):
        if p < 1:
            raise ValueError(f"prefix_lens[{b}] = {p}: every prefix needs at least 1 token (its last "
                             f"token predicts the first completion token); prepend a BOS token")
    for b, g in enumerate(groups):
        if len(g) == 0:
            raise ValueError(f"suffix_lens[{b}] is empty: every group needs at least one completion")
        for i, s in enumerate(g):
            if s < 0:
                raise ValueError(f"suffix_lens[{b}][{i}] = {s}: completion lengths must be >= 0")
    total = sum(prefix) + sum(sum(g) for g in groups)
    if total > MAX_LENGTH:
        raise ValueError(f"the layout packs {total} tokens, more than any packable length ({MAX_LENGTH}); "
                         f"split the batch")
    return prefix, groups


# ---------------------------------------------------------------------- from padded masks
def _check_inputs(prompt_mask: Any, completion_mask: Any, prompt_ids: Any) -> None:
    for name, mask in (("prompt_mask", prompt_mask), ("completion_mask", completion_mask)):
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{name} must be a 2-D tensor, got {shape}")
        if mask.dtype.is_floating_point:
            raise TypeError(f"{name} must be bool or integer, got {mask.dtype}")
    if completion_mask.device != prompt_mask.device:
        raise ValueError(f"prompt_mask is on {prompt_mask.device} but completion_mask on {completion_mask.device}")
    if prompt_ids is None:
        return
    if (not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dtype.is_floating_point
            or prompt_ids.dtype.is_complex or prompt_ids.dtype == torch.bool):
        kind = prompt_ids.dtype if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__
        raise TypeError(f"prompt_ids must be an integer tensor, got {kind}")
    if prompt_ids.shape != prompt_mask.shape or prompt_ids.device != prompt_mask.device:
        raise ValueError(f"prompt_ids must match prompt_mask's shape {tuple(prompt_mask.shape)} and device "
                         f"{prompt_mask.device}, got {tuple(prompt_ids.shape)} on {prompt_ids.device}")


def _real_token_counts(pm: torch.Tensor, cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real tokens per prompt row and per completion row, after checking the padding sides
    (padding on the wrong side would make pack() pick the wrong tokens)."""
    prompt_counts, completion_counts = pm.sum(1), cm.sum(1)
    prompt_cols = torch.arange(pm.shape[1], device=pm.device)
    completion_cols = torch.arange(cm.shape[1], device=cm.device)
    if not bool((pm == (prompt_cols[None] >= pm.shape[1] - prompt_counts[:, None])).all()):
        raise ValueError("prompt_mask must be left-padded: zeros first, then ones, in every row")
    if not bool((cm == (completion_cols[None] < completion_counts[:, None])).all()):
        raise ValueError("completion_mask must be right-padded: ones first, then zeros, in every row")
    empty_prompts = (prompt_counts == 0).nonzero().flatten().tolist()
    if empty_prompts:
        raise ValueError(f"prompt_mask row {empty_prompts[0]} has no real token: every prompt needs at "
                         f"least 1 (its last token predicts the first completion token)")
    return prompt_counts, completion_counts


class _PromptRows:
    """Compares prompt rows: same mask, and same ids under it when ids are given."""

    def __init__(self, pm: torch.Tensor, prompt_ids: torch.Tensor | None) -> None:
        self.pm, self.prompt_ids = pm, prompt_ids

    def same(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``[len(a)]`` bool: prompt rows ``a`` and ``b`` hold the same prompt."""
        same = (self.pm[a] == self.pm[b]).all(1)
        if self.prompt_ids is not None:
            same &= ((self.prompt_ids[a] == self.prompt_ids[b]) | ~self.pm[a]).all(1)
        return same


def _sizes_from_repeated_prompts(prompts: _PromptRows, rows: int) -> list[int]:
    """Group sizes when consecutive rows holding identical prompts form a group."""
    index = torch.arange(rows, device=prompts.pm.device)
    new_group = torch.ones(rows, dtype=torch.bool, device=prompts.pm.device)
    new_group[1:] = ~prompts.same(index[1:], index[:-1])
    starts = new_group.nonzero().flatten().tolist() + [rows]
    return [b - a for a, b in zip(starts[:-1], starts[1:])]


def _checked_group_sizes(group_sizes: Any, rows: int, num_completions: int) -> list[int]:
    sizes = as_length_list(group_sizes, "group_sizes")
    for b, g in enumerate(sizes):
        if g < 1:
            raise ValueError(f"group_sizes[{b}] = {g}: every group needs at least one completion")
    if sum(sizes) != num_completions:
        raise ValueError(f"group_sizes sums to {sum(sizes)} but completion_mask has {num_completions} rows")
    if rows not in (len(sizes), num_completions):
        raise ValueError(f"prompt_mask has {rows} rows: expected one per group (group_sizes has "
                         f"{len(sizes)} entries) or one per completion ({num_completions})")
    return sizes


def _first_rows_of_groups(prompts: _PromptRows, sizes: list[int]) -> list[int]:
    """With one prompt row per completion: the first row of every group, after checking
    that every group's rows repeat it."""
    rows = sum(sizes)
    size_t = torch.tensor(sizes, device=prompts.pm.device)
    group_first = torch.cumsum(size_t, 0) - size_t
    first = torch.repeat_interleave(group_first, size_t, output_size=rows)
    differs = (~prompts.same(torch.arange(rows, device=prompts.pm.device), first)).nonzero().flatten().tolist()
    if differs:
        r = differs[0]
        what = "different prompts" if prompts.prompt_ids is not None else "prompts of different lengths"
        raise ValueError(f"prompt rows {int(first[r])} and {r} are given as one group but hold {what}")
    return group_first.tolist()


def lengths_from_padded(prompt_mask: torch.Tensor, completion_mask: torch.Tensor, group_sizes: Any,
                        prompt_ids: torch.Tensor | None) -> tuple[list[int], list[tuple[int, ...]]]:
    """``(prefix_lens, suffix_lens per group)`` of padded masks (see ``GroupLayout.from_padded``)."""
    _check_inputs(prompt_mask, completion_mask, prompt_ids)
    pm, cm = prompt_mask.bool(), completion_mask.bool()
    prompt_counts, completion_counts = _real_token_counts(pm, cm)
    rows, num_completions = pm.shape[0], cm.shape[0]
    prompts = _PromptRows(pm, prompt_ids)
    if group_sizes is not None:
        sizes = _checked_group_sizes(group_sizes, rows, num_completions)
    elif rows != num_completions:
        raise ValueError(f"group_sizes is required unless prompt_mask has one row per completion: it has "
                         f"{rows} rows, completion_mask {num_completions}")
    elif prompt_ids is None:
        raise ValueError(f"prompt_mask has one row per completion (N={num_completions}) and no group_sizes: "
                         f"pass prompt_ids (consecutive rows with identical prompts form a group) or "
                         f"group_sizes")
    else:
        sizes = _sizes_from_repeated_prompts(prompts, rows)
    prefix_lens = prompt_counts.tolist()
    if rows == num_completions and len(sizes) != rows:
        prefix_lens = [prefix_lens[row] for row in _first_rows_of_groups(prompts, sizes)]
    return prefix_lens, split_by_group(completion_counts.tolist(), sizes)


def padded_batch_tree(prompt_mask: torch.Tensor, completion_mask: torch.Tensor, group_sizes: Any,
                      prompt_ids: torch.Tensor | None, share_across_groups: bool | None, min_shared: int | None,
                      default_min_shared: int) -> tuple[list[int], list[tuple[int, ...]], SequenceTree | None]:
    """``(prefix_lens, suffix_lens per group, tree)`` of ``GroupLayout.from_padded``'s
    arguments (its docstring states them): ``tree`` is the prompts' prefix tree with every
    completion a leaf, or None when no run is shared across groups (the flat layout)."""
    prefix_lens, suffix_lens = lengths_from_padded(prompt_mask, completion_mask, group_sizes, prompt_ids)
    if share_across_groups is None:
        share_across_groups = prompt_ids is not None
    if not share_across_groups:
        if min_shared is not None:
            raise ValueError(f"min_shared = {min_shared!r} is only read when runs are shared across groups "
                             f"(prompt_ids given, share_across_groups not False)")
        return prefix_lens, suffix_lens, None
    if prompt_ids is None:
        raise ValueError("share_across_groups=True needs prompt_ids: runs are shared by their tokens")
    prompts = group_prompt_tokens(prompt_ids, prefix_lens, [len(g) for g in suffix_lens])
    tree = tree_from_groups(prompts, suffix_lens, default_min_shared if min_shared is None else min_shared)
    prompt_segments = len(tree.segments) - len(tree.sequence_segments)
    if prompt_segments == len(prefix_lens) and sum(s.parent == -1 for s in tree.segments) == prompt_segments:
        return prefix_lens, suffix_lens, None  # nothing shared across groups
    return prefix_lens, suffix_lens, tree


# ---------------------------------------------------------------------- index tensors
def flat_tensors(segmentation: Segmentation, device: torch.device) -> dict[str, torch.Tensor]:
    """The contiguous-range tensors of a flat layout (groups one after another, each its
    prefix then its completions), on ``device``: segment ``s`` is ``cu_seqlens[s]``."""
    long = dict(dtype=torch.long, device=device)
    segments, total = segmentation.segments, segmentation.total_tokens
    prefix_starts = [segments[group.start].start for group in segmentation.groups]
    return {"cu_group_seqlens": torch.tensor(prefix_starts + [total], **long),
            "prefix_starts": torch.tensor(prefix_starts, **long),
            "cu_seqlens": torch.tensor([segment.start for segment in segments] + [total], **long)}


# ---------------------------------------------------------------------- prefix trees
def tree_index_tensors(segmentation: Segmentation, device: torch.device) -> dict[str, torch.Tensor]:
    """``position_ids``, ``token_segment``, ``token_root`` ``[T]`` of any layout, on ``device``."""
    long = dict(dtype=torch.long, device=device)
    segments, total = segmentation.segments, segmentation.total_tokens
    seg_root = [0] * len(segments)
    for root, group in enumerate(segmentation.groups):
        for s in group:
            seg_root[s] = root
    seg_len = torch.tensor([segment.length for segment in segments], **long)
    seg_id = torch.repeat_interleave(torch.arange(len(segments), **long), seg_len, output_size=total)
    # A token's position: its segment's first position plus its offset in the segment.
    seg_shift = torch.tensor([first - segment.start for first, segment in zip(segmentation.first_positions, segments)],
                             **long)
    return {"position_ids": seg_shift[seg_id] + torch.arange(total, **long),
            "token_segment": seg_id,
            "token_root": torch.tensor(seg_root, **long)[seg_id]}


def sequence_tables(segmentation: Segmentation, sequence_segments: Sequence[int],
                    device: torch.device) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """``(positions, offsets, source)``: ``positions[offsets[i]:offsets[i+1]]`` are the packed
    indices of sequence ``i``'s tokens (the runs of its path, root first), and ``source[t]``
    the first entry of ``positions`` that is packed token ``t`` (what packing gathers)."""
    starts, lens, offsets = [], [], [0]
    for segment in sequence_segments:
        runs = segmentation.key_runs(segment)
        starts.extend(start for start, _ in runs)
        lens.extend(length for _, length in runs)
        offsets.append(offsets[-1] + sum(length for _, length in runs))
    long = dict(dtype=torch.long, device=device)
    run_lens = torch.tensor(lens, **long)
    run_shift = torch.tensor(starts, **long) - (torch.cumsum(run_lens, 0) - run_lens)
    total = offsets[-1]
    positions = torch.repeat_interleave(run_shift, run_lens, output_size=total) + torch.arange(total, **long)
    source = torch.full((segmentation.total_tokens,), total, **long).scatter_reduce(
        0, positions, torch.arange(total, **long), "amin")
    return positions, offsets, source


def completion_tensors(segmentation: Segmentation, prefix_lens: Sequence[int],
                       suffix_lens_per_group: Sequence[Sequence[int]], completion_segments: Sequence[int],
                       token_segment: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """The GRPO view's tensors on a prefix tree whose completion ``j`` is the leaf
    ``completion_segments[j]`` under its group's prompt path (``GroupLayout``'s
    completion members), on ``device``."""
    long = dict(dtype=torch.long, device=device)
    segments = segmentation.segments
    sizes = [len(g) for g in suffix_lens_per_group]
    suffix = [s for g in suffix_lens_per_group for s in g]
    t: dict[str, torch.Tensor] = {}
    t["prefix_lens"] = torch.tensor(prefix_lens, **long)
    t["group_sizes"] = torch.tensor(sizes, **long)
    t["suffix_lens"] = torch.tensor(suffix, **long)
    t["completion_group"] = torch.repeat_interleave(torch.arange(len(sizes), **long), t["group_sizes"],
                                                   output_size=len(suffix))
    t["first_completion"] = torch.cumsum(t["group_sizes"], 0) - t["group_sizes"]
    t["suffix_starts"] = torch.tensor([segments[s].start for s in completion_segments], **long)
    seg_completion = [-1] * len(segments)
    for j, s in enumerate(completion_segments):
        seg_completion[s] = j
    t["token_completion"] = torch.tensor(seg_completion, **long)[token_segment]

    n_ct, max_suffix = sum(suffix), max(suffix)
    completion_of = torch.repeat_interleave(torch.arange(len(suffix), **long), t["suffix_lens"], output_size=n_ct)
    first_of_completion = torch.cumsum(t["suffix_lens"], 0) - t["suffix_lens"]
    offset_in_completion = torch.arange(n_ct, **long) - first_of_completion[completion_of]
    positions = t["suffix_starts"][completion_of] + offset_in_completion
    t["_completion_positions"] = positions
    t["_completion_padded_index"] = completion_of * max_suffix + offset_in_completion
    # The first token of a completion is predicted by the last token of its prompt, the
    # end of its parent segment; any later one by the token right before it.
    prompt_last = torch.tensor([segments[segments[s].parent].start + segments[segments[s].parent].length - 1
                                for s in completion_segments], **long)
    t["_completion_logit_positions"] = torch.where(offset_in_completion == 0, prompt_last[completion_of],
                                                   positions - 1)
    return t


def prompt_group_of_tokens(completion_group: torch.Tensor, sequence_lens: torch.Tensor, sequence_tokens: int,
                           source: torch.Tensor) -> torch.Tensor:
    """``[T]``: the group whose prompt row ``pack`` reads each packed token from. A prompt
    token shared across groups comes from one group holding it (the first sequence's, as in
    ``pack_sequences``: ``source`` is the layout's pack source); a completion token from its
    own group. ``sequence_lens``: ``[N]`` tokens of every sequence (prompt + completion),
    ``sequence_tokens`` their sum (a host int: no device sync)."""
    entry_sequence = torch.repeat_interleave(torch.arange(sequence_lens.shape[0], device=source.device),
                                             sequence_lens, output_size=sequence_tokens)
    return completion_group[entry_sequence[source]]


def group_prompt_tokens(prompt_ids: torch.Tensor, prefix_lens: Sequence[int],
                        group_sizes: Sequence[int]) -> list[Any]:
    """Every group's real prompt tokens (host arrays) from left-padded ``prompt_ids``, one
    row per group or one per completion (a group's first row; rows already checked)."""
    if prompt_ids.shape[0] == len(group_sizes):
        rows = list(range(len(group_sizes)))
    else:
        rows = [sum(group_sizes[:b]) for b in range(len(group_sizes))]
    chosen = prompt_ids[torch.tensor(rows, device=prompt_ids.device)].cpu().numpy()  # its own dtype (uint64 too)
    width = chosen.shape[1]
    tokens = [chosen[b, width - p:] for b, p in enumerate(prefix_lens)]
    for b, t in enumerate(tokens):
        if t.min() < 0:
            raise ValueError(f"prompt_ids row {rows[b]} holds a negative token id under the mask: ids must be >= 0")
        if t.dtype.kind == "u" and t.max() > np.iinfo(np.int64).max:
            raise ValueError(f"prompt_ids row {rows[b]} holds token id {int(t.max())} under the mask, above the "
                             f"largest int64: token ids are int64")
    return [t.astype(np.int64) for t in tokens]
