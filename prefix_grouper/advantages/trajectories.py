"""Per-step inputs of GiGPO: discounted step returns and anchor-state ids."""
from __future__ import annotations

from typing import Any, Hashable, Iterable, Sequence

import numpy as np
import torch

from ..checks import as_index, check_float_tensor, check_real
from .dispatch import check_no_inf
from .grouping import Segments

__all__ = ["anchor_index_from_states", "discounted_returns"]


@torch.no_grad()
def discounted_returns(
    rewards: torch.Tensor, traj_index: torch.Tensor | Sequence[int], gamma: float
) -> torch.Tensor:
    """``R_t = sum_{k >= t} gamma^(k - t) r_k`` within every trajectory.

    Args:
        rewards: ``[N]`` floating point, the reward of every step row.
        traj_index: ``[N]`` integer trajectory of every row; the rows of one trajectory, in
            the order they appear, are its steps in time order (trajectories may interleave).
        gamma: discount in ``[0, 1]``.

    Returns a new ``[N]`` tensor (never ``rewards`` itself) in the dtype of ``rewards``,
    computed under ``torch.no_grad()`` (it never requires grad); a NaN reward makes the
    returns of its trajectory's earlier steps NaN too; +-inf rewards are refused (ValueError).

    The recurrence ``R_t = r_t + gamma * R_{t+1}`` runs as a doubling scan over the rows
    sorted by trajectory: ``log2(longest trajectory)`` vectorized steps, no padding.
    """
    check_float_tensor(rewards, "rewards", 1)
    trajectories = Segments(as_index(traj_index, "traj_index", rewards.shape[0], rewards.device, "rewards"))
    gamma = check_real(gamma, "gamma", 0.0, 1.0)
    check_no_inf(rewards, "rewards")
    compute = rewards if rewards.dtype in (torch.float32, torch.float64) else rewards.float()
    perm = trajectories.perm
    # A copy even when no scan step runs (every trajectory one step long): never alias rewards.
    returns = compute.clone() if perm is None else compute.index_select(0, perm)
    # After the scan step with span s: R_i = returns_i + link_i * R_{i+s}, where link_i is
    # gamma^s inside the trajectory and 0 once the span crosses the trajectory's last step.
    link = torch.full_like(returns, gamma)
    link.index_fill_(0, trajectories.offsets[1:] - 1, 0.0)
    longest = int(trajectories.counts.max())
    span = 1
    while span < longest:
        ahead = link[:-span]
        # where, not multiply: a NaN beyond the trajectory's end must not leak in through 0 * NaN.
        carried = torch.where(ahead != 0, ahead * returns[span:], 0.0)
        returns = torch.cat([returns[:-span] + carried, returns[-span:]])
        link = torch.cat([ahead * link[span:], link[-span:]])
        span *= 2
    if perm is not None:
        returns = torch.empty_like(returns).scatter_(0, perm, returns)
    return returns.to(rewards.dtype)


def _state_key(state: Any, row: int) -> Hashable:
    # Tensors and arrays hash by identity; match them by content instead.
    if isinstance(state, torch.Tensor):
        content = state.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return ("tensor", str(state.dtype), tuple(state.shape), content)
    if isinstance(state, np.ndarray):
        return ("array", str(state.dtype), tuple(state.shape), np.ascontiguousarray(state).tobytes())
    try:
        hash(state)
    except TypeError as exc:
        raise TypeError(f"states[{row}] is an unhashable {type(state).__name__}; pass str, tuple, "
                        f"int, bytes, tensor or array observations") from exc
    return state


def anchor_index_from_states(
    states: Iterable[Any], group_index: torch.Tensor | Sequence[int]
) -> torch.Tensor:
    """``[N]`` int64 anchor id of every row: rows of one group with identical states share it.

    Args:
        states: ``N`` environment observations (the raw current state, not the prompt), any
            iterable (list, generator, ...): hashable values (str, tuple, ...) compared with
            ``==``, or tensors / numpy arrays compared by dtype, shape and content.
        group_index: ``[N]`` integer task group of every row.

    Ids are distinct across groups (the same state in two groups gets two ids), numbered by
    first appearance, on the device of ``group_index`` (CPU for a sequence).
    """
    # A generator has no len() and can be read once: materialize it (lists too, it is cheap).
    try:
        states = list(states)
    except TypeError as exc:
        raise TypeError(f"states must be an iterable of observations, got {type(states).__name__}") from exc
    if len(states) == 0:
        raise ValueError("states is empty: there is nothing to group")
    device = group_index.device if isinstance(group_index, torch.Tensor) else torch.device("cpu")
    groups = as_index(group_index, "group_index", len(states), device, "states").tolist()
    ids: dict[tuple[int, Hashable], int] = {}
    anchors = [ids.setdefault((group, _state_key(state, row)), len(ids))
               for row, (state, group) in enumerate(zip(states, groups))]
    return torch.tensor(anchors, dtype=torch.long, device=device)
