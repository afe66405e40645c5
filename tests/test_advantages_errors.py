"""Every argument error of prefix_grouper.advantages names the argument at fault."""
import math

import numpy as np
import pytest
import torch

from prefix_grouper import GroupLayout
from prefix_grouper import advantages
from prefix_grouper.advantages.dispatch import resolve_backend

R = torch.tensor([1.0, 2.0, 3.0, 4.0])
G = torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("call,error,match", [
    (lambda: advantages.grpo_advantages(R, G[:3]), ValueError, "group_index has 3 entries but rewards has 4"),
    (lambda: advantages.grpo_advantages(R, G.float()), TypeError, "group_index must hold integer ids"),
    (lambda: advantages.grpo_advantages(R, [0.5, 1, 2, 3]), TypeError, "group_index must hold integer ids"),
    (lambda: advantages.grpo_advantages(R, G.bool()), TypeError, "group_index must hold integer ids"),
    (lambda: advantages.grpo_advantages(R, ["a", "b", "c", "d"]),
     TypeError, "group_index must be a tensor or sequence"),
    (lambda: advantages.grpo_advantages(R, G[None]), ValueError, "group_index must be 1-D"),
    (lambda: advantages.grpo_advantages(torch.empty(0), torch.empty(0, dtype=torch.long)),
     ValueError, "rewards is empty"),
    (lambda: advantages.grpo_advantages(torch.tensor([1, 2, 3, 4]), G), TypeError, "rewards must be floating point"),
    (lambda: advantages.grpo_advantages([1.0, 2.0], [0, 0]), TypeError, "rewards must be a torch.Tensor"),
    (lambda: advantages.grpo_advantages(R[None], G), ValueError, "rewards must be 1-D"),
    (lambda: advantages.grpo_advantages(R, G.to("meta")), ValueError, "group_index is on meta but rewards is on cpu"),
    (lambda: advantages.grpo_advantages(R, G, scale="std"), ValueError, "scale must be one of"),
    (lambda: advantages.grpo_advantages(R, G, singleton="drop"), ValueError, "singleton must be one of"),
    (lambda: advantages.grpo_advantages(R, G, backend="jax"), ValueError, "backend must be one of"),
    (lambda: advantages.grpo_advantages(R, G, eps=-1.0), ValueError, "eps must be a real number"),
    (lambda: advantages.grpo_advantages(R, G, eps="1e-6"), TypeError, "eps must be a real number"),
    (lambda: advantages.grpo_advantages(R, G, eps=True), TypeError, "eps must be a real number, got bool"),
    (lambda: advantages.grpo_advantages(R, G, eps=None), TypeError, "eps must be a real number"),
    (lambda: advantages.grpo_advantages(R, G, eps=torch.tensor(True)), TypeError, "eps must be a real number"),
    (lambda: advantages.grpo_advantages(R, G, eps=torch.ones(2)), TypeError, "eps must be a real number or 0-d"),
    (lambda: advantages.grpo_advantages(R, G, eps=0.0), ValueError, "eps must be > 0"),
    (lambda: advantages.grpo_advantages(R, G, eps=np.float32(0), scale="batch"), ValueError, "eps must be > 0"),
    (lambda: advantages.grpo_advantages(R, G, unbiased=None), TypeError, "unbiased must be True or False"),
    (lambda: advantages.grpo_advantages(R, G, unbiased="false"), TypeError, "unbiased must be True or False"),
    (lambda: advantages.grpo_advantages(R, {0, 1}), TypeError, "group_index must be an ordered"),
    (lambda: advantages.grpo_advantages(R, {0: 0, 1: 0, 2: 1, 3: 1}), TypeError, "group_index must be an ordered"),
    (lambda: advantages.grpo_advantages(R, G, backend="cuda"), ValueError,
     "backend='cuda' is not available on cpu: needs CUDA tensors"),
    (lambda: advantages.grpo_advantages(R, G, eps=math.inf), ValueError, "eps must be a finite number"),
    (lambda: advantages.grpo_advantages(R, G, eps=math.nan), ValueError, "eps must be a real number"),
    (lambda: advantages.grpo_advantages(torch.tensor([1.0, math.inf, 3.0, 4.0]), G), ValueError,
     r"rewards holds \+-inf \(first at index 1\)"),
    (lambda: advantages.grpo_advantages(torch.tensor([1.0, 2.0, 3.0, -math.inf]), G, scale="batch"), ValueError,
     "rewards holds"),
])
def test_grpo_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


