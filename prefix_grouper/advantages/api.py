"""Group-relative advantages (GRPO, CRPO, GiGPO) on one dispatch over three backends.

Every public function reduces to one primitive, "normalize values within groups": the
ids are compacted once with torch (:class:`~prefix_grouper.advantages.segments.Segments`),
then the chosen backend computes each group's count, mean and sum of squared deviations
and writes ``(x - mean) / (std + eps)`` in one fused pass.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .._extension import cuda_extension_available, require_cuda_extension
from ..checks import as_index, check_bool, check_choice, check_float_tensor, check_real
from .cuda_impl import group_normalize_cuda
from .options import BACKENDS, EPISODE_STATS, GIGPO_MODES, MULTI_OBJECTIVE_MODES, SCALES, SINGLETONS
from .segments import Segments
from .torch_impl import batch_std, group_normalize_torch
from .triton_impl import group_normalize_triton, triton_unavailable_reason

__all__ = [
    "available_backends",
    "gigpo_advantages",
    "grpo_advantages",
    "multi_objective_advantages",
]

_IMPLEMENTATIONS = {
    "torch": group_normalize_torch,
    "triton": group_normalize_triton,
    "cuda": group_normalize_cuda,
}


# ---------------------------------------------------------------------- dispatch
def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The explicit backends that can run on tensors on ``device`` (torch always can)."""
    device = torch.device(device)
    names = ["torch"]
    if triton_unavailable_reason(device) is None:
        names.append("triton")
    if device.type == "cuda" and torch.cuda.is_available() and cuda_extension_available():
        names.append("cuda")
    return names


def resolve_backend(backend: str, device: torch.device) -> str:
    """``backend`` made concrete for tensors on ``device``; raises if it cannot run there.

    "auto" picks the CUDA extension on CUDA tensors when it is built, else Triton on CUDA
    tensors, else torch (always on CPU tensors, even under the Triton interpreter).
    """
    check_choice(backend, "backend", BACKENDS)
    if backend == "auto":
        if device.type == "cuda" and torch.cuda.is_available() and cuda_extension_available():
            return "cuda"
        if device.type == "cuda" and triton_unavailable_reason(device) is None:
            return "triton"
        return "torch"
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        require_cuda_extension("backend='cuda' of prefix_grouper.advantages")
    if backend == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend='triton' is unavailable: {reason}")
    return backend


def normalize_in_groups(
    values: torch.Tensor,
    segments: Segments,
    *,
    scale: str,
    eps: float,
    unbiased: bool,
    singleton: str,
    backend: str,
) -> torch.Tensor:
    """``[N]`` advantages of ``values [N]`` within ``segments`` on a resolved ``backend``.

    Every backend computes in float64 and the result is cast back to the dtype of ``values``.
    """
    # float32 statistics are not enough: the float32 mean of identical rewards can be an ulp
    # off, and that ulp divided by a ~1e-8 std (eps 1e-9) becomes an advantage near +-1. The
    # float64 mean of identical float32/half values is exact, so they get exactly 0.
    compute = values.to(torch.float64).contiguous()
    out = _IMPLEMENTATIONS[backend](
        compute,
        segments,
        scale=scale,
        eps=eps,
        unbiased=unbiased,
        singleton_raw=singleton == "raw",
        batch_scale=batch_std(compute, unbiased) if scale == "batch" else None,
    )
    return out.to(values.dtype)


def _check_eps(eps: Any, divides: bool) -> float:
    """``eps`` as a float; it must be > 0 when ``divides`` (advantages are divided by a std)."""
    eps = check_real(eps, "eps", 0.0)
    if divides and eps == 0.0:
        # A group of identical values has std 0, and eps = 0 would make its advantages 0 / 0.
        raise ValueError("eps must be > 0 when advantages are divided by a std (scale 'group' or 'batch', "
                         "mode 'normalize_then_sum' with batch_normalize, or mode 'mean_std_norm'), got 0")
    return eps


def _check_normalization(scale: str, eps: Any, singleton: str, unbiased: Any, divides: bool = False) -> float:
    """The checked ``eps``; ``divides``: some later step divides by a std even if ``scale`` does not."""
    check_choice(scale, "scale", SCALES)
    check_choice(singleton, "singleton", SINGLETONS)
    check_bool(unbiased, "unbiased")
    return _check_eps(eps, divides=divides or scale != "none")


