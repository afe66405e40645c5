"""Batches of runs of the packed token axis, and the moves between them and packed tensors.

A call of the torch backend reads R runs of the packed axis as the rows of one batched
``[R, H, W, ...]`` tensor. Runs of equal length at equal spacing (a regular layout: equal
prompts, equal completions, a key run broadcast to R query rows) are an ``as_strided``
view of the packed tensor: no copy in, and the results are written straight into the
packed output through the same view. Other batches are gathered (a copy of that batch
alone, freed after its call) and scattered back with ``index_copy_`` / ``index_add_``.
Shorter runs of a gathered batch are padded to the longest, the padding filled with a
caller's value (never a neighbour's token: a NaN there would reach the padded slots'
zero-probability gradients).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Rows", "accumulate", "batch", "broadcast_rows", "evenly_spaced", "packed", "rows_of", "tiles",
           "write"]


class Rows(NamedTuple):
    """``count`` runs, each ``width`` slots of the batched tensor.

    A view when ``stride`` is set: run r is the packed range ``[start + r stride, + width)``
    (``stride`` 0: one run read by every row). Else gathered: ``index [count * width]`` is
    the packed token of every slot, and with padding ``padding`` lists the padded slots (their
    index clamped to a real token), ``real`` the others and ``targets`` their packed tokens."""

    count: int
    width: int
    start: int = 0
    stride: int | None = None
    index: torch.Tensor | None = None
    padding: torch.Tensor | None = None
    real: torch.Tensor | None = None
    targets: torch.Tensor | None = None


def evenly_spaced(starts: list[int], lengths: list[int]) -> bool:
    """Whether the runs ``[starts[r], + lengths[r])`` have one length and one spacing (a view)."""
    return min(lengths) == max(lengths) and len({b - a for a, b in zip(starts, starts[1:])}) <= 1


def rows_of(starts: list[int], lengths: list[int], device: torch.device) -> Rows:
    """The batch of runs ``[starts[r], + lengths[r])`` (disjoint): a view where every run has
    the same length and the runs are equally spaced, else gathered."""
    count, width = len(starts), max(lengths)
    if evenly_spaced(starts, lengths):
        return Rows(count, width, starts[0], starts[1] - starts[0] if count > 1 else width)
    start, length = (torch.tensor(column, dtype=torch.long, device=device)[:, None] for column in (starts, lengths))
    columns = torch.arange(width, device=device)[None, :]
    index = (start + torch.minimum(columns, length - 1)).flatten()
    if min(lengths) == width:
        return Rows(count, width, index=index)
    is_real = (columns < length).flatten()
    real = is_real.nonzero().flatten()
    return Rows(count, width, index=index, padding=(~is_real).nonzero().flatten(), real=real, targets=index[real])


def broadcast_rows(start: int, width: int, count: int) -> Rows:
    """One run ``[start, + width)`` read by ``count`` rows (a view)."""
    return Rows(count, width, start, 0)


def batch(x: torch.Tensor, rows: Rows, padding: float = 0.0) -> torch.Tensor:
    """Packed ``x [T, H, ...]`` at ``rows`` as ``[R, H, W, ...]``: a view, or a gathered copy
    with ``padding`` on the padded slots."""
    if rows.stride is not None:
        s = x.stride()
        return x.as_strided((rows.count, x.shape[1], rows.width, *x.shape[2:]), (rows.stride * s[0], s[1], s[0], *s[2:]),
                            x.storage_offset() + rows.start * s[0])
    gathered = x.index_select(0, rows.index)
    if rows.padding is not None:
        gathered.index_fill_(0, rows.padding, padding)
    return gathered.view(rows.count, rows.width, *x.shape[1:]).transpose(1, 2)


def tiles(rows: Rows, total_tokens: int) -> bool:
    """Whether ``rows`` are every packed token in order: a batch's results are then the
    packed results (:func:`packed`)."""
    return rows.start == 0 and rows.stride == rows.width and rows.count * rows.width == total_tokens


def packed(values: torch.Tensor) -> torch.Tensor:
    """``values [R, H, W, ...]`` of a batch that :func:`tiles` the packed axis, as the packed
    ``[R W, H, ...]``: a view of the CPU kernels' token-major results, no copy."""
    return values.transpose(1, 2).flatten(0, 1)


def _flat(values: torch.Tensor, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed index, values [n, H, ...])`` of a gathered batch's real slots."""
    flat = packed(values)
    if rows.real is None:
        return rows.index, flat
    return rows.targets, flat.index_select(0, rows.real)


def write(packed: torch.Tensor, rows: Rows, values: torch.Tensor) -> None:
    """``packed`` at ``rows`` = ``values [R, H, W, ...]`` (real slots; runs disjoint)."""
    if rows.stride is not None:
        batch(packed, rows).copy_(values)
    else:
        packed.index_copy_(0, *_flat(values, rows))


def accumulate(packed: torch.Tensor, rows: Rows, values: torch.Tensor) -> None:
    """``packed`` at ``rows`` += ``values [R, H, W, ...]``; a broadcast run takes the sum of
    its rows (in row order: deterministic)."""
    if rows.stride == 0:
        packed[rows.start:rows.start + rows.width] += values.sum(0).transpose(0, 1)
    elif rows.stride is not None:
        batch(packed, rows).add_(values)
    else:
        packed.index_add_(0, *_flat(values, rows))
