"""Tasks (single-turn, GRPO and CRPO) and environments (multi-step, GiGPO) of the reference trainers.

Each is small enough for a tiny model trained from random init on a CPU to learn by RL alone,
and verifiable by a rule.
"""
from __future__ import annotations

from .base import Environment, Prompt, Task
from .diagnosis import Diagnosis, DiagnosisTask
from .digits import DigitsTask
from .keydoor import KeyDoorEnvironment, KeyDoorHistoryEnvironment, KeyDoorState

TASKS: dict[str, type[Task]] = {"digits": DigitsTask, "diagnosis": DiagnosisTask}
ENVIRONMENTS: dict[str, type[Environment]] = {"keydoor": KeyDoorEnvironment,
                                              "keydoor-history": KeyDoorHistoryEnvironment}


def make_task(name: str, **kwargs) -> Task | Environment:
    """The task or environment registered as ``name``, built with keyword options ``kwargs``."""
    registry = {**TASKS, **ENVIRONMENTS}
    if name not in registry:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}; environments: "
                         f"{', '.join(ENVIRONMENTS)}")
    return registry[name](**kwargs)


__all__ = ["Diagnosis", "DiagnosisTask", "DigitsTask", "ENVIRONMENTS", "Environment", "KeyDoorEnvironment",
           "KeyDoorHistoryEnvironment", "KeyDoorState", "Prompt", "TASKS", "Task", "make_task"]
