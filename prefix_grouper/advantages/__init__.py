"""Group-relative advantages for GRPO-style RL: GRPO (verl / TRL / OpenRLHF conventions),
multi-objective CRPO, and GiGPO for agents, on torch, Triton and CUDA backends.

Shapes: ``N`` rows (completions, or environment steps for GiGPO), ``K`` objectives.
:mod:`prefix_grouper.advantages.reference` holds the float64 loop definitions the backends are
tested against. The estimators and :func:`discounted_returns` return new tensors that are
constants (computed under ``torch.no_grad()``, never requiring grad): a policy gradient does
not differentiate through advantages or returns.
"""
from .dispatch import available_backends
from .gigpo import gigpo_advantages
from .grpo import grpo_advantages
from .multi_objective import multi_objective_advantages
from ..layout import broadcast_to_padded, broadcast_to_tokens
from .trajectories import anchor_index_from_states, discounted_returns

__all__ = [
    "anchor_index_from_states",
    "available_backends",
    "broadcast_to_padded",
    "broadcast_to_tokens",
    "discounted_returns",
    "gigpo_advantages",
    "grpo_advantages",
    "multi_objective_advantages",
]
