"""The packed batch: a prefix tree of token sequences, and the one host encoding every op reads.

:class:`GroupLayout` is the core every op takes: the tree's segments in packed pre-order
(:class:`~prefix_grouper.layout.Segmentation`), ``host_segments`` (the one CPU encoding,
also the per-layout cache key), the per-token tables and the per-sequence members of
:class:`~prefix_grouper.layout.sequences.SequenceMembers`. Its constructors return one of
three kinds, each a subclass, so that a member exists exactly where it means something:

* :class:`TreeLayout` (``from_sequences``): a bare tree of full sequences;
* :class:`CompletionLayout` (``from_padded`` when prompts share runs across groups): the
  GRPO view, groups of completions under their prompts, built on the tree;
* :class:`FlatLayout` (``from_lengths``, ``from_padded``): the GRPO view whose groups are
  contiguous packed ranges.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..micro_batches import micro_batch_groups
from .construction import (checked_lengths, completion_tensors, flat_tensors, padded_batch_tree,
                           prompt_group_of_tokens, tree_index_tensors)
from .host import cached_per_layout, encode_host_lengths, encode_host_segments, share_layout_cache, split_by_group
from .packing import CompletionPacking
from .segmentation import Segment, Segmentation, segmentation_of
from .sequences import SequenceMembers
from .tree import SequenceTree, checked_sequences, sequence_tree

__all__ = ["DEFAULT_MIN_SHARED", "CompletionLayout", "FlatLayout", "GroupLayout", "NotOneLevelError", "TreeLayout"]

# Fewest tokens of a run that different prompts share before from_padded splits it out.
DEFAULT_MIN_SHARED = 4

_TREE_API = ("sequence_positions, pack_sequences, token_log_prob_positions, position_ids, token_segment, "
             "token_root, segments, key_runs, subtree_end, host_segments")


class NotOneLevelError(ValueError, AttributeError):
    """A member of another kind of layout asked of this one (a prompt/completion member of a
    bare tree, a contiguous-group member of a layout that shares prompt runs across groups).
    An AttributeError too, so that ``hasattr`` answers False."""


class GroupLayout(SequenceMembers):
    """A packed batch: the prefix tree of its sequences, every shared prefix packed once.

    Build one with :meth:`from_lengths` (GRPO groups from lengths), :meth:`from_padded`
    (what a GRPO loop holds) or :meth:`from_sequences` (any token sequences);
    ``GroupLayout(prefix_lens, suffix_lens, device)`` is :meth:`from_lengths`. Every kind has:

    ==================  =================  =================================================
    member              shape, dtype       meaning
    ==================  =================  =================================================
    ``host_segments``   [S, 3] int64 CPU   ``(start, length, parent)`` per segment, packed
                                           order: the one host encoding ops read (no device
                                           sync) and the key of :meth:`cached`
    ``position_ids``    [T] int64          a token's position in its sequences
    ``token_segment``   [T] int64          segment of every token (index into ``segments``)
    ``token_root``      [T] int64          the root whose subtree holds the token
    ==================  =================  =================================================

    and ``total_tokens`` (T), ``device``, ``segments`` (one :class:`Segment` per packed
    segment, pre-order: every subtree one packed range), ``segmentation``, :meth:`key_runs`,
    :meth:`subtree_end`, ``num_sequences``, ``sequence_lens_list``, ``sequence_lens`` and
    :meth:`sequence_positions`, :meth:`pack_sequences`, :meth:`token_log_prob_positions`.
    ``has_completions`` (prompts and completions: the GRPO view) and ``is_flat`` (groups
    are contiguous ranges) tell the kinds apart; the GRPO members (``prefix_lens``,
    ``pack``, ``completion_positions``, ...) exist only where they are True.
    """

    is_flat = False
    has_completions = False

    def __new__(cls, *args: Any, **kwargs: Any) -> "GroupLayout":
        if cls is GroupLayout:
            # GroupLayout(prefix_lens, suffix_lens, device): the flat layout, as from_lengths.
            return super().__new__(FlatLayout)
        return super().__new__(cls)

    def _init_tree(self, segmentation: Segmentation, sequence_segments: Sequence[int],
                   device: torch.device | str | None) -> None:
        """The core: ``segmentation``'s segments and the segment each sequence ends on."""
        self.host_segments = encode_host_segments(segmentation.segments)
        cached_per_layout(self.host_segments, ("segmentation",), lambda: segmentation)
        self.total_tokens = segmentation.total_tokens
        self.num_sequences = len(sequence_segments)
        self._sequence_segments = tuple(sequence_segments)
        self.sequence_lens_list = tuple(segmentation.first_positions[s] + segmentation.segments[s].length
                                        for s in self._sequence_segments)
        device = torch.device(device) if device is not None else torch.device("cpu")
        for name, tensor in tree_index_tensors(segmentation, device).items():
            setattr(self, name, tensor)
        # "cuda" and "cuda:0" compare unequal: keep the device the tensors actually report.
        self.device = self.position_ids.device

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_lengths(
        cls,
        prefix_lens: Sequence[int],
        suffix_lens: Sequence[Sequence[int]],
        device: torch.device | str | None = None,
    ) -> "GroupLayout":
        """``prefix_lens[b]`` = P_b; ``suffix_lens[b]`` lists group b's completion lengths.
        Returns the flat layout (:class:`FlatLayout`)."""
        return FlatLayout(prefix_lens, suffix_lens, device=device)

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
                ``prompt_ids``), a :class:`CompletionLayout`:
                ``pack``, ``completion_positions``, ``completion_logit_positions``,
                ``unpack_completions``, ``completion_mask`` and the lengths work as on a flat
                layout, ``is_flat`` is False and the contiguous-range members
                (``host_lengths``, ``cu_seqlens``, ``prefix_starts``, ``token_group``,
                ``micro_batch_groups``) do not exist. Default (None): share whenever
                ``prompt_ids`` is given. Without any shared run the layout is the flat one.
            min_shared: runs shared by different prompts are split out only from this many
                tokens (default 4, so that a shared BOS or chat-template header alone stays
                per group; see :meth:`from_sequences`).

        Reads the mask lengths back to the host (a few synchronizations, once per batch).
        """
        prefix_lens, suffix_lens, tree = padded_batch_tree(prompt_mask, completion_mask, group_sizes, prompt_ids,
                                                           share_across_groups, min_shared, DEFAULT_MIN_SHARED)
        if tree is None:
            return FlatLayout(prefix_lens, suffix_lens, device=prompt_mask.device)
        return CompletionLayout(prefix_lens, suffix_lens, tree, prompt_mask.device)

    @classmethod
    def from_sequences(
        cls,
        sequences: Sequence[Any],
        *,
        min_shared: int = 1,
        device: torch.device | str | None = None,
    ) -> "GroupLayout":
        """The radix tree of full token sequences: every prefix two or more of them share is
        packed once (a :class:`TreeLayout`).

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
        return TreeLayout(sequence_tree(checked_sequences(sequences), min_shared), device)

    # ------------------------------------------------------------------ segmentation
    @property
    def segmentation(self) -> Segmentation:
        """The layout's :class:`Segmentation` (host-side, built once per layout)."""
        return segmentation_of(self.host_segments)

    @property
    def segments(self) -> tuple[Segment, ...]:
        """One :class:`Segment` ``(start, length, parent)`` per packed segment, in packed order
        (pre-order of the prefix tree); host ints. A GRPO group: its prefix (``parent == -1``
        on a flat layout), then its completions (``parent`` = the prefix's segment), empty
        completions included."""
        return self.segmentation.segments

    # ------------------------------------------------------------------ helpers
    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """Memoize per-layout metadata (e.g. a kernel's tile schedule) under ``key``:
        ``(name, *parameters)`` (:func:`~prefix_grouper.layout.host.cache_key`), keyed by
        ``host_segments``."""
        return cached_per_layout(self.host_segments, key, build)

    def to(self, device: torch.device | str) -> "GroupLayout":
        """The same layout with its tensors on ``device``."""
        device = torch.empty(0, device=device).device  # resolves "cuda" to "cuda:N"
        # Every kind keeps its constructor's host-side arguments (_sources) to rebuild from.
        return self if device == self.device else type(self)(*self._sources, device=device)

    def unpacked_tokens(self) -> int:
        """Tokens the unpacked rows hold (:mod:`prefix_grouper.unpacked`): ``sum_i L_i``
        (one-level: ``sum_b sum_i (P_b + S_bi)``)."""
        return sum(self.sequence_lens_list)

    def __repr__(self) -> str:
        return (f"GroupLayout(tree: segments={len(self.host_segments)}, sequences={self.num_sequences}, "
                f"tokens={self.total_tokens}, unpacked={self.unpacked_tokens()}, device={self.device})")


