"""Group-relative advantages for GRPO-style RL: GRPO (verl / TRL / OpenRLHF conventions),
multi-objective CRPO, and GiGPO for agents, on torch, Triton and CUDA backends.

Shapes: ``N`` rows (completions, or environment steps for GiGPO), ``K`` objectives.
:mod:`prefix_grouper.advantages.naive` holds the float64 loop definitions the backends are
tested against.
"""
from .api import available_backends, gigpo_advantages, grpo_advantages, multi_objective_advantages
from .broadcast import broadcast_to_padded, broadcast_to_tokens
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
