"""The layout object: a packed batch's lengths, segmentation (a prefix tree; one level for
``prefix, suffix_1..suffix_G`` groups) and index tensors.

Building one (checked lengths, padded masks, index tensors) lives in :mod:`.construction`
and :mod:`.tree`; :class:`GroupLayout`'s constructors delegate there. Its per-sequence
members live in :mod:`.sequences`, the packing of padded rows in :mod:`.packing`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..micro_batches import micro_batch_groups
from .construction import (checked_lengths, group_prompt_tokens, grouped_tree_tensors, index_tensors,
                           lengths_from_padded, tree_index_tensors)
from .host import cached_per_layout, encode_host_lengths, encode_host_segments, split_by_group
from .packing import CompletionPacking
from .segmentation import Segment, Segmentation, segmentation_of
from .sequences import SequenceMembers
from .tree import SequenceTree, checked_sequences, sequence_tree, tree_from_groups

__all__ = ["DEFAULT_MIN_SHARED", "GroupLayout", "NotOneLevelError"]

# Fewest tokens of a run that different prompts share before from_padded splits it out.
DEFAULT_MIN_SHARED = 4

# Members that only a layout of prompts and completions has (from_lengths / from_padded).
_ONE_LEVEL_MEMBERS = frozenset({
    "prefix_lens", "group_sizes", "suffix_lens", "completion_group", "first_completion", "cu_group_seqlens",
    "prefix_starts", "suffix_starts", "cu_seqlens", "token_group", "token_completion", "host_lengths",
    "prefix_lens_list", "suffix_lens_list", "group_sizes_list", "num_groups", "num_completions",
    "num_completion_tokens", "max_prefix_len", "max_suffix_len", "max_group_suffix_tokens",
    "suffix_lens_per_group", "_completion_positions", "_completion_padded_index", "_completion_logit_positions",
    "_token_prompt_group",
})
_TREE_API = ("sequence_positions, pack_sequences, token_log_prob_positions, position_ids, token_segment, "
             "token_root, segments, key_runs, subtree_end, host_segments")


class NotOneLevelError(ValueError, AttributeError):
    """A one-level member (prompts and completions) asked of a prefix-tree layout. An
    AttributeError too, so that ``hasattr`` answers False."""


class GroupLayout(SequenceMembers, CompletionPacking):
    """Lengths and index tensors of a packed ``prefix, suffix_1..suffix_G`` batch.

    Prefix = prompt, suffix = completion (see the package docstring for the vocabulary).
    Build it with :meth:`from_lengths` or :meth:`from_padded`. Host-side lengths are kept
    as Python tuples (``prefix_lens_list``, ``suffix_lens_list``, ``group_sizes_list``);
    the tensor attributes below live on ``device``:

    ========================  =================  ===============================================
    attribute                 shape, dtype       meaning
    ========================  =================  ===============================================
    ``prefix_lens``           [B] int64          P_b
    ``group_sizes``           [B] int64          G_b (completions of group b)
    ``suffix_lens``           [N] int64          length of every completion, group by group
    ``completion_group``      [N] int64          group of every completion
    ``first_completion``      [B] int64          index of every group's first completion
    ``cu_group_seqlens``      [B+1] int64        packed start of every group, then T
    ``prefix_starts``         [B] int64          packed start of every prefix
    ``suffix_starts``         [N] int64          packed start of every completion
    ``cu_seqlens``            [B+N+1] int64      starts of all segments in packed order, then T
    ``position_ids``          [T] int64          0..P_b-1 on a prefix, P_b.. on every suffix
    ``token_group``           [T] int64          group of every packed token
    ``token_completion``      [T] int64          completion of every token, -1 on prefixes
    ``token_segment``         [T] int64          segment of every token (index into ``segments``)
    ========================  =================  ===============================================

    Segmentation, host-side and built once (:mod:`.segmentation`): ``segments`` (one
    :class:`Segment` ``(start, length, parent)`` per entry of ``cu_seqlens``),
    :meth:`key_runs` (the packed key runs a segment's queries see) and :meth:`subtree_end`.

    ``host_lengths`` is the one CPU tensor: the lengths as :func:`encode_host_lengths` encodes
    them (:func:`decode_host_lengths` reads them back), for ops that must not synchronize.

    Prefix trees (:meth:`from_sequences`): the layout is the radix tree of full token
    sequences, its segments packed in pre-order (every subtree one packed range). Every
    layout, one-level ones included, has ``host_segments`` (``[S, 3]`` int64 CPU tensor of
    the segments, :func:`encode_host_segments`), ``position_ids``, ``token_segment`` and
    ``token_root`` ``[T]`` (the root whose subtree holds the token; ``token_group`` on a
    one-level layout), ``num_sequences``, ``sequence_lens_list`` and the members of
    :class:`~prefix_grouper.layout.sequences.SequenceMembers` (:meth:`sequence_positions`,
    :meth:`pack_sequences`, :meth:`token_log_prob_positions`). ``is_flat`` is True on the
    one-level layouts of :meth:`from_lengths` and :meth:`from_padded`; on a tree the
    one-level members above raise :class:`NotOneLevelError` (a ValueError) naming the tree API.
    ``has_completions`` is True on every layout of prompts and completions, including
    ``from_padded(..., share_across_groups=True)``'s tree, which keeps the completion members
    (see :meth:`from_padded`).
    A one-level layout's sequence ``i`` is completion ``i`` after its group's prompt.

    ``N = sum_b G_b``. Prefixes must hold at least one token (the token that predicts the
    first completion token); completions may be empty (they then own no packed token).
    """

    def __init__(
        self,
        prefix_lens: Sequence[int],
        suffix_lens: Sequence[Sequence[int]],
        device: torch.device | str | None = None,
    ) -> None:
        prefix, groups = checked_lengths(prefix_lens, suffix_lens)
        self._set_group_lengths(prefix, groups)
        self.total_tokens = sum(prefix) + self.num_completion_tokens
        self.host_lengths = encode_host_lengths(prefix, self.group_sizes_list, self.suffix_lens_list)
        self.is_flat = self.has_completions = True
        device = torch.device(device) if device is not None else torch.device("cpu")
        for name, tensor in index_tensors(self.segmentation, self.prefix_lens_list, self.group_sizes_list,
                                          self.suffix_lens_list, device).items():
            setattr(self, name, tensor)
        # "cuda" and "cuda:0" compare unequal: keep the device the tensors actually report.
        self.device = self.prefix_lens.device
        self.host_segments = encode_host_segments(self.segmentation.segments)
        self.num_sequences = self.num_completions
        self._sequence_segments = tuple(s for s, segment in enumerate(self.segmentation.segments)
                                        if segment.parent >= 0)
        self.sequence_lens_list = tuple(prefix[b] + suffix for b, g in enumerate(groups) for suffix in g)

    def _init_tree(self, tree: SequenceTree, device: torch.device | str | None) -> None:
        """A prefix-tree layout: ``tree``'s segments (pre-order) and sequence ends."""
        segmentation = Segmentation(tree.segments)
        self.is_flat = False
        self.host_segments = encode_host_segments(segmentation.segments)
        cached_per_layout(self.host_segments, ("segmentation",), lambda: segmentation)
        self.total_tokens = segmentation.total_tokens
        self.num_sequences = len(tree.sequence_segments)
        self._sequence_segments = tuple(tree.sequence_segments)
        self.sequence_lens_list = tuple(segmentation.first_positions[s] + segmentation.segments[s].length
                                        for s in self._sequence_segments)
        device = torch.device(device) if device is not None else torch.device("cpu")
        for name, tensor in tree_index_tensors(segmentation, device).items():
            setattr(self, name, tensor)
        self.device = self.position_ids.device
        self.has_completions = False

    def _set_group_lengths(self, prefix: Sequence[int], groups: Sequence[Sequence[int]]) -> None:
        self.prefix_lens_list: tuple[int, ...] = tuple(prefix)
        self.group_sizes_list: tuple[int, ...] = tuple(len(g) for g in groups)
        self.suffix_lens_list: tuple[int, ...] = tuple(s for g in groups for s in g)
        self.num_groups = len(prefix)
        self.num_completions = len(self.suffix_lens_list)
        self.num_completion_tokens = sum(self.suffix_lens_list)
        self.max_prefix_len = max(prefix)
        self.max_suffix_len = max(self.suffix_lens_list)
        self.max_group_suffix_tokens = max(sum(g) for g in groups)

    def _init_grouped_tree(self, prefix: Sequence[int], groups: Sequence[Sequence[int]], tree: SequenceTree,
                           device: torch.device | str | None) -> None:
        """Prompts sharing runs across groups: ``tree`` (sequences = completions, each a leaf
        under its group's prompt path) with the one-level members that stay meaningful."""
        self._init_tree(tree, device)
        self._set_group_lengths(prefix, groups)
        self._grouped_tree = (tuple(prefix), tuple(tuple(g) for g in groups), tree)
        self.has_completions = True
        source = self._tables()[2]
        for name, tensor in grouped_tree_tensors(self.segmentation, prefix, groups, tree.sequence_segments,
                                                 self.token_segment, source, self.device).items():
            setattr(self, name, tensor)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: a one-level member of a tree layout.
        if name in _ONE_LEVEL_MEMBERS:
            raise NotOneLevelError(
                f"GroupLayout.{name} belongs to one-level layouts (prompts and completions, from_lengths / "
                f"from_padded); this layout is a prefix tree: use {_TREE_API}")
        raise AttributeError(f"'GroupLayout' object has no attribute '{name}'")

    def _require_one_level(self, member: str) -> None:
        if not self.has_completions:
            raise NotOneLevelError(
                f"GroupLayout.{member}() needs a one-level layout (prompts and completions, from_lengths / "
                f"from_padded); this layout is a prefix tree: use {_TREE_API}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_lengths(
        cls,
        prefix_lens: Sequence[int],
        suffix_lens: Sequence[Sequence[int]],
        device: torch.device | str | None = None,
    ) -> "GroupLayout":
        """``prefix_lens[b]`` = P_b; ``suffix_lens[b]`` lists group b's completion lengths."""
        return cls(prefix_lens, suffix_lens, device=device)

    @classmethod
    def from_padded(
        cls,
        prompt_mask: torch.Tensor,
        completion_mask: torch.Tensor,
        group_sizes: Sequence[int] | torch.Tensor | None = None,
        *,
        prompt_ids: torch.Tensor | None = None,
        share_across_groups: bool | None = None,
        min_shared: int | None = None,
    ) -> "GroupLayout":
        """Layout of what a GRPO loop holds: left-padded prompts and right-padded completions.

        Args:
            prompt_mask: bool/int, 1 on real prompt tokens (left padding): ``[B, Lp]``, one
                row per group, or ``[N, Lp]``, one row per completion as TRL and verl hold a
                batch (a group's prompt repeated on its consecutive rows).
            completion_mask: ``[N, Ls]`` bool/int, 1 on real completion tokens (right
                padding); the completions of a group are consecutive rows.
            group_sizes: ``[B]`` number of completions of each group, summing to N. May be
                omitted when ``prompt_mask`` has N rows and ``prompt_ids`` is given:
                consecutive rows holding identical prompts then form a group.
            prompt_ids: ``[rows of prompt_mask, Lp]`` integer prompt tokens (read only under
                the mask). With N rows, rows given as one group must hold identical prompts.
            share_across_groups: also share the leading runs that DIFFERENT groups' prompts
                have in common (a system prompt, a tool schema): the layout is then the prefix
                tree of the prompts, each group's completions leaves under its prompt (needs
                ``prompt_ids``). Default (None): share whenever ``prompt_ids`` is given. Its one-level members (``pack``, ``completion_positions``,
                ``completion_logit_positions``, ``unpack_completions``, ``completion_mask``,
                the lengths) work as on a flat layout, ``is_flat`` is False and the
                packed-range members (``host_lengths``, ``cu_seqlens``, ``prefix_starts``,
                ``token_group``, ``micro_batch_groups``) raise. Without any shared run the
                layout is the flat one.
            min_shared: runs shared by different prompts are split out only from this many
                tokens (default 4, so that a shared BOS or chat-template header alone stays
                per group; see :meth:`from_sequences`).

        Reads the mask lengths back to the host (a few synchronizations, once per batch).
        """
        prefix_lens, suffix_lens = lengths_from_padded(prompt_mask, completion_mask, group_sizes, prompt_ids)
        if share_across_groups is None:
            share_across_groups = prompt_ids is not None
        if not share_across_groups:
            if min_shared is not None:
                raise ValueError(f"min_shared = {min_shared!r} is only read when runs are shared across groups "
                                 f"(prompt_ids given, share_across_groups not False)")
            return cls(prefix_lens, suffix_lens, device=prompt_mask.device)
        if min_shared is None:
            min_shared = DEFAULT_MIN_SHARED
        if prompt_ids is None:
            raise ValueError("share_across_groups=True needs prompt_ids: runs are shared by their tokens")
        prompts = group_prompt_tokens(prompt_ids, prefix_lens, [len(g) for g in suffix_lens])
        tree = tree_from_groups(prompts, suffix_lens, min_shared)
        prompt_segments = len(tree.segments) - len(tree.sequence_segments)
        if prompt_segments == len(prefix_lens) and sum(s.parent == -1 for s in tree.segments) == prompt_segments:
            return cls(prefix_lens, suffix_lens, device=prompt_mask.device)  # nothing shared across groups
        layout = cls.__new__(cls)
        layout._init_grouped_tree(prefix_lens, suffix_lens, tree, prompt_mask.device)
        return layout

    @classmethod
    def from_sequences(
        cls,
        sequences: Sequence[Any],
        *,
        min_shared: int = 1,
        device: torch.device | str | None = None,
    ) -> "GroupLayout":
        """The radix tree of full token sequences: every prefix two or more of them share is
        packed once.

        Args:
            sequences: N 1-D integer tensors or lists of token ids (>= 0), at least one token
                each. Exact duplicates and sequences that are prefixes of others are allowed
                (they end on the same node, or on an inner node).
            min_shared: a shared run shorter than this many tokens is not split out: the
                sequences below it keep their own copies (exact duplicates still end on one
                node). With 1, ``total_tokens`` is the number of distinct prefixes (trie nodes).
            device: where the index tensors live (default CPU).

        Sorts the sequences and compares sorted neighbours once, vectorized; the tree is
        built in one pass over the N sequences.
        """
        tree = sequence_tree(checked_sequences(sequences), min_shared)
        layout = cls.__new__(cls)
        layout._init_tree(tree, device)
        return layout

    # ------------------------------------------------------------------ segmentation
    @property
    def segmentation(self) -> Segmentation:
        """The layout's :class:`Segmentation` (host-side, built once per layout)."""
        return segmentation_of(self.host_lengths if self.is_flat else self.host_segments)

    @property
    def segments(self) -> tuple[Segment, ...]:
        """One :class:`Segment` ``(start, length, parent)`` per packed segment, in packed order
        (pre-order of the prefix tree); host ints. One-level: each group's prefix
        (``parent == -1``), then its completions (``parent`` = the index of the group's prefix
        segment), empty completions included."""
        return self.segmentation.segments

    def micro_batch_groups(self, *, max_rows: int | None = None, max_tokens: int | None = None) -> list[range]:
        """Consecutive whole groups per micro-batch (ranges of group indices), each within
        ``max_rows`` completions and/or ``max_tokens`` packed tokens; a group over a budget
        runs alone (:func:`prefix_grouper.micro_batches.micro_batch_groups`)."""
        if not self.is_flat:
            raise NotOneLevelError("GroupLayout.micro_batch_groups() cuts whole groups out of a flat layout; "
                                   "this layout shares runs across groups (a prefix tree)")
        group_tokens = [prefix + sum(suffixes)
                        for prefix, suffixes in zip(self.prefix_lens_list, self.suffix_lens_per_group)]
        return micro_batch_groups(self.group_sizes_list, max_rows=max_rows,
                                  tokens_per_group=None if max_tokens is None else group_tokens,
                                  max_tokens=max_tokens)

    # ------------------------------------------------------------------ helpers
    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """Memoize per-layout metadata (e.g. a kernel's tile schedule) under ``key``:
        ``(name, *parameters)`` (:func:`~prefix_grouper.layout.host.cache_key`); keyed by
        ``host_lengths`` on a one-level layout, ``host_segments`` on a tree."""
        return cached_per_layout(self.host_lengths if self.is_flat else self.host_segments, key, build)

    def to(self, device: torch.device | str) -> "GroupLayout":
        """The same layout with its tensors on ``device``."""
        device = torch.empty(0, device=device).device  # resolves "cuda" to "cuda:N"
        if device == self.device:
            return self
        if self.is_flat:
            return GroupLayout(self.prefix_lens_list, self.suffix_lens_per_group, device=device)
        layout = GroupLayout.__new__(GroupLayout)
        if self.has_completions:
            layout._init_grouped_tree(*self._grouped_tree, device)
        else:
            layout._init_tree(SequenceTree(list(self.segments), list(self._sequence_segments)), device)
        return layout

    @property
    def suffix_lens_per_group(self) -> list[tuple[int, ...]]:
        self._require_one_level("suffix_lens_per_group")
        return split_by_group(self.suffix_lens_list, self.group_sizes_list)

    def unpacked_tokens(self) -> int:
        """Tokens the unpacked rows hold (:mod:`prefix_grouper.unpacked`): ``sum_i L_i``
        (one-level: ``sum_b sum_i (P_b + S_bi)``)."""
        return sum(self.sequence_lens_list)

    def __repr__(self) -> str:
        if not self.is_flat:
            return (f"GroupLayout(tree: segments={len(self.host_segments)}, sequences={self.num_sequences}, "
                    f"tokens={self.total_tokens}, unpacked={self.unpacked_tokens()}, device={self.device})")
        return (
            f"GroupLayout(groups={self.num_groups}, completions={self.num_completions}, "
            f"tokens={self.total_tokens}, max_prefix={self.max_prefix_len}, "
            f"max_suffix={self.max_suffix_len}, device={self.device})"
        )
