"""Passkey retrieval prompts: a 5-digit key hidden at a given depth of filler text, padded to
about ``num_tokens`` tokens; the answer is correct when the greedy continuation holds the key.
Kept in one small module so other benchmarks (KV compression) can share it."""

from __future__ import annotations

import random
from dataclasses import dataclass

_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


@dataclass
class PasskeyCase:
    prompt: str
    passkey: str
    depth: float


def make_passkey(tokenizer, num_tokens: int, depth: float, seed: int) -> PasskeyCase:
    """A prompt of about ``num_tokens`` tokens with the key at ``depth`` (0 = start, 1 = end)."""
    key = str(random.Random(seed).randint(10000, 99999))
    head = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    tail = "\nWhat is the pass key? The pass key is"
    fixed = len(tokenizer.encode(head + needle + tail))
    per = len(tokenizer.encode(_FILLER * 10)) / 10
    n = max(0, int((num_tokens - fixed) / per))
    before = int(n * depth)
    prompt = head + _FILLER * before + needle + _FILLER * (n - before) + tail
    return PasskeyCase(prompt, key, depth)


def is_correct(case: PasskeyCase, completion: str) -> bool:
    return case.passkey in completion
