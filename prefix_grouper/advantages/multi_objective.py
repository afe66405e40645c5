"""Advantages from several reward channels (CRPO; TRL multi-reward aggregation)."""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from ..checks import as_index, check_bool, check_choice, check_float_tensor
from .dispatch import check_no_inf, normalize_in_groups, resolve_backend
from .options import MULTI_OBJECTIVE_MODES, NormalizeOptions
from .grouping import Segments

__all__ = ["multi_objective_advantages"]


def _as_weights(weights: torch.Tensor | Sequence[float], rewards: torch.Tensor) -> torch.Tensor:
    """``weights`` as a finite float64 ``[K]`` tensor on the device of ``rewards [N, K]``."""
    num_objectives = rewards.shape[1]
    if isinstance(weights, torch.Tensor) and weights.device != rewards.device:
        raise ValueError(f"weights is on {weights.device} but rewards is on {rewards.device}")
    try:
        weights = torch.as_tensor(weights, dtype=torch.float64, device=rewards.device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"weights must be a tensor or sequence of real numbers, got "
                        f"{type(weights).__name__} ({exc})") from exc
    if weights.dim() != 1 or weights.shape[0] != num_objectives:
        raise ValueError(f"weights must have one entry per objective column of rewards ({num_objectives}), "
                         f"got shape {tuple(weights.shape)}")
    if not bool(torch.isfinite(weights).all()):
        # A NaN or inf weight would spread NaN over every advantage of the batch.
        raise ValueError(f"weights must be finite, got {weights.tolist()}")
    return weights


@torch.no_grad()
def multi_objective_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor | Sequence[int],
    weights: torch.Tensor | Sequence[float],
    *,
    mode: str = "sum_then_normalize",
    scale: str = "group",
    eps: float = 1e-6,
    unbiased: bool = True,
    singleton: str = "raw",
    batch_normalize: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Advantages from ``K`` reward channels (CRPO; TRL multi-reward aggregation).

    Args:
        rewards: ``[N, K]`` floating point, one column per objective; NaN marks an objective
            that does not apply to a completion: it adds nothing to the weighted sum, and a
            row with every objective NaN is left out and gets advantage 0. +-inf is refused
            (ValueError).
        group_index: ``[N]`` integer group ids, as in
            :func:`~prefix_grouper.advantages.grpo_advantages`.
        weights: ``[K]`` finite weight of every objective (used in float64).
        mode: ``"sum_then_normalize"``: weighted sum, then
            :func:`~prefix_grouper.advantages.grpo_advantages` of it; ``"normalize_then_sum"``:
            each objective normalized within its group (scale, eps, unbiased and singleton
            as in :func:`~prefix_grouper.advantages.grpo_advantages`; scale "batch" divides
            each objective by that objective's own batch std), weighted sum, then
            (``batch_normalize``) ``(x - mean) / (std + eps)`` over the whole batch.
        batch_normalize: only for "normalize_then_sum"; False stops after the weighted sum.
        scale, eps, unbiased, singleton, backend: as in
            :func:`~prefix_grouper.advantages.grpo_advantages` (the final whole-batch step of
            "normalize_then_sum" always runs on torch).

    Returns ``[N]`` advantages in the dtype of ``rewards``: constants, computed under
    ``torch.no_grad()`` on every backend (the result never requires grad).
    """
    check_float_tensor(rewards, "rewards", 2)
    num_rows, num_objectives = rewards.shape
    if num_objectives == 0:
        raise ValueError("rewards has 0 objective columns; expected shape [N, K] with K >= 1")
    ids = as_index(group_index, "group_index", num_rows, rewards.device, "rewards")
    weights = _as_weights(weights, rewards)
    check_choice(mode, "mode", MULTI_OBJECTIVE_MODES)
    check_bool(batch_normalize, "batch_normalize")
    # The final whole-batch step of "normalize_then_sum" divides by the std whatever the scale.
    options = NormalizeOptions.checked(scale, eps, unbiased, singleton,
                                       divides=mode == "normalize_then_sum" and batch_normalize)
    if mode == "sum_then_normalize" and not batch_normalize:
        raise ValueError("batch_normalize=False applies to mode='normalize_then_sum' only")
    backend = resolve_backend(backend, rewards.device)
    check_no_inf(rewards, "rewards")

    # Every step in float64, rounded to the dtype of rewards once at the end: no rounding of
    # the per-objective advantages before their sum, and no TF32 in the weighted-sum matmul.
    values = rewards.to(torch.float64)
    missing = torch.isnan(values)
    row_missing = missing.all(1)
    groups = Segments(ids)
    if mode == "sum_then_normalize":
        total = torch.where(missing, 0.0, values) @ weights
        total = torch.where(row_missing, math.nan, total)
        return normalize_in_groups(total, groups, options, backend).to(rewards.dtype)

    # All objectives in one call: objective k of group g is segment k * G + g (sorted when
    # the group ids are, so the kernels skip the permutation); each objective is a batch.
    objective = torch.arange(num_objectives, device=rewards.device)
    segment_of = (objective[:, None] * groups.num_groups + groups.ids[None, :]).reshape(-1)
    per_objective = normalize_in_groups(values.t().reshape(-1), Segments(segment_of), options, backend,
                                        num_batches=num_objectives)
    total = per_objective.view(num_objectives, num_rows).t() @ weights
    if not batch_normalize:
        return torch.where(row_missing, 0.0, total).to(rewards.dtype)
    total = torch.where(row_missing, math.nan, total)
    whole_batch = Segments(torch.zeros(num_rows, dtype=torch.long, device=rewards.device))
    # One group leaves a segmented kernel a single program or warp; torch's full reductions
    # parallelize over the rows instead.
    final = normalize_in_groups(total, whole_batch, dataclasses.replace(options, scale="group"), "torch")
    return final.to(rewards.dtype)
