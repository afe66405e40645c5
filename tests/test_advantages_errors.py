"""Every argument error of prefix_grouper.advantages names the argument at fault."""
import math

import numpy as np
import pytest
import torch

from prefix_grouper import GroupLayout
from prefix_grouper.advantages import (
    anchor_index_from_states,
    broadcast_to_padded,
    broadcast_to_tokens,
    discounted_returns,
    gigpo_advantages,
    grpo_advantages,
    multi_objective_advantages,
)
from prefix_grouper.advantages.api import resolve_backend

R = torch.tensor([1.0, 2.0, 3.0, 4.0])
G = torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("call,error,match", [
    (lambda: grpo_advantages(R, G[:3]), ValueError, "group_index has 3 entries but rewards has 4"),
    (lambda: grpo_advantages(R, G.float()), TypeError, "group_index must hold integer ids"),
    (lambda: grpo_advantages(R, [0.5, 1, 2, 3]), TypeError, "group_index must hold integer ids"),
    (lambda: grpo_advantages(R, G.bool()), TypeError, "group_index must hold integer ids"),
    (lambda: grpo_advantages(R, ["a", "b", "c", "d"]), TypeError, "group_index must be a tensor or sequence"),
    (lambda: grpo_advantages(R, G[None]), ValueError, "group_index must be 1-D"),
    (lambda: grpo_advantages(torch.empty(0), torch.empty(0, dtype=torch.long)), ValueError, "rewards is empty"),
    (lambda: grpo_advantages(torch.tensor([1, 2, 3, 4]), G), TypeError, "rewards must be floating point"),
    (lambda: grpo_advantages([1.0, 2.0], [0, 0]), TypeError, "rewards must be a torch.Tensor"),
    (lambda: grpo_advantages(R[None], G), ValueError, "rewards must be 1-D"),
    (lambda: grpo_advantages(R, G.to("meta")), ValueError, "group_index is on meta but rewards is on cpu"),
    (lambda: grpo_advantages(R, G, scale="std"), ValueError, "scale must be one of"),
    (lambda: grpo_advantages(R, G, singleton="drop"), ValueError, "singleton must be one of"),
    (lambda: grpo_advantages(R, G, backend="jax"), ValueError, "backend must be one of"),
    (lambda: grpo_advantages(R, G, eps=-1.0), ValueError, "eps must be a real number"),
    (lambda: grpo_advantages(R, G, eps="1e-6"), TypeError, "eps must be a real number"),
    (lambda: grpo_advantages(R, G, eps=True), TypeError, "eps must be a real number, got bool"),
    (lambda: grpo_advantages(R, G, eps=None), TypeError, "eps must be a real number"),
    (lambda: grpo_advantages(R, G, eps=torch.tensor(True)), TypeError, "eps must be a real number"),
    (lambda: grpo_advantages(R, G, eps=torch.ones(2)), TypeError, "eps must be a real number or 0-d"),
    (lambda: grpo_advantages(R, G, eps=0.0), ValueError, "eps must be > 0"),
    (lambda: grpo_advantages(R, G, eps=np.float32(0), scale="batch"), ValueError, "eps must be > 0"),
    (lambda: grpo_advantages(R, G, unbiased=None), TypeError, "unbiased must be True or False"),
    (lambda: grpo_advantages(R, G, unbiased="false"), TypeError, "unbiased must be True or False"),
    (lambda: grpo_advantages(R, {0, 1}), TypeError, "group_index must be an ordered"),
    (lambda: grpo_advantages(R, {0: 0, 1: 0, 2: 1, 3: 1}), TypeError, "group_index must be an ordered"),
    (lambda: grpo_advantages(R, G, backend="cuda"), ValueError, "backend='cuda' needs CUDA tensors"),
])
def test_grpo_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


R2 = torch.rand(4, 3)


