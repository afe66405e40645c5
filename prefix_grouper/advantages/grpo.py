"""GRPO outcome advantages (verl / TRL / OpenRLHF conventions)."""
from __future__ import annotations

from typing import Sequence

import torch

from ..checks import as_index, check_float_tensor
from .dispatch import check_no_inf, normalize_in_groups, resolve_backend
from .options import NormalizeOptions
from .grouping import Segments

__all__ = ["grpo_advantages"]


@torch.no_grad()
def grpo_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor | Sequence[int],
    *,
    scale: str = "group",
    eps: float = 1e-6,
    unbiased: bool = True,
    singleton: str = "raw",
    backend: str = "auto",
) -> torch.Tensor:
    """GRPO outcome advantages ``A_j = (r_j - mean_g) / (std_g + eps)``.

    Args:
        rewards: ``[N]`` floating point, one reward per completion; NaN marks an unscorable
            completion: it is left out of every statistic and gets advantage 0. +-inf is
            refused (ValueError): it would turn its group, or the batch, into NaN.
        group_index: ``[N]`` integer group (prompt) id of every completion: any int64
            values, in any order, not necessarily consecutive.
        scale: ``"group"``: divide by the group's std; ``"batch"``: subtract the group mean,
            divide by the std of all non-NaN rewards of the batch; ``"none"``: ``r - mean``
            (no division, eps unused).
        eps: added to the std; a finite real number, > 0 unless scale is "none" (identical
            rewards have std 0).
        unbiased: std divides by ``n - 1`` (else ``n``), ``n`` counting non-NaN rewards.
        singleton: what a group with exactly one non-NaN reward gets (also when NaNs left
            only one): ``"raw"`` measures it against mean 0 and std 1 under every scale, so
            the reward is kept: ``r / (1 + eps)`` with scale "group" or "batch", ``r`` with
            "none"; ``"zero"`` gives it advantage 0. A group whose rewards are all NaN gets
            0 everywhere.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``
            (see :func:`~prefix_grouper.advantages.dispatch.resolve_backend`).

    With "batch", the batch std is 1 when fewer than two rewards are non-NaN.

    Returns ``[N]`` advantages in the dtype and on the device of ``rewards``. Statistics are
    float64 on every backend. Advantages are constants of the policy gradient: every backend
    computes them under ``torch.no_grad()`` and returns a new tensor that does not require
    grad, even when ``rewards`` does.

    The conventions users compare against are one call each:

    - verl ``compute_grpo_outcome_advantage``: ``grpo_advantages(r, uid)`` (eps 1e-6,
      unbiased std, a singleton group keeps its reward); with
      ``norm_adv_by_std_in_grpo=False``: ``grpo_advantages(r, uid, scale="none")``.
    - TRL ``GRPOTrainer``: ``grpo_advantages(r, group, eps=1e-4, scale=s)`` with ``s`` its
      ``scale_rewards`` ("group", "batch" or "none"); NaN rewards as TRL (left out, A = 0).
      TRL needs at least two generations per prompt, so ``singleton`` does not arise.
    - OpenRLHF ``group_norm``: ``grpo_advantages(r, group, eps=1e-9)``.
    """
    check_float_tensor(rewards, "rewards", 1)
    ids = as_index(group_index, "group_index", rewards.shape[0], rewards.device, "rewards")
    options = NormalizeOptions.checked(scale, eps, unbiased, singleton)
    backend = resolve_backend(backend, rewards.device)
    check_no_inf(rewards, "rewards")
    return normalize_in_groups(rewards, Segments(ids), options, backend)