R2 = torch.rand(4, 3)


@pytest.mark.parametrize("call,error,match", [
    (lambda: advantages.multi_objective_advantages(R2, G, [1.0, 2.0]),
     ValueError, r"weights must have one entry .*\(3\)"),
    (lambda: advantages.multi_objective_advantages(R2, G, torch.ones(3, 1)), ValueError, "weights must have one entry"),
    (lambda: advantages.multi_objective_advantages(R2, G, torch.ones(3, device="meta")),
     ValueError, "weights is on meta"),
    (lambda: advantages.multi_objective_advantages(R2, G, [1, 1, 1], mode="max"), ValueError, "mode must be one of"),
    (lambda: advantages.multi_objective_advantages(R, G, [1.0]), ValueError, "rewards must be 2-D"),
    (lambda: advantages.multi_objective_advantages(R2[:, :0], G, []), ValueError, "rewards has 0 objective columns"),
    (lambda: advantages.multi_objective_advantages(R2, G[:2], [1, 1, 1]), ValueError, "group_index has 2 entries"),
    (lambda: advantages.multi_objective_advantages(R2.long(), G, [1, 1, 1]),
     TypeError, "rewards must be floating point"),
    (lambda: advantages.multi_objective_advantages(R2, G, [1, 1, 1], batch_normalize=False), ValueError,
     "batch_normalize=False applies to mode='normalize_then_sum' only"),
    (lambda: advantages.multi_objective_advantages(R2, G, [1, 1, 1], scale="z"), ValueError, "scale must be one of"),
    (lambda: advantages.multi_objective_advantages(R2, G, [1.0, math.nan, 1.0]), ValueError, "weights must be finite"),
    (lambda: advantages.multi_objective_advantages(R2, G, torch.tensor([1.0, 1.0, math.inf])), ValueError,
     "weights must be finite"),
    (lambda: advantages.multi_objective_advantages(R2, G, "ab"), TypeError, "weights must be a tensor or sequence"),
    (lambda: advantages.multi_objective_advantages(R2, G, None), TypeError, "weights must be a tensor or sequence"),
    (lambda: advantages.multi_objective_advantages(R2, G, [1, 1, 1], mode="normalize_then_sum", batch_normalize=None),
     TypeError, "batch_normalize must be True or False"),
    (lambda: advantages.multi_objective_advantages(R2, G, [1, 1, 1], batch_normalize="no"), TypeError,
     "batch_normalize must be True or False"),
    (lambda: advantages.multi_objective_advantages(R2, G, [1, 1, 1], unbiased=1),
     TypeError, "unbiased must be True or False"),
    (lambda: advantages.multi_objective_advantages(R2, G, [1, 1, 1], eps=0), ValueError, "eps must be > 0"),
    # scale "none" skips the per-group division, but the final whole-batch step divides
    (lambda: advantages.multi_objective_advantages(R2, G, [1, 1, 1], mode="normalize_then_sum", scale="none", eps=0),
     ValueError, "eps must be > 0"),
    (lambda: advantages.multi_objective_advantages(R2.clone().fill_(math.inf), G, [1, 1, 1]), ValueError,
     "rewards holds"),
])
def test_multi_objective_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


