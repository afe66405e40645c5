"""A layout as one CPU tensor (``host_segments``; a flat layout's ``host_lengths`` too), and
the per-layout cache keyed by that tensor.

Ops that must not synchronize with the device (the Triton custom ops, under torch.compile
too) receive a layout as this one tensor; everything they derive from it is memoized here.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["cached_per_layout", "decode_host_lengths", "decode_host_segments", "encode_host_lengths",
           "encode_host_segments", "share_layout_cache", "split_by_group"]


def split_by_group(flat: Sequence[Any], group_sizes: Sequence[int]) -> list[tuple[Any, ...]]:
    """``flat`` (one entry per completion, group after group) cut into one tuple per group."""
    out, start = [], 0
    for size in group_sizes:
        out.append(tuple(flat[start:start + size]))
        start += size
    return out


def encode_host_lengths(prefix_lens: Sequence[int], group_sizes: Sequence[int],
                        suffix_lens: Sequence[int]) -> torch.Tensor:
    """The layout as one read-only CPU int64 tensor ``[1 + 2B + N]``: B, the prefix lengths,
    the group sizes, then the completion lengths.

    Ops read it without a device sync, and torch.compile sees one tensor input (never of
    size 0 or 1, so never specialized) instead of specializing on the host ints.
    """
    return torch.tensor([len(prefix_lens), *prefix_lens, *group_sizes, *suffix_lens],
                        dtype=torch.long, device="cpu")


def decode_host_lengths(host_lengths: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(prefix_lens [B], group_sizes [B], suffix_lens [N])`` of :func:`encode_host_lengths`'s tensor."""
    if (not isinstance(host_lengths, torch.Tensor) or host_lengths.device.type != "cpu"
            or host_lengths.dtype != torch.int64 or host_lengths.dim() != 1):
        raise ValueError("host_lengths must be a 1-D CPU int64 tensor (GroupLayout.host_lengths)")
    values = host_lengths.tolist()  # a CPU tensor: no device synchronization
    num_groups = values[0] if values else 0
    prefix = tuple(values[1:1 + num_groups])
    sizes = tuple(values[1 + num_groups:1 + 2 * num_groups])
    suffix = tuple(values[1 + 2 * num_groups:])
    if (num_groups < 1 or len(sizes) != num_groups or sum(sizes) != len(suffix)
            or min(prefix) < 1 or min(sizes) < 1 or (suffix and min(suffix) < 0)):
        raise ValueError("host_lengths is not [B, prefix_lens (>= 1) x B, group_sizes (>= 1) x B, "
                         "completion_lens (>= 0) x sum(group_sizes)]; use GroupLayout.host_lengths")
    return prefix, sizes, suffix


def encode_host_segments(segments: Sequence[Sequence[int]]) -> torch.Tensor:
    """The layout's segments ``(start, length, parent)`` in packed order as one read-only
    CPU int64 tensor ``[S, 3]``: the prefix tree, for ops that must not synchronize."""
    rows = [tuple(segment) for segment in segments]
    # Not a view (no reshape): aot_autograd replays views of graph inputs as new tensors, and the
    # per-layout cache is keyed by this tensor's identity.
    return torch.tensor(rows, dtype=torch.long) if rows else torch.empty((0, 3), dtype=torch.long)


def decode_host_segments(host_segments: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(start, length, parent)`` per segment of :func:`encode_host_segments`'s tensor
    (:class:`~prefix_grouper.layout.Segmentation` checks them)."""
    if (not isinstance(host_segments, torch.Tensor) or host_segments.device.type != "cpu"
            or host_segments.dtype != torch.int64 or host_segments.dim() != 2 or host_segments.shape[1] != 3
            or host_segments.shape[0] == 0):
        raise ValueError("host_segments must be a non-empty [S, 3] CPU int64 tensor of (start, length, parent) "
                         "rows (GroupLayout.host_segments)")
    return [tuple(row) for row in host_segments.tolist()]  # a CPU tensor: no device synchronization


# host tensor (host_lengths or host_segments) -> {key: value}: the one cache of per-layout data (segmentation, tile
# schedules, plans). Keyed by identity (tensors compare by value); an entry vanishes with its
# tensor, hence with its layout. A flat layout's host_lengths shares its host_segments' entry.
_PER_LAYOUT: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def cache_key(key: Any) -> tuple:
    """The one key format: ``(name, *parameters)``, a tuple whose first entry is a string
    naming what is cached; a bare name means ``(name,)``."""
    if isinstance(key, str):
        return (key,)
    if not isinstance(key, tuple) or not key or not isinstance(key[0], str):
        raise TypeError(f"key must be (name: str, *parameters), got {key!r}")
    return key


def cached_per_layout(host_lengths: torch.Tensor, key: Any, build: Callable[[], Any]) -> Any:
    """Memoize ``build()`` under ``key`` (``(name, *parameters)``, see :func:`cache_key`) for
    the layout whose ``host_lengths`` or ``host_segments`` this is."""
    key = cache_key(key)
    entry = _PER_LAYOUT.get(host_lengths)
    if entry is None:
        entry = _PER_LAYOUT[host_lengths] = {}
    if key not in entry:
        entry[key] = build()
    return entry[key]


def share_layout_cache(alias: torch.Tensor, host_segments: torch.Tensor) -> None:
    """Make ``alias`` (a flat layout's ``host_lengths``) reach the same per-layout cache as
    its ``host_segments``: one cache per layout, whichever tensor a caller holds."""
    entry = _PER_LAYOUT.get(host_segments)
    if entry is None:
        entry = _PER_LAYOUT[host_segments] = {}
    _PER_LAYOUT[alias] = entry
