"""The string switches of prefix_grouper.advantages and the one options object every backend takes."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..checks import check_bool, check_choice, check_finite_real

SCALES = ("group", "batch", "none")
SINGLETONS = ("raw", "zero")
MULTI_OBJECTIVE_MODES = ("sum_then_normalize", "normalize_then_sum")
GIGPO_MODES = ("mean_norm", "mean_std_norm")
EPISODE_STATS = ("rows", "trajectories")

# The integer the Triton and CUDA kernels take for every scale (csrc/segmented_stats.h: Scale).
SCALE_CODES = {"group": 0, "batch": 1, "none": 2}


def check_eps(eps: Any, divides: bool) -> float:
    """``eps`` as a finite float >= 0, and > 0 when ``divides`` (advantages are divided by a std)."""
    eps = check_finite_real(eps, "eps")
    if eps < 0:
        raise ValueError(f"eps must be a real number in [0, inf), got {eps!r}")
    if divides and eps == 0.0:
        # A group of identical values has std 0, and eps = 0 would make its advantages 0 / 0.
        raise ValueError("eps must be > 0 when advantages are divided by a std (scale 'group' or 'batch', "
                         "mode 'normalize_then_sum' with batch_normalize, or mode 'mean_std_norm'), got 0")
    return eps


@dataclasses.dataclass(frozen=True)
class NormalizeOptions:
    """How values are normalized within their groups; mirrors ``NormalizeOptions`` of
    csrc/segmented_stats.h, and every backend (torch, triton, cuda) takes it whole.

    Attributes:
        scale: "group" (divide by the group's std + eps), "batch" (by the std of the
            segment's batch + eps) or "none" (only subtract the mean).
        eps: added to the std, a finite float >= 0.
        unbiased: std divides by ``n - 1`` (else ``n``).
        singleton_raw: a group with exactly one valid value is measured against mean 0 and
            std 1 under every scale (it keeps its value: ``x / (1 + eps)``, or ``x`` with
            "none"); False gives it 0.
    """

    scale: str
    eps: float
    unbiased: bool
    singleton_raw: bool

    @classmethod
    def checked(cls, scale: Any, eps: Any, unbiased: Any, singleton: Any,
                divides: bool = False) -> "NormalizeOptions":
        """The options of the public arguments, each checked by name; ``divides``: a later step
        divides by a std even if ``scale`` does not, so ``eps`` must be > 0."""
        check_choice(scale, "scale", SCALES)
        check_choice(singleton, "singleton", SINGLETONS)
        check_bool(unbiased, "unbiased")
        eps = check_eps(eps, divides=divides or scale != "none")
        return cls(scale=scale, eps=eps, unbiased=unbiased, singleton_raw=singleton == "raw")

    @property
    def scale_code(self) -> int:
        return SCALE_CODES[self.scale]
