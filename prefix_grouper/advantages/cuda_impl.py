"""CUDA backend: ``torch.ops.prefix_grouper.group_normalize`` from csrc/advantages.cpp."""
from __future__ import annotations

import functools

import torch

from .._extension import require_cuda_extension
from .options import NormalizeOptions
from .grouping import Segments

__all__ = ["group_normalize_cuda"]


@functools.lru_cache(maxsize=None)
def _group_normalize_op():
    require_cuda_extension("backend='cuda' of prefix_grouper.advantages")

    # Shape-only twin of the op, so torch.compile / meta tensors can trace through it.
    @torch.library.register_fake("prefix_grouper::group_normalize")
    def _(values, perm, offsets, batch_scale, scale, eps, unbiased, singleton_raw):
        return torch.empty_like(values)

    return torch.ops.prefix_grouper.group_normalize


def group_normalize_cuda(values: torch.Tensor, segments: Segments, options: NormalizeOptions,
                         batch_scale: torch.Tensor | None) -> torch.Tensor:
    """``[N]`` advantages of contiguous float32/float64 CUDA ``values [N]`` within ``segments``;
    ``batch_scale``: ``[G]``, read when ``options.scale == "batch"``."""
    return _group_normalize_op()(values, segments.perm, segments.offsets, batch_scale, options.scale_code,
                                 options.eps, options.unbiased, options.singleton_raw)
