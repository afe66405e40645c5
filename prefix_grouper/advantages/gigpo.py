"""GiGPO advantages for agents: episode level plus step level within anchor states."""
from __future__ import annotations

from typing import Sequence

import torch

from ..checks import as_index, check_choice, check_finite_real, check_float_tensor
from .dispatch import check_no_inf, normalize_in_groups, resolve_backend
from .options import EPISODE_STATS, GIGPO_MODES, NormalizeOptions, check_eps
from .grouping import Segments

__all__ = ["gigpo_advantages"]


@torch.no_grad()
def gigpo_advantages(
    episode_returns: torch.Tensor,
    step_returns: torch.Tensor,
    group_index: torch.Tensor | Sequence[int],
    anchor_index: torch.Tensor | Sequence[int],
    *,
    omega: float = 1.0,
    mode: str = "mean_norm",
    eps: float = 1e-6,
    traj_index: torch.Tensor | Sequence[int] | None = None,
    episode_stats: str = "rows",
    backend: str = "auto",
) -> torch.Tensor:
    """GiGPO advantages ``A_E + omega * A_S`` of every environment step (training row).

    Args:
        episode_returns: ``[N]`` return of the row's whole trajectory (the same on all its rows).
        step_returns: ``[N]`` discounted return from the row's step on
            (:func:`~prefix_grouper.advantages.discounted_returns`).
        group_index: ``[N]`` integer task group (trajectories from one initial state).
        anchor_index: ``[N]`` integer anchor state
            (:func:`~prefix_grouper.advantages.anchor_index_from_states`); a step group is
            one (group_index, anchor_index) pair, so anchor ids may repeat across groups.
        omega: finite weight of the step-level advantage.
        mode: ``"mean_norm"``: ``x - mean`` at both levels; ``"mean_std_norm"``:
            ``(x - mean) / (std + eps)`` (unbiased std).
        eps: finite, added to the std in "mean_std_norm" (there > 0).
        traj_index: ``[N]`` integer trajectory of every row; required by
            ``episode_stats="trajectories"`` and refused (ValueError) with ``"rows"``.
        episode_stats: episode statistics over ``"rows"`` (every step row of the group
            counts, so long trajectories weigh more; the verl-agent default) or
            ``"trajectories"`` (one entry per trajectory).
        backend: as in :func:`~prefix_grouper.advantages.grpo_advantages`.

    A group with a single episode entry uses mean 0 and std 1 (``A_E`` keeps the return);
    an anchor group with a single step contributes ``A_S = 0``. NaN returns are left out of
    the statistics and contribute 0, as in :func:`~prefix_grouper.advantages.grpo_advantages`;
    +-inf returns are refused (ValueError naming the argument).

    Returns ``[N]`` advantages: constants, computed under ``torch.no_grad()`` on every
    backend (the result never requires grad).
    """
    check_float_tensor(episode_returns, "episode_returns", 1)
    check_float_tensor(step_returns, "step_returns", 1)
    if step_returns.shape != episode_returns.shape:
        raise ValueError(f"step_returns has {step_returns.shape[0]} rows but episode_returns has "
                         f"{episode_returns.shape[0]}")
    if step_returns.device != episode_returns.device:
        raise ValueError(f"step_returns is on {step_returns.device} but episode_returns is on "
                         f"{episode_returns.device}")
    like_episodes = (episode_returns.shape[0], episode_returns.device, "episode_returns")
    group = as_index(group_index, "group_index", *like_episodes)
    anchor = as_index(anchor_index, "anchor_index", *like_episodes)
    check_choice(mode, "mode", GIGPO_MODES)
    check_choice(episode_stats, "episode_stats", EPISODE_STATS)
    eps = check_eps(eps, divides=mode == "mean_std_norm")
    omega = check_finite_real(omega, "omega")
    if episode_stats == "trajectories" and traj_index is None:
        raise ValueError("episode_stats='trajectories' needs traj_index, the trajectory of every row")
    if episode_stats == "rows" and traj_index is not None:
        # Refused rather than ignored: passing it suggests per-trajectory statistics were meant.
        raise ValueError("traj_index is only used with episode_stats='trajectories'; with "
                         "episode_stats='rows' leave it None")
    backend = resolve_backend(backend, episode_returns.device)
    check_no_inf(episode_returns, "episode_returns")
    check_no_inf(step_returns, "step_returns")
    scale = "none" if mode == "mean_norm" else "group"
    episode_options = NormalizeOptions(scale=scale, eps=eps, unbiased=True, singleton_raw=True)
    step_options = NormalizeOptions(scale=scale, eps=eps, unbiased=True, singleton_raw=False)

    groups = Segments(group)
    if episode_stats == "rows":
        episode_adv = normalize_in_groups(episode_returns, groups, episode_options, backend)
    else:
        trajectories = Segments(as_index(traj_index, "traj_index", *like_episodes))
        first = trajectories.first_rows()
        _check_constant_per_trajectory(episode_returns, trajectories, first, "episode_returns")
        _check_constant_per_trajectory(groups.ids, trajectories, first, "group_index")
        per_trajectory = normalize_in_groups(episode_returns.index_select(0, first),
                                             Segments(groups.ids.index_select(0, first)),
                                             episode_options, backend)
        episode_adv = per_trajectory.index_select(0, trajectories.ids)

    distinct_anchors, anchor_ids = torch.unique(anchor, return_inverse=True)
    step_group = groups.ids * distinct_anchors.numel() + anchor_ids
    step_adv = normalize_in_groups(step_returns, Segments(step_group), step_options, backend)
    return episode_adv + omega * step_adv


def _check_constant_per_trajectory(values: torch.Tensor, trajectories: Segments, first: torch.Tensor,
                                   name: str) -> None:
    reference = values.index_select(0, first).index_select(0, trajectories.ids)
    differs = values != reference
    if values.dtype.is_floating_point:
        differs &= ~(torch.isnan(values) & torch.isnan(reference))
    if bool(differs.any()):
        row = int(torch.nonzero(differs)[0])
        raise ValueError(f"{name} must be the same on every row of a trajectory (traj_index); row {row} "
                         f"differs from the first row of its trajectory")
