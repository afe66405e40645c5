"""CRPO: several verifiable reward channels, combined by ``multi_objective_advantages``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..advantages import multi_objective_advantages

if TYPE_CHECKING:
    from .rollout import RolloutRows

__all__ = ["CRPO"]


@dataclass
class CRPO:
    """Advantages of ``rows.channels`` ``[N, K]`` with ``weights`` ``[K]``.

    ``mode``: "sum_then_normalize" (weighted sum, then group-normalize) or
    "normalize_then_sum" (each channel normalized within its group, weighted sum, then
    normalized over the batch).
    """
    weights: tuple[float, ...]
    mode: str = "sum_then_normalize"
    name: str = "crpo"

    def advantages(self, rows: RolloutRows) -> torch.Tensor:
        return multi_objective_advantages(rows.channels, rows.group, self.weights, mode=self.mode)
