"""Prompt lookup decoding: find the latest earlier occurrence of the sequence's last n tokens
(n from ``ngram_max`` down to ``ngram_min``) in its prompt and output, and propose the tokens
that followed it. Free to run, and strong wherever the output copies its input (summaries,
extraction, code edits)."""

from __future__ import annotations

from dataclasses import dataclass

from heron.engine.sequence import Sequence
from heron.speculative.proposer import PROPOSERS, Draft, Proposer


def check_ngram_range(ngram_min: object, ngram_max: object) -> None:
    """The suffix lengths a lookup proposer matches: 1 <= ngram_min <= ngram_max."""
    PROPOSERS.check_int("ngram_min", ngram_min, 1)
    PROPOSERS.check_int("ngram_max", ngram_max, ngram_min)


@PROPOSERS.register("ngram")
@dataclass(eq=False)
class NgramProposer(Proposer):
    ngram_min: int = 1  # shortest suffix matched
    ngram_max: int = 3  # longest suffix matched

    def __post_init__(self) -> None:
        check_ngram_range(self.ngram_min, self.ngram_max)

    def propose(self, seq: Sequence, k: int) -> Draft:
        return Draft(lookup(seq.token_ids, k, self.ngram_min, self.ngram_max))


def lookup(tokens: list[int], k: int, ngram_min: int, ngram_max: int) -> list[int]:
    """The up to ``k`` tokens after the latest earlier match of the longest matching suffix."""
    n_tokens = len(tokens)
    for n in range(min(ngram_max, n_tokens - 1), ngram_min - 1, -1):
        suffix = tokens[n_tokens - n :]
        first = suffix[0]
        # Latest start i < n_tokens - n with tokens[i:i+n] == suffix (scanning backwards).
        i = n_tokens - n - 1
        while i >= 0:
            if tokens[i] == first and tokens[i : i + n] == suffix:
                return tokens[i + n : i + n + k]
            i -= 1
    return []
