"""CRPO task: findings -> diagnosis, citing evidence, scored by a small rule book.

A prompt lists findings (single letters) and ends with ">", e.g. "dvc>": one or more key
findings of the true disease plus distractors that belong to no disease. The answer is the
diagnosis letter, "|", then the cited findings: "B|cd".
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple, Sequence

from ...checks import check_finite_real, check_int
from .base import Prompt, Task, check_completion, check_rng

PROMPT_END = ">"
SEPARATOR = "|"
# Disease -> its key findings. Diseases are upper case, findings lower case, so the two
# alphabets never mix and a tiny model can tell the answer's parts apart.
DEFAULT_RULE_BOOK = MappingProxyType({"A": "ab", "B": "cd", "C": "ef"})
DEFAULT_DISTRACTORS = "uv"


class Diagnosis(NamedTuple):
    """Target of a diagnosis prompt: the true disease and its key findings shown in the prompt."""
    disease: str
    key_findings: str


class DiagnosisTask(Task):
    """Diagnose from findings and cite the evidence.

    Channels, each in [0, 1]:
    - ``accuracy``: the first character is the true disease;
    - ``faithfulness``: fraction of the cited characters (after the first "|") that are findings
      present in the prompt; 0 when nothing is cited;
    - ``comprehensiveness``: fraction of the prompt's key findings of the true disease that are cited;
    - ``format``: a third for each well-formed part: a disease letter first, the only "|" second, and
      an evidence part (after the first "|") of one or more distinct findings. Partial credit
      gives the channel a gradient from a random-init policy, of which only 1 answer in 200
      is well formed as a whole.
    The channels are read separately so each one rewards its own skill even when another fails.
    """
    name = "diagnosis"
    channels = ("accuracy", "faithfulness", "comprehensiveness", "format")

    def __init__(self, *, rule_book: Mapping[str, str] = DEFAULT_RULE_BOOK,
                 distractors: str = DEFAULT_DISTRACTORS, max_distractors: int = 1,
                 weights: Sequence[float] = (1.0, 0.5, 0.5, 0.5)) -> None:
        if not isinstance(rule_book, Mapping) or not rule_book:
            raise ValueError(f"rule_book must be a non-empty mapping disease -> key findings, got {rule_book!r}")
        if not isinstance(distractors, str):
            raise TypeError(f"distractors must be a str of finding characters, got {type(distractors).__name__}")
        symbols = [PROMPT_END, SEPARATOR]
        for disease, key_findings in rule_book.items():
            if not (isinstance(disease, str) and len(disease) == 1):
                raise ValueError(f"rule_book keys must be single characters, got {disease!r}")
            if not (isinstance(key_findings, str) and key_findings):
                raise ValueError(f"rule_book[{disease!r}] must be a non-empty str of finding characters, "
                                 f"got {key_findings!r}")
            symbols += [disease, *key_findings]
        symbols += distractors
        repeated = sorted({s for s in symbols if symbols.count(s) > 1})
        if repeated:
            raise ValueError(f"rule_book and distractors must use each character once, and neither "
                             f"{PROMPT_END!r} nor {SEPARATOR!r}; repeated: {repeated!r}")
        self.rule_book = dict(rule_book)
        self.distractors = distractors
        self.max_distractors = check_int(max_distractors, "max_distractors", 0, len(distractors))
        if len(weights) != len(self.channels):
            raise ValueError(f"weights must have one entry per channel {self.channels}, got {len(weights)}")
        self.weights = tuple(check_finite_real(w, f"weights[{i}]") for i, w in enumerate(weights))
        self.findings = "".join(self.rule_book.values()) + distractors
        self.alphabet = "".join(symbols)
        longest_key = max(len(key_findings) for key_findings in self.rule_book.values())
        # Diagnosis letter, separator, every key finding, EOS.
        self.max_new_tokens = 1 + len(SEPARATOR) + longest_key + 1

    def sample(self, rng: random.Random) -> Prompt:
        check_rng(rng)
        disease = rng.choice(sorted(self.rule_book))
        key_findings = self.rule_book[disease]
        shown = rng.sample(key_findings, rng.randint(1, len(key_findings)))
        findings = shown + rng.sample(self.distractors, rng.randint(0, self.max_distractors))
        rng.shuffle(findings)
        return Prompt("".join(findings) + PROMPT_END, Diagnosis(disease, "".join(sorted(shown))))

    def score(self, prompt: Prompt, completion: str) -> list[float]:
        check_completion(completion)
        target: Diagnosis = prompt.target
        present = set(prompt.text) - {PROMPT_END}
        cited = completion.partition(SEPARATOR)[2]
        accuracy = float(completion[:1] == target.disease)
        faithfulness = sum(c in present for c in cited) / len(cited) if cited else 0.0
        comprehensiveness = len(set(target.key_findings) & set(cited)) / len(target.key_findings)
        well_formed_parts = (completion[:1] in self.rule_book,
                             completion[1:2] == SEPARATOR and completion.count(SEPARATOR) == 1,
                             cited != "" and all(c in self.findings for c in cited) and len(set(cited)) == len(cited))
        return [accuracy, faithfulness, comprehensiveness, sum(well_formed_parts) / len(well_formed_parts)]

    def reference_answer(self, prompt: Prompt) -> str:
        return prompt.target.disease + SEPARATOR + prompt.target.key_findings