class MissingMemberHint:
    """Mixin of the layout kinds that lack members another kind has: asking for one raises
    :class:`NotOneLevelError` naming what this layout offers instead. Only the message; the
    member does not exist here (``hasattr`` is False), and the names come from the other
    kinds' classes, not from a list."""

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails.
        if not name.startswith("__") and _member_of_another_kind(type(self), name):
            if type(self).has_completions:  # a CompletionLayout that shares runs across groups
                raise NotOneLevelError(
                    f"GroupLayout.{name} belongs to flat layouts, whose groups are contiguous packed ranges "
                    f"(from_lengths, from_padded without shared runs); this layout shares runs across groups, "
                    f"a prefix tree: use the completion members or {_TREE_API}")
            raise NotOneLevelError(
                f"GroupLayout.{name} belongs to one-level layouts (prompts and completions, from_lengths / "
                f"from_padded); this layout is a prefix tree: use {_TREE_API}")
        raise AttributeError(f"'GroupLayout' object has no attribute '{name}'")


def _member_of_another_kind(kind: type, name: str) -> bool:
    pending = list(GroupLayout.__subclasses__())
    while pending:
        other = pending.pop()
        pending.extend(other.__subclasses__())
        if not issubclass(kind, other) and any(_declares(c, name) for c in other.__mro__):
            return True
    return False