# ---------------------------------------------------------------------- GRPO
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
            completion: it is left out of every statistic and gets advantage 0.
        group_index: ``[N]`` integer group (prompt) id of every completion: any int64
            values, in any order, not necessarily consecutive.
        scale: ``"group"``: divide by the group's std; ``"batch"``: subtract the group mean,
            divide by the std of all non-NaN rewards of the batch; ``"none"``: ``r - mean``
            (no division, eps unused).
        eps: added to the std; a real number, > 0 unless scale is "none" (identical rewards
            have std 0).
        unbiased: std divides by ``n - 1`` (else ``n``), ``n`` counting non-NaN rewards.
        singleton: what a group with exactly one non-NaN reward gets (also when NaNs left
            only one): ``"raw"`` measures it against mean 0, and std 1 in place of the
            group std, so the reward is kept: ``r / (1 + eps)`` with scale "group",
            ``r / (batch_std + eps)`` with "batch", ``r`` with "none"; ``"zero"`` gives it
            advantage 0. A group whose rewards are all NaN gets 0 everywhere.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (see :func:`resolve_backend`).

    With "batch", the batch std is 1 when fewer than two rewards are non-NaN.

    Returns ``[N]`` advantages in the dtype and on the device of ``rewards``.

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
    eps = _check_normalization(scale, eps, singleton, unbiased)
    backend = resolve_backend(backend, rewards.device)
    return normalize_in_groups(rewards, Segments(ids), scale=scale, eps=eps, unbiased=unbiased,
                               singleton=singleton, backend=backend)


