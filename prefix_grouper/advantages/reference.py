"""Reference: the advantage definitions as plain float64 Python loops.

Slow and obviously correct; every backend is tested against these. They take the same
arguments as the public functions (minus ``backend``), skip argument checks, and return
float64 CPU tensors.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Hashable, Sequence

import torch

__all__ = ["discounted_returns", "gigpo_advantages", "grpo_advantages", "multi_objective_advantages"]


def _floats(x) -> list[float]:
    return [float(v) for v in (x.tolist() if isinstance(x, torch.Tensor) else x)]


def _ints(x) -> list[int]:
    return [int(v) for v in (x.tolist() if isinstance(x, torch.Tensor) else x)]


def _mean_std(values: list[float], unbiased: bool) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    dof = n - 1 if unbiased else n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / dof) if dof > 0 else 0.0


def _normalize(values: list[float], groups: list[Hashable], scale: str, eps: float, unbiased: bool,
               singleton: str) -> list[float]:
    members: dict[Hashable, list[float]] = defaultdict(list)
    for v, g in zip(values, groups):
        if not math.isnan(v):
            members[g].append(v)
    valid = [v for v in values if not math.isnan(v)]
    batch_std = _mean_std(valid, unbiased)[1] if len(valid) >= 2 else 1.0
    out = []
    for v, g in zip(values, groups):
        if math.isnan(v):
            out.append(0.0)
            continue
        mean, std = _mean_std(members[g], unbiased)
        if scale == "batch":
            std = batch_std
        if len(members[g]) == 1:
            if singleton == "zero":
                out.append(0.0)
                continue
            # "raw": mean 0 and std 1 under every scale, so the value is kept.
            mean, std = 0.0, 1.0
        out.append(v - mean if scale == "none" else (v - mean) / (std + eps))
    return out


def grpo_advantages(rewards, group_index, *, scale="group", eps=1e-6, unbiased=True,
                    singleton="raw") -> torch.Tensor:
    """``[N]`` float64; see :func:`prefix_grouper.advantages.grpo_advantages`."""
    return torch.tensor(_normalize(_floats(rewards), _ints(group_index), scale, eps, unbiased, singleton),
                        dtype=torch.float64)


def multi_objective_advantages(rewards, group_index, weights, *, mode="sum_then_normalize", scale="group",
                               eps=1e-6, unbiased=True, singleton="raw", batch_normalize=True) -> torch.Tensor:
    """``[N]`` float64; see :func:`prefix_grouper.advantages.multi_objective_advantages`."""
    rows = [_floats(row) for row in rewards]
    groups, weights = _ints(group_index), _floats(weights)
    all_missing = [all(math.isnan(v) for v in row) for row in rows]
    if mode == "sum_then_normalize":
        totals = [math.nan if missing else sum(w * v for w, v in zip(weights, row) if not math.isnan(v))
                  for row, missing in zip(rows, all_missing)]
        return torch.tensor(_normalize(totals, groups, scale, eps, unbiased, singleton), dtype=torch.float64)
    columns = [_normalize([row[k] for row in rows], groups, scale, eps, unbiased, singleton)
               for k in range(len(weights))]
    totals = [math.nan if all_missing[i] else sum(w * column[i] for w, column in zip(weights, columns))
              for i in range(len(rows))]
    if batch_normalize:
        totals = _normalize(totals, [0] * len(rows), "group", eps, unbiased, singleton)
    return torch.tensor([0.0 if math.isnan(t) else t for t in totals], dtype=torch.float64)


def gigpo_advantages(episode_returns, step_returns, group_index, anchor_index, *, omega=1.0,
                     mode="mean_norm", eps=1e-6, traj_index=None, episode_stats="rows") -> torch.Tensor:
    """``[N]`` float64; see :func:`prefix_grouper.advantages.gigpo_advantages`."""
    episodes, steps = _floats(episode_returns), _floats(step_returns)
    groups, anchors = _ints(group_index), _ints(anchor_index)
    scale = "none" if mode == "mean_norm" else "group"
    if episode_stats == "rows":
        episode_adv = _normalize(episodes, groups, scale, eps, True, "raw")
    else:
        trajectories = _ints(traj_index)
        first_row: dict[int, int] = {}
        for row, t in enumerate(trajectories):
            first_row.setdefault(t, row)
        order = list(first_row)
        per_trajectory = _normalize([episodes[first_row[t]] for t in order],
                                    [groups[first_row[t]] for t in order], scale, eps, True, "raw")
        by_trajectory = dict(zip(order, per_trajectory))
        episode_adv = [by_trajectory[t] for t in trajectories]
    step_adv = _normalize(steps, list(zip(groups, anchors)), scale, eps, True, "zero")
    return torch.tensor([e + omega * s for e, s in zip(episode_adv, step_adv)], dtype=torch.float64)


def discounted_returns(rewards, traj_index: Sequence[int], gamma: float) -> torch.Tensor:
    """``[N]`` float64; see :func:`prefix_grouper.advantages.discounted_returns`."""
    values, trajectories = _floats(rewards), _ints(traj_index)
    out = [0.0] * len(values)
    following: dict[int, float] = {}
    for row in reversed(range(len(values))):
        t = trajectories[row]
        out[row] = values[row] + gamma * following[t] if t in following else values[row]
        following[t] = out[row]
    return torch.tensor(out, dtype=torch.float64)