A = torch.tensor([0, 1, 0, 1])
T = torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("call,error,match", [
    (lambda: advantages.gigpo_advantages(R, R, G, A, episode_stats="trajectories"), ValueError,
     "episode_stats='trajectories' needs traj_index"),
    (lambda: advantages.gigpo_advantages(R, R[:3], G, A),
     ValueError, "step_returns has 3 rows but episode_returns has 4"),
    (lambda: advantages.gigpo_advantages(R, R.to("meta"), G, A), ValueError, "step_returns is on meta"),
    (lambda: advantages.gigpo_advantages(R, R, G, A[:2]), ValueError, "anchor_index has 2 entries"),
    (lambda: advantages.gigpo_advantages(R, R, G, A.double()), TypeError, "anchor_index must hold integer ids"),
    (lambda: advantages.gigpo_advantages(R, R, G, A, traj_index=T[:3], episode_stats="trajectories"), ValueError,
     "traj_index has 3 entries"),
    (lambda: advantages.gigpo_advantages(R.long(), R, G, A), TypeError, "episode_returns must be floating point"),
    (lambda: advantages.gigpo_advantages(R, R, G, A, mode="std"), ValueError, "mode must be one of"),
    (lambda: advantages.gigpo_advantages(R, R, G, A, episode_stats="steps"),
     ValueError, "episode_stats must be one of"),
    (lambda: advantages.gigpo_advantages(R, R, G, A, omega=math.nan), ValueError, "omega must be a real number"),
    (lambda: advantages.gigpo_advantages(R, R, G, A, omega=math.inf), ValueError, "omega must be a finite number"),
    (lambda: advantages.gigpo_advantages(R, R, G, A, mode="mean_std_norm", eps=math.inf), ValueError,
     "eps must be a finite number"),
    (lambda: advantages.gigpo_advantages(R.clone().fill_(math.inf), R, G, A), ValueError,
     "episode_returns holds"),
    (lambda: advantages.gigpo_advantages(R, torch.tensor([0.0, -math.inf, 1.0, 2.0]), G, A), ValueError,
     "step_returns holds"),
    (lambda: advantages.gigpo_advantages(R, R, G, A, omega=False), TypeError, "omega must be a real number, got bool"),
    (lambda: advantages.gigpo_advantages(R, R, G, A, omega="1"), TypeError, "omega must be a real number"),
    (lambda: advantages.gigpo_advantages(R, R, G, A, mode="mean_std_norm", eps=0.0), ValueError, "eps must be > 0"),
    (lambda: advantages.gigpo_advantages(R, R, G, A, traj_index=T), ValueError,
     "traj_index is only used with episode_stats='trajectories'"),
    (lambda: advantages.gigpo_advantages(R, R, G, {0, 1}), TypeError, "anchor_index must be an ordered"),
    # episode_returns differ inside trajectory 0; trajectory 1 spans two groups
    (lambda: advantages.gigpo_advantages(R, R, G, A, traj_index=T, episode_stats="trajectories"), ValueError,
     "episode_returns must be the same on every row of a trajectory"),
    (lambda: advantages.gigpo_advantages(torch.ones(4), R, G, A, traj_index=torch.tensor([0, 1, 1, 2]),
                              episode_stats="trajectories"), ValueError,
     "group_index must be the same on every row of a trajectory"),
])
def test_gigpo_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("call,error,match", [
    (lambda: advantages.discounted_returns(R, T[:3], 0.9), ValueError, "traj_index has 3 entries but rewards has 4"),
    (lambda: advantages.discounted_returns(R, T, 1.5), ValueError, "gamma must be a real number in"),
    (lambda: advantages.discounted_returns(torch.tensor([1.0, math.inf, 0.0, 0.0]), T, 0.9), ValueError,
     "rewards holds"),
    (lambda: advantages.discounted_returns(R.long(), T, 0.9), TypeError, "rewards must be floating point"),
    (lambda: advantages.discounted_returns(R, T.float(), 0.9), TypeError, "traj_index must hold integer ids"),
    (lambda: advantages.discounted_returns(R, T, True), TypeError, "gamma must be a real number, got bool"),
    (lambda: advantages.discounted_returns(R, T, torch.tensor([0.9])), TypeError, "gamma must be a real number or 0-d"),
    (lambda: advantages.discounted_returns(R, T, np.float32(1.5)), ValueError, "gamma must be a real number in"),
    (lambda: advantages.discounted_returns(R, {0: 0, 1: 0}, 0.9), TypeError, "traj_index must be an ordered"),
    (lambda: advantages.anchor_index_from_states(["a", "b"], {0, 1}), TypeError, "group_index must be an ordered"),
    (lambda: advantages.anchor_index_from_states(5, [0]), TypeError, "states must be an iterable"),
    (lambda: advantages.anchor_index_from_states(None, [0]), TypeError, "states must be an iterable"),
    (lambda: advantages.anchor_index_from_states(["a", "b"], [0]),
     ValueError, "group_index has 1 entries but states has 2"),
    (lambda: advantages.anchor_index_from_states(["a", ["b"]], [0, 0]),
     TypeError, r"states\[1\] is an unhashable list"),
    (lambda: advantages.anchor_index_from_states([], []), ValueError, "states is empty"),
])
def test_trajectory_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_broadcast_errors():
    layout = GroupLayout.from_lengths([2], [[1, 2]])
    with pytest.raises(TypeError, match="layout must be a GroupLayout, got NoneType"):
        advantages.broadcast_to_tokens(torch.ones(2), None)
    with pytest.raises(TypeError, match="layout must be a GroupLayout, got Tensor"):
        advantages.broadcast_to_tokens(torch.ones(2), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="values has 3 entries but there are 2 completions"):
        advantages.broadcast_to_tokens(torch.ones(3), layout)
    with pytest.raises(ValueError, match="values is on meta"):
        advantages.broadcast_to_tokens(torch.ones(2, device="meta"), layout)
    with pytest.raises(TypeError, match="target must be a GroupLayout or a bool/int completion_mask"):
        advantages.broadcast_to_padded(torch.ones(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="values has 2 entries but there are 3 completions"):
        advantages.broadcast_to_padded(torch.ones(2), torch.ones(3, 4, dtype=torch.bool))


def test_unavailable_backends(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' is not available on"):
        advantages.grpo_advantages(R, G, backend="triton")


def test_real_scalars_of_any_kind_are_accepted():
    """eps, gamma and omega take numpy scalars and 0-d tensors like the Python float."""
    expected = advantages.grpo_advantages(R, G, eps=1e-3)
    for eps in (np.float32(1e-3), np.float64(1e-3), torch.tensor(1e-3), torch.tensor(1e-3, dtype=torch.float64)):
        torch.testing.assert_close(advantages.grpo_advantages(R, G, eps=eps), expected)
    expected = advantages.discounted_returns(R, T, 0.5)
    for gamma in (np.float32(0.5), torch.tensor(0.5), np.int64(0) + 0.5):
        torch.testing.assert_close(advantages.discounted_returns(R, T, gamma), expected)
    expected = advantages.gigpo_advantages(R, R, G, A, omega=2.0)
    for omega in (np.float32(2), np.int64(2), torch.tensor(2), 2):
        torch.testing.assert_close(advantages.gigpo_advantages(R, R, G, A, omega=omega), expected)


def test_eps_zero_is_fine_without_a_std_division():
    torch.testing.assert_close(advantages.grpo_advantages(R, G, eps=0, scale="none"),
                               torch.tensor([-0.5, 0.5, -0.5, 0.5]))
    advantages.gigpo_advantages(R, R, G, A, eps=0.0)  # mode "mean_norm" only subtracts means
    advantages.multi_objective_advantages(R2, G, [1, 1, 1], mode="normalize_then_sum", scale="none", eps=0,
                               batch_normalize=False)


def test_states_may_be_any_iterable():
    states, groups = ["a", "b", "a", "a"], [0, 0, 0, 1]
    expected = advantages.anchor_index_from_states(states, groups)
    assert expected.tolist() == [0, 1, 0, 2]
    assert torch.equal(advantages.anchor_index_from_states((s for s in states), groups), expected)
    assert torch.equal(advantages.anchor_index_from_states(tuple(states), groups), expected)