@pytest.mark.parametrize("call,error,match", [
    (lambda: multi_objective_advantages(R2, G, [1.0, 2.0]), ValueError, r"weights must have one entry .*\(3\)"),
    (lambda: multi_objective_advantages(R2, G, torch.ones(3, 1)), ValueError, "weights must have one entry"),
    (lambda: multi_objective_advantages(R2, G, torch.ones(3, device="meta")), ValueError, "weights is on meta"),
    (lambda: multi_objective_advantages(R2, G, [1, 1, 1], mode="max"), ValueError, "mode must be one of"),
    (lambda: multi_objective_advantages(R, G, [1.0]), ValueError, "rewards must be 2-D"),
    (lambda: multi_objective_advantages(R2[:, :0], G, []), ValueError, "rewards has 0 objective columns"),
    (lambda: multi_objective_advantages(R2, G[:2], [1, 1, 1]), ValueError, "group_index has 2 entries"),
    (lambda: multi_objective_advantages(R2.long(), G, [1, 1, 1]), TypeError, "rewards must be floating point"),
    (lambda: multi_objective_advantages(R2, G, [1, 1, 1], batch_normalize=False), ValueError,
     "batch_normalize=False applies to mode='normalize_then_sum' only"),
    (lambda: multi_objective_advantages(R2, G, [1, 1, 1], scale="z"), ValueError, "scale must be one of"),
    (lambda: multi_objective_advantages(R2, G, [1.0, math.nan, 1.0]), ValueError, "weights must be finite"),
    (lambda: multi_objective_advantages(R2, G, torch.tensor([1.0, 1.0, math.inf])), ValueError,
     "weights must be finite"),
    (lambda: multi_objective_advantages(R2, G, "ab"), TypeError, "weights must be a tensor or sequence"),
    (lambda: multi_objective_advantages(R2, G, None), TypeError, "weights must be a tensor or sequence"),
    (lambda: multi_objective_advantages(R2, G, [1, 1, 1], mode="normalize_then_sum", batch_normalize=None),
     TypeError, "batch_normalize must be True or False"),
    (lambda: multi_objective_advantages(R2, G, [1, 1, 1], batch_normalize="no"), TypeError,
     "batch_normalize must be True or False"),
    (lambda: multi_objective_advantages(R2, G, [1, 1, 1], unbiased=1), TypeError, "unbiased must be True or False"),
    (lambda: multi_objective_advantages(R2, G, [1, 1, 1], eps=0), ValueError, "eps must be > 0"),
    # scale "none" skips the per-group division, but the final whole-batch step divides
    (lambda: multi_objective_advantages(R2, G, [1, 1, 1], mode="normalize_then_sum", scale="none", eps=0),
     ValueError, "eps must be > 0"),
])
def test_multi_objective_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


