"""One trainer from names: algorithm, task, model."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..checks import check_choice
from .crpo import CRPO
from .distributed import Distributed
from .gigpo import GiGPO
from .grpo import GRPO
from .loop import TrainConfig, Trainer
from .model import DTYPES, TINY_MODEL, load_policy
from .tasks import Environment, make_task

__all__ = ["ALGORITHMS", "DEFAULT_TASKS", "build_trainer"]

ALGORITHMS = ("grpo", "crpo", "gigpo")
DEFAULT_TASKS = {"grpo": "digits", "crpo": "diagnosis", "gigpo": "keydoor"}


def build_trainer(algo: str, task: str | None = None, *, model: str = TINY_MODEL, device: str = "cpu",
                  dtype: str = "float32", seed: int = 0, config: TrainConfig | None = None,
                  convention: str = "verl", crpo_mode: str = "sum_then_normalize", gamma: float = 0.95,
                  omega: float = 1.0, task_options: Mapping | None = None,
                  dist: Distributed = Distributed()) -> Trainer:
    """A :class:`Trainer` for ``algo`` ("grpo", "crpo", "gigpo") on ``task`` (default: digits,
    diagnosis, keydoor), the policy initialized from ``seed`` (the same on every rank).
    ``task_options``: keyword options of the task or environment (e.g. ``{"invalid_penalty": -0.05}``
    for keydoor), passed to :func:`~prefix_grouper.trainers.tasks.make_task`."""
    check_choice(algo, "algo", ALGORITHMS)
    check_choice(dtype, "dtype", tuple(DTYPES))
    if task_options is not None and not isinstance(task_options, Mapping):
        raise TypeError(f"task_options must be a mapping of keyword options, got {type(task_options).__name__}")
    environment = make_task(task or DEFAULT_TASKS[algo], **(task_options or {}))
    is_environment = isinstance(environment, Environment)
    if algo == "gigpo" and not is_environment:
        raise ValueError(f"gigpo needs a multi-step environment (e.g. 'keydoor'), got the single-turn task {task!r}")
    if algo == "crpo" and is_environment:
        raise ValueError(f"crpo needs a task with reward channels (e.g. 'diagnosis'), got the environment {task!r}")
    algorithm = {"grpo": lambda: GRPO(convention),
                 "crpo": lambda: CRPO(environment.weights, crpo_mode),
                 "gigpo": lambda: GiGPO(gamma, omega)}[algo]()
    torch.manual_seed(seed)
    policy = load_policy(model, environment.alphabet, dtype=DTYPES[dtype], device=device)
    # Sampling differs across ranks (their prompts differ anyway); the weights do not.
    torch.manual_seed(seed * 1_000_003 + dist.rank)
    return Trainer(policy, environment, algorithm, config or TrainConfig(), seed=seed, dist=dist)