def _declares(cls: type, name: str) -> bool:
    """``cls`` defines ``name`` (a method or property) or annotates it (an instance attribute)."""
    return name in vars(cls) or name in vars(cls).get("__annotations__", {})


class TreeLayout(MissingMemberHint, GroupLayout):
    """A bare prefix tree of full token sequences (:meth:`GroupLayout.from_sequences`):
    the core members only; sequence ``i`` is the ``i``-th sequence given."""

    def __init__(self, tree: SequenceTree, device: torch.device | str | None = None) -> None:
        self._init_tree(Segmentation(tree.segments), tree.sequence_segments, device)
        self._sources = (tree,)


class CompletionLayout(MissingMemberHint, CompletionPacking, GroupLayout):
    """Groups of completions under their prompts, on the batch's prefix tree.

    Prefix = prompt, suffix = completion (:mod:`prefix_grouper.layout`). ``N = sum_b G_b``.

    ========================  =================  ===============================================
    attribute                 shape, dtype       meaning
    ========================  =================  ===============================================
    ``prefix_lens``           [B] int64          P_b
    ``group_sizes``           [B] int64          G_b (completions of group b)
    ``suffix_lens``           [N] int64          length of every completion, group by group
    ``completion_group``      [N] int64          group of every completion
    ``first_completion``      [B] int64          index of every group's first completion
    ``suffix_starts``         [N] int64          packed start of every completion
    ``token_completion``      [T] int64          completion of every token, -1 on prompts
    ========================  =================  ===============================================

    and ``prefix_lens_list``, ``suffix_lens_list``, ``group_sizes_list``,
    ``suffix_lens_per_group``, ``num_groups``, ``num_completions``,
    ``num_completion_tokens``, ``max_prefix_len``, ``max_suffix_len``,
    ``max_group_suffix_tokens``, and the packing members of
    :class:`~prefix_grouper.layout.packing.CompletionPacking`. Sequence ``i`` is completion
    ``i`` after its group's prompt. Prefixes hold at least one token (the token that predicts
    the first completion token); completions may be empty (they then own no packed token).
    """

    has_completions = True
    prefix_lens: torch.Tensor
    group_sizes: torch.Tensor
    suffix_lens: torch.Tensor
    completion_group: torch.Tensor
    first_completion: torch.Tensor
    suffix_starts: torch.Tensor
    token_completion: torch.Tensor
    prefix_lens_list: tuple[int, ...]
    group_sizes_list: tuple[int, ...]
    suffix_lens_list: tuple[int, ...]
    num_groups: int
    num_completions: int
    num_completion_tokens: int
    max_prefix_len: int
    max_suffix_len: int
    max_group_suffix_tokens: int
    # pack(): the group whose prompt row each packed token is read from.
    _token_prompt_group: torch.Tensor

    def __init__(self, prefix_lens: Sequence[int], suffix_lens: Sequence[Sequence[int]], tree: SequenceTree,
                 device: torch.device | str | None = None) -> None:
        """``tree``: the prompts' tree with completion ``j`` the leaf ``tree.sequence_segments[j]``."""
        self._init_tree(Segmentation(tree.segments), tree.sequence_segments, device)
        self._init_completions(prefix_lens, suffix_lens)
        self._sources = (tuple(prefix_lens), tuple(tuple(g) for g in suffix_lens), tree)
        _, _, source, lens = self._tables()
        self._token_prompt_group = prompt_group_of_tokens(self.completion_group, lens, sum(self.sequence_lens_list),
                                                          source)

    def _init_completions(self, prefix: Sequence[int], groups: Sequence[Sequence[int]]) -> None:
        self.prefix_lens_list = tuple(prefix)
        self.group_sizes_list = tuple(len(g) for g in groups)
        self.suffix_lens_list = tuple(s for g in groups for s in g)
        self.num_groups = len(prefix)
        self.num_completions = len(self.suffix_lens_list)
        self.num_completion_tokens = sum(self.suffix_lens_list)
        self.max_prefix_len = max(prefix)
        self.max_suffix_len = max(self.suffix_lens_list)
        self.max_group_suffix_tokens = max(sum(g) for g in groups)
        for name, tensor in completion_tensors(self.segmentation, prefix, groups, self._sequence_segments,
                                               self.token_segment, self.device).items():
            setattr(self, name, tensor)

    @property
    def suffix_lens_per_group(self) -> list[tuple[int, ...]]:
        """Group b's completion lengths, ``suffix_lens_list`` cut per group."""
        return split_by_group(self.suffix_lens_list, self.group_sizes_list)