A = torch.tensor([0, 1, 0, 1])
T = torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("call,error,match", [
    (lambda: gigpo_advantages(R, R, G, A, episode_stats="trajectories"), ValueError,
     "episode_stats='trajectories' needs traj_index"),
    (lambda: gigpo_advantages(R, R[:3], G, A), ValueError, "step_returns has 3 rows but episode_returns has 4"),
    (lambda: gigpo_advantages(R, R.to("meta"), G, A), ValueError, "step_returns is on meta"),
    (lambda: gigpo_advantages(R, R, G, A[:2]), ValueError, "anchor_index has 2 entries"),
    (lambda: gigpo_advantages(R, R, G, A.double()), TypeError, "anchor_index must hold integer ids"),
    (lambda: gigpo_advantages(R, R, G, A, traj_index=T[:3], episode_stats="trajectories"), ValueError,
     "traj_index has 3 entries"),
    (lambda: gigpo_advantages(R.long(), R, G, A), TypeError, "episode_returns must be floating point"),
    (lambda: gigpo_advantages(R, R, G, A, mode="std"), ValueError, "mode must be one of"),
    (lambda: gigpo_advantages(R, R, G, A, episode_stats="steps"), ValueError, "episode_stats must be one of"),
    (lambda: gigpo_advantages(R, R, G, A, omega=math.nan), ValueError, "omega must be a real number"),
    (lambda: gigpo_advantages(R, R, G, A, omega=False), TypeError, "omega must be a real number, got bool"),
    (lambda: gigpo_advantages(R, R, G, A, omega="1"), TypeError, "omega must be a real number"),
    (lambda: gigpo_advantages(R, R, G, A, mode="mean_std_norm", eps=0.0), ValueError, "eps must be > 0"),
    (lambda: gigpo_advantages(R, R, G, A, traj_index=T), ValueError,
     "traj_index is only used with episode_stats='trajectories'"),
    (lambda: gigpo_advantages(R, R, G, {0, 1}), TypeError, "anchor_index must be an ordered"),
    # episode_returns differ inside trajectory 0; trajectory 1 spans two groups
    (lambda: gigpo_advantages(R, R, G, A, traj_index=T, episode_stats="trajectories"), ValueError,
     "episode_returns must be the same on every row of a trajectory"),
    (lambda: gigpo_advantages(torch.ones(4), R, G, A, traj_index=torch.tensor([0, 1, 1, 2]),
                              episode_stats="trajectories"), ValueError,
     "group_index must be the same on every row of a trajectory"),
])
def test_gigpo_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("call,error,match", [
    (lambda: discounted_returns(R, T[:3], 0.9), ValueError, "traj_index has 3 entries but rewards has 4"),
    (lambda: discounted_returns(R, T, 1.5), ValueError, "gamma must be a real number in"),
    (lambda: discounted_returns(R.long(), T, 0.9), TypeError, "rewards must be floating point"),
    (lambda: discounted_returns(R, T.float(), 0.9), TypeError, "traj_index must hold integer ids"),
    (lambda: discounted_returns(R, T, True), TypeError, "gamma must be a real number, got bool"),
    (lambda: discounted_returns(R, T, torch.tensor([0.9])), TypeError, "gamma must be a real number or 0-d"),
    (lambda: discounted_returns(R, T, np.float32(1.5)), ValueError, "gamma must be a real number in"),
    (lambda: discounted_returns(R, {0: 0, 1: 0}, 0.9), TypeError, "traj_index must be an ordered"),
    (lambda: anchor_index_from_states(["a", "b"], {0, 1}), TypeError, "group_index must be an ordered"),
    (lambda: anchor_index_from_states(5, [0]), TypeError, "states must be an iterable"),
    (lambda: anchor_index_from_states(None, [0]), TypeError, "states must be an iterable"),
    (lambda: anchor_index_from_states(["a", "b"], [0]), ValueError, "group_index has 1 entries but states has 2"),
    (lambda: anchor_index_from_states(["a", ["b"]], [0, 0]), TypeError, r"states\[1\] is an unhashable list"),
    (lambda: anchor_index_from_states([], []), ValueError, "states is empty"),
])
def test_trajectory_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_broadcast_errors():
    layout = GroupLayout.from_lengths([2], [[1, 2]])
    with pytest.raises(TypeError, match="layout must be a GroupLayout, got NoneType"):
        broadcast_to_tokens(torch.ones(2), None)
    with pytest.raises(TypeError, match="layout must be a GroupLayout, got Tensor"):
        broadcast_to_tokens(torch.ones(2), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="values has 3 entries but there are 2 completions"):
        broadcast_to_tokens(torch.ones(3), layout)
    with pytest.raises(ValueError, match="values is on meta"):
        broadcast_to_tokens(torch.ones(2, device="meta"), layout)
    with pytest.raises(TypeError, match="target must be a GroupLayout or a bool/int completion_mask"):
        broadcast_to_padded(torch.ones(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="values has 2 entries but there are 3 completions"):
        broadcast_to_padded(torch.ones(2), torch.ones(3, 4, dtype=torch.bool))


def test_unavailable_backends(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable"):
        grpo_advantages(R, G, backend="triton")


def test_real_scalars_of_any_kind_are_accepted():
    """eps, gamma and omega take numpy scalars and 0-d tensors like the Python float."""
    expected = grpo_advantages(R, G, eps=1e-3)
    for eps in (np.float32(1e-3), np.float64(1e-3), torch.tensor(1e-3), torch.tensor(1e-3, dtype=torch.float64)):
        torch.testing.assert_close(grpo_advantages(R, G, eps=eps), expected)
    expected = discounted_returns(R, T, 0.5)
    for gamma in (np.float32(0.5), torch.tensor(0.5), np.int64(0) + 0.5):
        torch.testing.assert_close(discounted_returns(R, T, gamma), expected)
    expected = gigpo_advantages(R, R, G, A, omega=2.0)
    for omega in (np.float32(2), np.int64(2), torch.tensor(2), 2):
        torch.testing.assert_close(gigpo_advantages(R, R, G, A, omega=omega), expected)


def test_eps_zero_is_fine_without_a_std_division():
    torch.testing.assert_close(grpo_advantages(R, G, eps=0, scale="none"), torch.tensor([-0.5, 0.5, -0.5, 0.5]))
    gigpo_advantages(R, R, G, A, eps=0.0)  # mode "mean_norm" only subtracts means
    multi_objective_advantages(R2, G, [1, 1, 1], mode="normalize_then_sum", scale="none", eps=0,
                               batch_normalize=False)


def test_states_may_be_any_iterable():
    states, groups = ["a", "b", "a", "a"], [0, 0, 0, 1]
    expected = anchor_index_from_states(states, groups)
    assert expected.tolist() == [0, 1, 0, 2]
    assert torch.equal(anchor_index_from_states((s for s in states), groups), expected)
    assert torch.equal(anchor_index_from_states(tuple(states), groups), expected)
