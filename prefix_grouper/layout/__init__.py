"""Packed shared-prefix layout of a GRPO batch.

A batch holds B groups. Group b has one prompt (prefix) of ``P_b`` tokens and ``G_b``
completions (suffixes) of ``S_b1 .. S_bG`` tokens. The packed token axis holds, group
after group, ``prefix_b, suffix_b1, ..., suffix_bG``; its length is
``T = sum_b (P_b + sum_i S_bi)``.

Vocabulary: the layout and attention say *prefix* and *suffix* (``prefix_lens``,
``suffix_lens``: lengths on the packed axis); functions that take model inputs say
*prompt* and *completion* (``prompt_ids``, ``completion_mask``). A group's prefix is its
prompt, suffix ``i`` its completion ``i``.

Everything here is computed once per batch, from host-side lengths, so that attention
forward and backward never have to synchronize with the device to learn a shape.

Modules: :mod:`.host` (the layout as one CPU tensor, and the per-layout cache keyed by it),
:mod:`.segmentation` (segments and the key runs each one's queries see: the one owner of
segmentation, which the attention backends read), :mod:`.construction` (checked lengths from
lengths or padded masks, index tensors), :mod:`.tree` (the radix tree of token sequences),
:mod:`.sequences` (what every layout, a prefix tree of any depth, answers per sequence),
:mod:`.group_layout` (:class:`GroupLayout`, the core every op reads: a prefix tree and its one
host encoding; its kinds :class:`TreeLayout`, a bare tree, and the GRPO view on the tree,
:class:`CompletionLayout`, groups of completions under their prompts, and :class:`FlatLayout`,
whose groups are contiguous ranges), :mod:`.packing` (packing padded
prompt/completion rows), :mod:`.broadcast` (per-completion values onto tokens or padded rows).

Prefix trees: ``GroupLayout.from_sequences`` packs the radix tree of full token sequences
(system prompts, multi-turn branches, per-step histories shared once); a GRPO group is the
depth-1 tree.
"""
from .broadcast import broadcast_to_padded, broadcast_to_tokens
from .group_layout import CompletionLayout, FlatLayout, GroupLayout, NotOneLevelError, TreeLayout
from .host import (cache_key, cached_per_layout, decode_host_lengths, decode_host_segments, encode_host_lengths,
                   encode_host_segments, split_by_group)
from .segmentation import KeyRun, Segment, Segmentation, segmentation_of

__all__ = [
    "GroupLayout",
    "CompletionLayout",
    "FlatLayout",
    "TreeLayout",
    "NotOneLevelError",
    "KeyRun",
    "Segment",
    "Segmentation",
    "broadcast_to_padded",
    "broadcast_to_tokens",
    "cache_key",
    "cached_per_layout",
    "decode_host_lengths",
    "decode_host_segments",
    "encode_host_lengths",
    "encode_host_segments",
    "segmentation_of",
    "split_by_group",
]
