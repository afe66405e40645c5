"""GRPO: outcome rewards normalized within each prompt's group, in the verl, TRL or OpenRLHF convention."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..advantages import grpo_advantages
from ..checks import check_choice

if TYPE_CHECKING:
    from .rollout import RolloutRows

__all__ = ["CONVENTIONS", "GRPO"]

# eps added to the group std by each framework's GRPO advantage: verl's compute_grpo_outcome_advantage
# (1e-6), TRL's GRPOTrainer (1e-4), OpenRLHF's group_norm (1e-9).
CONVENTIONS = {"verl": 1e-6, "trl": 1e-4, "openrlhf": 1e-9}


@dataclass
class GRPO:
    """``A = (r - mean_group) / (std_group + eps)`` of the outcome reward ``rows.reward``
    (the task's weighted channels, or an episode's return on every one of its step rows).

    ``scale`` is ``grpo_advantages``'s: "group", "batch" (TRL's ``scale_rewards="batch"``) or "none".
    """
    convention: str = "verl"
    scale: str = "group"
    name: str = "grpo"

    def __post_init__(self) -> None:
        check_choice(self.convention, "convention", tuple(CONVENTIONS))

    def advantages(self, rows: RolloutRows) -> torch.Tensor:
        return grpo_advantages(rows.reward, rows.group, scale=self.scale, eps=CONVENTIONS[self.convention])
