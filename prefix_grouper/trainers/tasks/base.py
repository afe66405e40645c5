"""Interfaces of the reference trainers' tasks (single-turn) and environments (multi-step)."""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Hashable


@dataclass(frozen=True)
class Prompt:
    """One task instance: ``text`` is what the policy sees (the trainer prepends BOS),
    ``target`` is what the scorer needs (hashable)."""
    text: str
    target: Any


class Task(ABC):
    """Single-turn task verifiable by a rule (GRPO, CRPO).

    ``alphabet`` holds every character of any prompt and of any correct answer;
    ``channels`` names the reward channels (``channels[0]`` is the main reward) and ``weights``
    combines them by default; ``max_new_tokens`` fits a correct answer plus EOS.
    """
    name: ClassVar[str]
    alphabet: str
    channels: tuple[str, ...]
    weights: tuple[float, ...]
    max_new_tokens: int

    @abstractmethod
    def sample(self, rng: random.Random) -> Prompt:
        """A random task instance drawn with ``rng``."""

    @abstractmethod
    def score(self, prompt: Prompt, completion: str) -> list[float]:
        """One value in [0, 1] per channel for the decoded ``completion`` of ``prompt``."""

    @abstractmethod
    def reference_answer(self, prompt: Prompt) -> str:
        """A completion that scores 1 on every channel (without EOS)."""


class Environment(ABC):
    """Multi-step episodes (GiGPO); states are immutable and hashable.

    ``observe(state)`` is the raw current state as text, so identical observations mean the
    same anchor state. Environments keep no step counter (a counter in the state would stop
    states from recurring across time steps): the caller ends an episode after ``max_steps``
    steps. ``max_new_tokens`` is per action; ``invalid_penalty`` is the reward of an invalid
    action, which leaves the state unchanged.
    """
    name: ClassVar[str]
    alphabet: str
    max_new_tokens: int
    max_steps: int
    invalid_penalty: float
    # False: a step's prompt is its observation. True: it is the whole interaction history,
    # the previous step's prompt, its action, then this observation (verl-agent's per-step
    # training with history), so the steps of a trajectory form a chain of prefixes.
    history: ClassVar[bool] = False

    @abstractmethod
    def reset(self, rng: random.Random) -> Hashable:
        """A random initial state drawn with ``rng``."""

    @abstractmethod
    def observe(self, state: Hashable) -> str:
        """The step's prompt text: the raw current state."""

    @abstractmethod
    def step(self, state: Hashable, action: str) -> tuple[Hashable, float, bool, bool]:
        """``(next_state, reward, done, invalid)`` after the decoded ``action`` in ``state``."""

    @abstractmethod
    def success(self, state: Hashable) -> bool:
        """Whether ``state`` is the episode's goal."""


def check_rng(rng: Any) -> None:
    # A torch.Generator or a seed would fail deep inside sampling with an unhelpful message.
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")


def check_completion(completion: Any) -> None:
    if not isinstance(completion, str):
        raise TypeError(f"completion must be the decoded text (str), got {type(completion).__name__}")


