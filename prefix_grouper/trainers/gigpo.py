"""GiGPO: episode-level plus anchor-state-level advantages of every environment step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..advantages import discounted_returns, gigpo_advantages

if TYPE_CHECKING:
    from .rollout import RolloutRows

__all__ = ["GiGPO"]


@dataclass
class GiGPO:
    """``A_E + omega * A_S`` (paper defaults: gamma 0.95, omega 1, mean_norm).

    Rows (see :func:`~prefix_grouper.trainers.rollout.sample_episodes`) come in anchor-group
    order; discounted returns need each trajectory's rows in time order, so they are
    computed on the rows sorted by (trajectory, time) and put back.
    """
    gamma: float = 0.95
    omega: float = 1.0
    mode: str = "mean_norm"
    name: str = "gigpo"

    def advantages(self, rows: RolloutRows) -> torch.Tensor:
        span = int(rows.time.max()) + 1
        order = torch.argsort(rows.traj * span + rows.time)
        step_returns = torch.empty_like(rows.step_reward)
        step_returns[order] = discounted_returns(rows.step_reward[order], rows.traj[order], self.gamma)
        return gigpo_advantages(rows.reward, step_returns, rows.group, rows.anchor, omega=self.omega,
                                mode=self.mode)
