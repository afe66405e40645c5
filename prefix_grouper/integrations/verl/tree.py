"""A verl micro-batch as the prefix tree of its sequences (host-side; no verl import).

verl hands the engine unpadded samples, ``prompt + response`` each (a nested
``input_ids``). Which samples share which tokens:

* samples with the same prompt tokens (a GRPO group, wherever they stand) share their
  prompt, however short, and the leading response tokens they have in common; so does every
  sample that sorts between two of them (it opens with their prompt);
* samples with different prompts share their common leading run when it is at least
  :data:`MIN_SHARED_TOKENS` long (a system prompt, a tool schema, or an earlier step's whole
  sequence that the next step's prompt opens with), the TRL drop-in's threshold, counted
  from the first token: agent steps adding fewer than 32 tokens each still chain;
* shorter runs common to different prompts (a chat template's opening tokens) stay per
  sample: they are not worth a tree level.

In lexicographic order, samples that share anything are neighbours, and the packed size of
any run of sorted samples is ``sum(lengths) - sum(shared(neighbours))``; the samples split
into *blocks* (runs sharing nothing with the next). The layout is
``GroupLayout.from_sequences`` of the samples with each block's first token made distinct, so
that its radix tree shares exactly what is said above.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from ...layout import GroupLayout

__all__ = ["MIN_SHARED_TOKENS", "MicroBatchLayout", "SortedSamples", "group_sizes_of", "micro_batch_layout",
           "packed_token_count", "prompt_lengths", "sample_tokens", "scored_positions", "sequence_values"]

# Shortest leading run that samples with different prompts must have in common to share it.
MIN_SHARED_TOKENS = 32


def prompt_lengths(micro_batch) -> list[int]:
    """Prompt tokens of every sample: ``prompts`` nested, or the prompt columns of ``attention_mask``."""
    prompts = micro_batch["prompts"]
    if prompts.is_nested:
        return prompts.offsets().diff().tolist()
    return micro_batch["attention_mask"][:, :prompts.shape[1]].sum(1).tolist()


def group_sizes_of(sequences: list[torch.Tensor], prompt_lens: list[int]) -> list[int]:
    """Consecutive samples with the same prompt tokens form a group: their sizes, in order."""
    sizes: list[int] = []
    for i, (seq, p) in enumerate(zip(sequences, prompt_lens)):
        prev = i - 1
        same = (i > 0 and prompt_lens[prev] == p and torch.equal(sequences[prev][:p], seq[:p]))
        if same:
            sizes[-1] += 1
        else:
            sizes.append(1)
    return sizes


def sample_tokens(input_ids: torch.Tensor) -> list[np.ndarray]:
    """Every sample's token ids as a host int64 array, from verl's nested ``input_ids``."""
    if not isinstance(input_ids, torch.Tensor) or not input_ids.is_nested:
        raise TypeError(f"input_ids must be verl's nested [samples, j] tensor of unpadded sequences, got "
                        f"{type(input_ids).__name__}")
    values = input_ids.values().detach().cpu().numpy().astype(np.int64)
    offsets = input_ids.offsets().cpu().tolist()
    return [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def _checked_prompt_lens(tokens: list[np.ndarray], prompt_lens: Sequence[int]) -> list[int]:
    lens = [int(p) for p in prompt_lens]
    if len(lens) != len(tokens):
        raise ValueError(f"prompt_lens has {len(lens)} entries for {len(tokens)} samples")
    for i, (seq, p) in enumerate(zip(tokens, lens)):
        if not 1 <= p <= len(seq):
            raise ValueError(f"prompt_lens[{i}] = {p}: outside sample {i}'s sequence of {len(seq)} tokens "
                             f"(a prompt holds at least the token that predicts the response)")
    return lens


class SortedSamples:
    """The samples in lexicographic order (``order``), with what sorted neighbours share.

    ``common[j]``: the leading tokens sorted samples ``j`` and ``j + 1`` have in common;
    ``group[j]``: the group (same prompt tokens) of sorted sample ``j``. What a contiguous run
    of sorted samples shares when packed alone (:meth:`shared`) depends on the run: a group
    cut by its ends no longer holds its short prompt run together.
    """

    def __init__(self, tokens: list[np.ndarray], prompt_lens: list[int]) -> None:
        self.order = sorted(range(len(tokens)), key=lambda i: tokens[i].tolist())
        self.lengths = np.array([len(tokens[i]) for i in self.order], dtype=np.int64)
        common = []
        for a, b in zip(self.order[:-1], self.order[1:]):
            n = min(len(tokens[a]), len(tokens[b]))
            differ = np.flatnonzero(tokens[a][:n] != tokens[b][:n])
            common.append(int(differ[0]) if differ.size else n)
        self.common = np.array(common, dtype=np.int64)
        ids: dict[bytes, int] = {}
        self.group = np.array([ids.setdefault(tokens[i][:prompt_lens[i]].tobytes(), len(ids)) for i in self.order],
                              dtype=np.int64)
        self.num_groups = len(ids)

    def in_group(self, start: int, stop: int) -> np.ndarray:
        """``[stop - start - 1]`` bool: whether each gap of sorted run ``start:stop`` lies
        between two of the run's samples of one group (every sample between them opens with
        that group's prompt)."""
        group = self.group[start:stop]
        place = np.arange(len(group))
        first = np.full(self.num_groups, len(group))
        last = np.full(self.num_groups, -1)
        np.minimum.at(first, group, place)
        np.maximum.at(last, group, place)
        present = last >= 0
        depth = np.zeros(len(group) + 1, dtype=np.int64)
        np.add.at(depth, first[present], 1)
        np.add.at(depth, last[present], -1)
        return np.cumsum(depth)[:len(group) - 1] > 0

    def shared(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``[stop - start - 1]``: tokens that neighbours of sorted run ``start:stop`` share
        when it is packed alone (0 between blocks)."""
        stop = len(self.order) if stop is None else stop
        common = self.common[start:stop - 1]
        return np.where((common >= MIN_SHARED_TOKENS) | self.in_group(start, stop), common, 0)

    def packed_tokens(self, start: int = 0, stop: int | None = None) -> int:
        """Tokens of sorted run ``start:stop`` packed as one tree."""
        stop = len(self.order) if stop is None else stop
        return int(self.lengths[start:stop].sum() - self.shared(start, stop).sum())


def packed_token_count(tokens: list[np.ndarray], prompt_lens: list[int]) -> int:
    """Tokens that :func:`micro_batch_layout` packs for these samples (host arrays)."""
    return SortedSamples(tokens, prompt_lens).packed_tokens()


class MicroBatchLayout(NamedTuple):
    """A micro-batch on one packed row: ``layout`` (its sequence ``i`` is sample ``i``),
    ``packed_ids [T]`` and ``sequences`` (every sample's token ids, on the layout's device)."""
    layout: GroupLayout
    packed_ids: torch.Tensor
    sequences: list[torch.Tensor]


def micro_batch_layout(input_ids: torch.Tensor, prompt_lens: Sequence[int]) -> MicroBatchLayout:
    """The micro-batch packed as the prefix tree of its samples (see the module docstring).

    ``input_ids`` is verl's nested ``[samples, j]`` (prompt then response, no padding);
    ``prompt_lens[i]`` the prompt tokens of sample ``i``. A micro-batch whose samples share
    nothing but their groups' prompts, groups consecutive, gets the one-level layout
    (``GroupLayout.from_lengths``), any other the tree (``GroupLayout.from_sequences``).
    """
    tokens = sample_tokens(input_ids)
    prompt_lens = _checked_prompt_lens(tokens, prompt_lens)
    sequences = list(input_ids.unbind())
    sorted_samples = SortedSamples(tokens, prompt_lens)
    shared = sorted_samples.shared()
    packed = int(sorted_samples.lengths.sum() - shared.sum())
    sizes = group_sizes_of([torch.from_numpy(t) for t in tokens], prompt_lens)
    starts = np.cumsum([0] + sizes[:-1]).tolist()
    one_level = sum(prompt_lens[s] + sum(len(tokens[i]) - prompt_lens[i] for i in range(s, s + g))
                    for s, g in zip(starts, sizes))
    if packed == one_level:
        suffix_lens = [[len(tokens[i]) - prompt_lens[i] for i in range(s, s + g)] for s, g in zip(starts, sizes)]
        layout = GroupLayout.from_lengths([prompt_lens[s] for s in starts], suffix_lens, device=input_ids.device)
    else:
        # Keys whose radix tree is the sharing: each block's first token made distinct from
        # every other block's (block * (max id + 1) + id), the rest unchanged.
        block = np.zeros(len(tokens), dtype=np.int64)
        block[sorted_samples.order] = np.concatenate([[0], np.cumsum(shared == 0)])
        base = max(int(t.max()) for t in tokens) + 1
        keys = [np.concatenate([[block[i] * base + t[0]], t[1:]]) for i, t in enumerate(tokens)]
        layout = GroupLayout.from_sequences(keys, device=input_ids.device)
        if layout.total_tokens != packed:
            raise RuntimeError(f"prefix tree of {len(tokens)} samples packs {layout.total_tokens} tokens where "
                               f"their sharing says {packed}")
    return MicroBatchLayout(layout, layout.pack_sequences(sequences), sequences)


def scored_positions(layout: GroupLayout, prompt_lens: Sequence[int], sequence_lens: Sequence[int]):
    """``(rows, logit_positions, target_positions)``, each ``[num_response_tokens]`` int64 on
    the layout's device, response token after response token, sample after sample:
    ``rows`` on verl's unpadded axis (the row predicting token ``t + 1`` of a sample is its
    ``t``), the other two on the packed row."""
    offsets = np.cumsum([0] + list(sequence_lens))
    rows = np.concatenate([np.arange(o + p - 1, o + n - 1, dtype=np.int64)
                           for o, p, n in zip(offsets[:-1].tolist(), prompt_lens, sequence_lens)])
    rows = torch.from_numpy(rows).to(layout.device)
    positions = layout.sequence_positions()
    return rows, positions[rows], positions[rows + 1]


def sequence_values(per_token: torch.Tensor, layout: GroupLayout, prompt_lens: Sequence[int],
                    sequence_lens: Sequence[int]) -> torch.Tensor:
    """Response-token values (``[num_response_tokens]``, sample after sample) on verl's
    unpadded axis (``[sum(sequence_lens)]``): the value predicting token ``t + 1`` at ``t``,
    as verl's rolled log-probs; zeros where no response token is predicted."""
    if layout.num_sequences != len(sequence_lens):
        raise ValueError(f"the layout packs {layout.num_sequences} sequences but sequence_lens has "
                         f"{len(sequence_lens)} entries")
    rows, _, _ = scored_positions(layout, prompt_lens, sequence_lens)
    rows = rows.to(per_token.device)
    return per_token.new_zeros(sum(sequence_lens)).index_copy(0, rows, per_token)
