"""Per-completion values spread over a layout's tokens or over padded completion rows."""
from __future__ import annotations

import torch

from ..checks import check_float_tensor
from .group_layout import GroupLayout

__all__ = ["broadcast_to_padded", "broadcast_to_tokens"]


def _check_values(values: torch.Tensor, num_completions: int, device: torch.device) -> None:
    check_float_tensor(values, "values", 1)
    if values.shape[0] != num_completions:
        raise ValueError(f"values has {values.shape[0]} entries but there are {num_completions} completions")
    if values.device != device:
        raise ValueError(f"values is on {values.device} but the layout / mask is on {device}")


def broadcast_to_tokens(values: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """``[T]``: every completion token of ``layout`` gets its completion's value, prefixes 0.

    Args:
        values: ``[N]`` one value per completion, in the layout's completion order.
        layout: the packed batch (``layout.token_completion`` maps tokens to completions).
    """
    if not isinstance(layout, GroupLayout):
        raise TypeError(f"layout must be a GroupLayout, got {type(layout).__name__}; for padded rows "
                        f"use broadcast_to_padded")
    _check_values(values, layout.num_completions, layout.device)
    completion = layout.token_completion
    return torch.where(completion >= 0, values.index_select(0, completion.clamp(min=0)), 0.0).to(values.dtype)


def broadcast_to_padded(
    values: torch.Tensor, target: GroupLayout | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-completion values on padded completion rows.

    Args:
        values: ``[N]`` one value per completion.
        target: a :class:`GroupLayout` (rows ``[N, max_S]``) or a right-padded
            ``completion_mask [N, L]`` (bool or 0/1), 1 on real tokens.

    Returns ``(padded [N, S], mask [N, S] bool)``; ``padded`` is 0 where ``mask`` is False.
    """
    if isinstance(target, GroupLayout):
        mask = target.completion_mask()
    elif isinstance(target, torch.Tensor) and target.dim() == 2 and not target.dtype.is_floating_point:
        mask = target.bool()
    else:
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise TypeError(f"target must be a GroupLayout or a bool/int completion_mask [N, L], got {shape}")
    _check_values(values, mask.shape[0], mask.device)
    return torch.where(mask, values[:, None], 0.0).to(values.dtype), mask