class FlatLayout(CompletionLayout):
    """A :class:`CompletionLayout` whose groups are contiguous packed ranges,
    ``prefix_b, suffix_b1..suffix_bG`` group after group (``from_lengths``, and
    ``from_padded`` when no run is shared across groups). Its tree has depth 1: each
    group's prefix is a root, its completions the root's children.

    ========================  =================  ===============================================
    attribute                 shape, dtype       meaning
    ========================  =================  ===============================================
    ``cu_group_seqlens``      [B+1] int64        packed start of every group, then T
    ``prefix_starts``         [B] int64          packed start of every prefix
    ``cu_seqlens``            [B+N+1] int64      starts of all segments in packed order, then T
    ``token_group``           [T] int64          group of every packed token (``token_root``)
    ``host_lengths``          [1+2B+N] CPU       the lengths as :func:`encode_host_lengths`
                                                 encodes them, for callers that build on them
    ========================  =================  ===============================================
    """

    is_flat = True
    cu_group_seqlens: torch.Tensor
    prefix_starts: torch.Tensor
    cu_seqlens: torch.Tensor
    token_group: torch.Tensor

    def __init__(self, prefix_lens: Sequence[int], suffix_lens: Sequence[Sequence[int]],
                 device: torch.device | str | None = None) -> None:
        prefix, groups = checked_lengths(prefix_lens, suffix_lens)
        segmentation = Segmentation.from_lengths(prefix, groups)
        completions = [s for s, segment in enumerate(segmentation.segments) if segment.parent >= 0]
        self._init_tree(segmentation, completions, device)
        self._init_completions(prefix, groups)
        for name, tensor in flat_tensors(segmentation, self.device).items():
            setattr(self, name, tensor)
        self.token_group = self._token_prompt_group = self.token_root
        self._sources = (tuple(prefix), tuple(tuple(g) for g in groups))

    @property
    def host_lengths(self) -> torch.Tensor:
        """``[1 + 2B + N]`` read-only CPU int64: B, the prefix lengths, the group sizes, the
        completion lengths (:func:`~prefix_grouper.layout.encode_host_lengths`). Ops read
        ``host_segments``; this tensor reaches the same per-layout cache, and
        :func:`~prefix_grouper.layout.segmentation_of` accepts it too."""
        host = self.__dict__.get("_host_lengths")
        if host is None:
            host = self.__dict__["_host_lengths"] = encode_host_lengths(
                self.prefix_lens_list, self.group_sizes_list, self.suffix_lens_list)
            share_layout_cache(host, self.host_segments)
        return host

    def micro_batch_groups(self, *, max_rows: int | None = None, max_tokens: int | None = None) -> list[range]:
        """Consecutive whole groups per micro-batch (ranges of group indices), each within
        ``max_rows`` completions and/or ``max_tokens`` packed tokens; a group over a budget
        runs alone (:func:`prefix_grouper.micro_batches.micro_batch_groups`)."""
        group_tokens = [prefix + sum(suffixes)
                        for prefix, suffixes in zip(self.prefix_lens_list, self.suffix_lens_per_group)]
        return micro_batch_groups(self.group_sizes_list, max_rows=max_rows,
                                  tokens_per_group=None if max_tokens is None else group_tokens,
                                  max_tokens=max_tokens)

    def __repr__(self) -> str:
        return (f"GroupLayout(groups={self.num_groups}, completions={self.num_completions}, "
                f"tokens={self.total_tokens}, max_prefix={self.max_prefix_len}, "
                f"max_suffix={self.max_suffix_len}, device={self.device})")
