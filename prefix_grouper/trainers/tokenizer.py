"""Character-level tokenizer for the reference trainers' synthetic tasks.

The tasks use small alphabets so that tiny models trained from random init can learn them;
one token per character keeps the reward rules and the model's view of the text identical.
"""
from __future__ import annotations

import json
import operator
import os
from typing import Sequence

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
FILE_NAME = "tokenizer.json"


class CharTokenizer:
    """Character-level tokenizer: ids 0, 1, 2 are <pad>, <bos>, <eos>; then one id per alphabet character."""

    def __init__(self, alphabet: str) -> None:
        if not isinstance(alphabet, str):
            raise TypeError(f"alphabet must be a str, got {type(alphabet).__name__} {alphabet!r}")
        if not alphabet:
            raise ValueError("alphabet is empty: the tokenizer needs at least one character")
        seen: set[str] = set()
        for index, char in enumerate(alphabet):
            if char in seen:
                raise ValueError(f"alphabet repeats character {char!r} (at index {index}); every character "
                                 f"must map to one id")
            seen.add(char)
        self.alphabet = alphabet
        self.pad_id, self.bos_id, self.eos_id = range(len(SPECIAL_TOKENS))
        self.vocab_size = len(SPECIAL_TOKENS) + len(alphabet)
        self._id_of = {char: len(SPECIAL_TOKENS) + i for i, char in enumerate(alphabet)}

    def __repr__(self) -> str:
        return f"CharTokenizer(alphabet={self.alphabet!r})"

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text``, one per character; no special tokens are added."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        for index, char in enumerate(text):
            if char not in self._id_of:
                raise ValueError(f"text has character {char!r} at index {index}, which is not in the "
                                 f"tokenizer's alphabet {self.alphabet!r}")
        return [self._id_of[char] for char in text]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (ints, or a 1-D integer tensor): stops at the first <eos>, drops <pad> and <bos>."""
        chars = []
        for position, token in enumerate(ids):
            token = operator.index(token)
            if token == self.eos_id:
                break
            if token in (self.pad_id, self.bos_id):
                continue
            if not 0 <= token < self.vocab_size:
                # A model whose vocabulary is larger than this tokenizer's would otherwise produce
                # text that no task can score; that is a configuration error, not a wrong answer.
                raise ValueError(f"ids[{position}] = {token} is outside the tokenizer's vocabulary "
                                 f"[0, {self.vocab_size})")
            chars.append(self.alphabet[token - len(SPECIAL_TOKENS)])
        return "".join(chars)

    def save(self, directory: str) -> None:
        """Write ``directory/tokenizer.json`` (the directory is created if needed)."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, FILE_NAME), "w", encoding="utf-8") as file:
            json.dump({"special_tokens": list(SPECIAL_TOKENS), "alphabet": self.alphabet}, file)

    @classmethod
    def load(cls, directory: str) -> "CharTokenizer":
        """Read the tokenizer that :meth:`save` wrote to ``directory``."""
        path = os.path.join(directory, FILE_NAME)
        with open(path, encoding="utf-8") as file:
            saved = json.load(file)
        if saved.get("special_tokens") != list(SPECIAL_TOKENS):
            raise ValueError(f"{path} has special tokens {saved.get('special_tokens')!r}; this tokenizer "
                             f"uses {list(SPECIAL_TOKENS)!r}")
        return cls(saved["alphabet"])
