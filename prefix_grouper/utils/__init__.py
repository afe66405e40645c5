"""Helpers of the paper package's API (``prefix_grouper.utils``), kept for code written for it."""
from __future__ import annotations

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
    counts = torch.as_tensor(num_samples, dtype=torch.long, device=prefix.device)
    if counts.dim() != 1 or counts.shape[0] != prefix.shape[0]:
        raise ValueError(f"num_samples must hold one count per prefix row ({prefix.shape[0]}), "
                         f"got shape {tuple(counts.shape)}")
    repeated = prefix.repeat_interleave(counts, dim=0)
    return torch.cat([repeated, suffix], dim=cat_dim)
