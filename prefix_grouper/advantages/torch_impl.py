"""Vectorized PyTorch backend: per-group statistics with index_add, no loop over groups.

Statistics are two-pass (the mean first, then the sum of squared deviations from it), which
stays accurate when rewards sit far from zero, unlike ``E[x^2] - E[x]^2``.
"""
from __future__ import annotations

import torch

from .options import NormalizeOptions
from .grouping import Segments

__all__ = ["batch_std", "group_normalize_torch"]


def batch_std(values: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """``[B]`` std of the non-NaN entries of every row of ``values [B, N]``; 1 for a row with
    fewer than two valid entries.

    Stays on the device (no synchronization); every backend uses it for ``scale="batch"``.
    """
    valid = ~torch.isnan(values)
    count = valid.sum(-1)
    mean = torch.where(valid, values, 0).sum(-1) / count.clamp(min=1)
    m2 = torch.where(valid, values - mean[..., None], 0).square().sum(-1)
    denominator = (count - 1 if unbiased else count).clamp(min=1)
    return torch.where(count >= 2, torch.sqrt(m2 / denominator), torch.ones_like(m2))


def group_normalize_torch(values: torch.Tensor, segments: Segments, options: NormalizeOptions,
                          batch_scale: torch.Tensor | None) -> torch.Tensor:
    """``[N]`` advantages of float64 ``values [N]`` within ``segments``.

    See :func:`prefix_grouper.advantages.grpo_advantages` for the definition; ``batch_scale``
    (``[G]``, the batch std of every segment) is read when ``options.scale == "batch"``.
    """
    ids, num_groups = segments.ids, segments.num_groups
    valid = ~torch.isnan(values)
    zeros = values.new_zeros(num_groups)
    count = zeros.index_add(0, ids, valid.to(values.dtype))
    mean = zeros.index_add(0, ids, torch.where(valid, values, 0)) / count.clamp(min=1)
    deviation = torch.where(valid, values - mean.index_select(0, ids), 0)
    singleton = (count == 1).index_select(0, ids)
    # A lone valid value is measured against mean 0 and std 1 ("raw": it keeps its value) or gets 0.
    numerator = torch.where(singleton, values if options.singleton_raw else 0.0, deviation)
    if options.scale == "group":
        m2 = zeros.index_add(0, ids, deviation.square())
        std = torch.sqrt(m2 / (count - 1 if options.unbiased else count).clamp(min=1)).index_select(0, ids)
    elif options.scale == "batch":
        std = batch_scale.index_select(0, ids)
    if options.scale != "none":
        numerator = numerator / (torch.where(singleton, 1.0, std) + options.eps)
    return torch.where(valid, numerator, 0.0)
