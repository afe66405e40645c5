"""GRPO task: copy, reverse or sort a short string of digits, e.g. "310>" -> "013" (sort)."""
from __future__ import annotations

import random

from ...checks import check_choice, check_int
from .base import Prompt, Task, check_completion, check_rng

DIGITS = "0123456789"
# Marks the end of the digits so the policy knows where its answer starts.
PROMPT_END = ">"
OPERATIONS = {
    "copy": lambda digits: digits,
    "reverse": lambda digits: digits[::-1],
    "sort": lambda digits: "".join(sorted(digits)),
}


class DigitsTask(Task):
    """Answer ``operation(digits)`` for a prompt of ``length`` digits drawn from the first ``num_digits``.

    Reward channel ``correct_fraction``: matching positions over ``max(len(answer), len(completion))``,
    so a missing or extra character counts as a wrong position.
    """
    name = "digits"
    channels = ("correct_fraction",)
    weights = (1.0,)

    # Sort is the default because a tiny model gets it off the ground: part of the reward comes
    # from the answer's shape (small digits first) before attention to the prompt is learned.
    # Probe, 2-layer 64-wide Qwen2, plain GRPO, 200 steps of 8 prompts x 8, lr 3e-3: the mean
    # reward of the first / last 20 steps went 0.16 -> 0.63 for sort, 0.15 -> 0.29 for copy.
    def __init__(self, *, length: int = 3, num_digits: int = 5, operation: str = "sort") -> None:
        self.length = check_int(length, "length", 1)
        self.num_digits = check_int(num_digits, "num_digits", 1, len(DIGITS))
        check_choice(operation, "operation", tuple(OPERATIONS))
        self.operation = operation
        self.alphabet = DIGITS[:self.num_digits] + PROMPT_END
        self.max_new_tokens = self.length + 1

    def sample(self, rng: random.Random) -> Prompt:
        check_rng(rng)
        digits = "".join(rng.choice(DIGITS[:self.num_digits]) for _ in range(self.length))
        return Prompt(digits + PROMPT_END, OPERATIONS[self.operation](digits))

    def score(self, prompt: Prompt, completion: str) -> list[float]:
        check_completion(completion)
        answer = prompt.target
        correct = sum(expected == given for expected, given in zip(answer, completion))
        return [correct / max(len(answer), len(completion))]

    def reference_answer(self, prompt: Prompt) -> str:
        return prompt.target
