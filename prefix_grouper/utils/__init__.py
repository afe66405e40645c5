"""Helpers of the paper package's API (``prefix_grouper.utils``), kept for code written for it."""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

__all__ = ["batch_repeat_cat"]


def batch_repeat_cat(prefix: torch.Tensor, suffix: torch.Tensor, cat_dim: int,
                     num_samples: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Row ``b`` of ``prefix`` repeated ``num_samples[b]`` times (batch-first), then
    concatenated with ``suffix`` along ``cat_dim``.

    ``prefix [B, ...]``, ``suffix [sum(num_samples), ...]``: e.g. each prompt's last logits
    put in front of each of its completions' logits.
    """
    if not isinstance(prefix, torch.Tensor) or not isinstance(suffix, torch.Tensor):
        raise TypeError(f"prefix and suffix must be tensors, got {type(prefix).__name__} and {type(suffix).__name__}")
    counts = _checked_counts(num_samples, prefix.shape[0])
    if prefix.dim() == 0 or suffix.dim() != prefix.dim():
        raise ValueError(f"prefix and suffix must have the same number (>= 1) of dims, got shapes "
                         f"{tuple(prefix.shape)} and {tuple(suffix.shape)}")
    along_batch = cat_dim % prefix.dim() == 0 if -prefix.dim() <= cat_dim < prefix.dim() else False
    total = sum(counts)
    if not along_batch and total != suffix.shape[0]:
        raise ValueError(f"num_samples sums to {total} rows, but suffix has {suffix.shape[0]}: num_samples[b] is "
                         f"the number of suffix rows of prefix row b")
    repeated = prefix.repeat_interleave(torch.tensor(counts, dtype=torch.long, device=prefix.device), dim=0)
    return torch.cat([repeated, suffix], dim=cat_dim)


def _checked_counts(num_samples: torch.Tensor | Sequence[int], rows: int) -> list[int]:
    """``num_samples`` as a list of ``rows`` ints >= 0 (read on the host), or a clear error:
    a float count would be truncated by the cast, a negative one fail inside repeat_interleave."""
    if isinstance(num_samples, torch.Tensor):
        if num_samples.dtype == torch.bool or num_samples.dtype.is_floating_point or num_samples.dtype.is_complex:
            raise TypeError(f"num_samples must hold integer counts, got a {num_samples.dtype} tensor")
        if num_samples.dim() != 1:
            raise ValueError(f"num_samples must be 1-D, one count per prefix row, got shape "
                             f"{tuple(num_samples.shape)}")
        counts = num_samples.tolist()
    elif isinstance(num_samples, Sequence) and not isinstance(num_samples, (str, bytes)):
        counts = list(num_samples)
        bad = [c for c in counts if isinstance(c, bool) or not isinstance(c, numbers.Integral)]
        if bad:
            raise TypeError(f"num_samples must hold integer counts, got {bad[0]!r} ({type(bad[0]).__name__})")
        counts = [int(c) for c in counts]
    else:
        raise TypeError(f"num_samples must be a 1-D integer tensor or a list of ints, got {type(num_samples).__name__}")
    if len(counts) != rows:
        raise ValueError(f"num_samples must hold one count per prefix row ({rows}), got {len(counts)}")
    if any(c < 0 for c in counts):
        raise ValueError(f"num_samples must be counts >= 0, got {min(counts)}")
    return counts