# ---------------------------------------------------------------------- CRPO
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
            row with every objective NaN is left out and gets advantage 0.
        group_index: ``[N]`` integer group ids, as in :func:`grpo_advantages`.
        weights: ``[K]`` weight of every objective.
        mode: ``"sum_then_normalize"``: weighted sum, then :func:`grpo_advantages` of it;
            ``"normalize_then_sum"``: each objective normalized within its group (scale,
            eps, unbiased and singleton as in :func:`grpo_advantages`), weighted sum, then
            (``batch_normalize``) ``(x - mean) / (std + eps)`` over the whole batch.
        batch_normalize: only for "normalize_then_sum"; False stops after the weighted sum.
        scale, eps, unbiased, singleton, backend: as in :func:`grpo_advantages` (the final
            whole-batch step of "normalize_then_sum" always runs on torch).

    Returns ``[N]`` advantages in the dtype of ``rewards``.
    """
    check_float_tensor(rewards, "rewards", 2)
    num_rows, num_objectives = rewards.shape
    if num_objectives == 0:
        raise ValueError("rewards has 0 objective columns; expected shape [N, K] with K >= 1")
    ids = as_index(group_index, "group_index", rewards.shape[0], rewards.device, "rewards")
    if isinstance(weights, torch.Tensor) and weights.device != rewards.device:
        raise ValueError(f"weights is on {weights.device} but rewards is on {rewards.device}")
    try:
        weights = torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"weights must be a tensor or sequence of real numbers, got "
                        f"{type(weights).__name__} ({exc})") from exc
    if weights.dim() != 1 or weights.shape[0] != num_objectives:
        raise ValueError(f"weights must have one entry per objective column of rewards ({num_objectives}), "
                         f"got shape {tuple(weights.shape)}")
    if not bool(torch.isfinite(weights).all()):
        # A NaN or inf weight would spread NaN over every advantage of the batch.
        raise ValueError(f"weights must be finite (in the dtype of rewards, {rewards.dtype}), "
                         f"got {weights.tolist()}")
    check_choice(mode, "mode", MULTI_OBJECTIVE_MODES)
    check_bool(batch_normalize, "batch_normalize")
    # The final whole-batch step of "normalize_then_sum" divides by the std whatever the scale.
    eps = _check_normalization(scale, eps, singleton, unbiased,
                               divides=mode == "normalize_then_sum" and batch_normalize)
    if mode == "sum_then_normalize" and not batch_normalize:
        raise ValueError("batch_normalize=False applies to mode='normalize_then_sum' only")
    backend = resolve_backend(backend, rewards.device)
    options = dict(eps=eps, unbiased=unbiased, singleton=singleton, backend=backend)

    missing = torch.isnan(rewards)
    row_missing = missing.all(1)
    groups = Segments(ids)
    if mode == "sum_then_normalize":
        total = torch.where(missing, 0.0, rewards) @ weights
        total = torch.where(row_missing, math.nan, total)
        return normalize_in_groups(total, groups, scale=scale, **options)

    # All objectives in one call: objective k of group g is segment k * G + g (sorted when
    # the group ids are, so the kernels skip the permutation).
    objective = torch.arange(num_objectives, device=rewards.device)
    segment_of = (objective[:, None] * groups.num_groups + groups.ids[None, :]).reshape(-1)
    per_objective = normalize_in_groups(rewards.t().reshape(-1), Segments(segment_of), scale=scale, **options)
    total = per_objective.view(num_objectives, num_rows).t() @ weights
    if not batch_normalize:
        return torch.where(row_missing, 0.0, total)
    total = torch.where(row_missing, math.nan, total)
    whole_batch = Segments(torch.zeros(num_rows, dtype=torch.long, device=rewards.device))
    # One group leaves a segmented kernel a single program or warp; torch's full reductions
    # parallelize over the rows instead.
    return normalize_in_groups(total, whole_batch, scale="group", **{**options, "backend": "torch"})


# ---------------------------------------------------------------------- GiGPO
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
        omega: weight of the step-level advantage.
        mode: ``"mean_norm"``: ``x - mean`` at both levels; ``"mean_std_norm"``:
            ``(x - mean) / (std + eps)`` (unbiased std).
        eps: added to the std in "mean_std_norm" (there > 0).
        traj_index: ``[N]`` integer trajectory of every row; required by
            ``episode_stats="trajectories"`` and refused (ValueError) with ``"rows"``.
        episode_stats: episode statistics over ``"rows"`` (every step row of the group
            counts, so long trajectories weigh more; the verl-agent default) or
            ``"trajectories"`` (one entry per trajectory).
        backend: as in :func:`~prefix_grouper.advantages.grpo_advantages`.

    A group with a single episode entry uses mean 0 and std 1 (``A_E`` keeps the return);
    an anchor group with a single step contributes ``A_S = 0``. NaN returns are left out of
    the statistics and contribute 0, as in :func:`~prefix_grouper.advantages.grpo_advantages`.

    Returns ``[N]`` advantages.
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
    eps = _check_eps(eps, divides=mode == "mean_std_norm")
    omega = check_real(omega, "omega")
    if episode_stats == "trajectories" and traj_index is None:
        raise ValueError("episode_stats='trajectories' needs traj_index, the trajectory of every row")
    if episode_stats == "rows" and traj_index is not None:
        # Refused rather than ignored: passing it suggests per-trajectory statistics were meant.
        raise ValueError("traj_index is only used with episode_stats='trajectories'; with "
                         "episode_stats='rows' leave it None")
    backend = resolve_backend(backend, episode_returns.device)
    options = dict(scale="none" if mode == "mean_norm" else "group", eps=eps, unbiased=True, backend=backend)

    groups = Segments(group)
    if episode_stats == "rows":
        episode_adv = normalize_in_groups(episode_returns, groups, singleton="raw", **options)
    else:
        trajectories = Segments(as_index(traj_index, "traj_index", *like_episodes))
        first = trajectories.first_rows()
        _check_constant_per_trajectory(episode_returns, trajectories, first, "episode_returns")
        _check_constant_per_trajectory(groups.ids, trajectories, first, "group_index")
        per_trajectory = normalize_in_groups(episode_returns.index_select(0, first),
                                             Segments(groups.ids.index_select(0, first)),
                                             singleton="raw", **options)
        episode_adv = per_trajectory.index_select(0, trajectories.ids)

    distinct_anchors, anchor_ids = torch.unique(anchor, return_inverse=True)
    step_group = groups.ids * distinct_anchors.numel() + anchor_ids
    step_adv = normalize_in_groups(step_returns, Segments(step_group), singleton="zero", **options)
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
