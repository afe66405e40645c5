"""Reference GRPO, CRPO and GiGPO trainers on the grouped (shared-prefix) layout.

One loop (:class:`Trainer`) with three thin algorithms on top; ``python -m
prefix_grouper.train`` is the command line.
"""
from .build import ALGORITHMS, DEFAULT_TASKS, build_trainer
from .crpo import CRPO
from .distributed import Distributed, init_distributed
from .gigpo import GiGPO
from .grpo import CONVENTIONS, GRPO
from .loop import TrainConfig, Trainer
from .loss import LOSS_TYPES, policy_loss
from .metrics import append_metrics, plot_rewards, plot_runs, read_metrics, run_costs, summary_table, write_run_costs
from .model import TINY_MODEL, Policy, load_policy
from .rollout import Rollout, RolloutRows

__all__ = ["ALGORITHMS", "CONVENTIONS", "CRPO", "DEFAULT_TASKS", "Distributed", "GRPO", "GiGPO", "LOSS_TYPES",
           "Policy", "Rollout", "RolloutRows", "TINY_MODEL", "TrainConfig", "Trainer", "append_metrics", "build_trainer",
           "init_distributed", "load_policy", "plot_rewards", "plot_runs", "policy_loss", "read_metrics", "run_costs",
           "summary_table", "write_run_costs"]
