"""Scores that rank one request's samples (higher is better), by name for the CLI and the
server; offline, any ``Callable[[CompletionOutput], float]`` works too.

They read the chosen tokens' logprobs, which a strategy always asks the engine for. An empty
completion scores -inf: it must not win by having no tokens to be unsure about."""

from __future__ import annotations

import math
from collections.abc import Callable

from heron.errors import InvalidRequestError
from heron.outputs import CompletionOutput

Scorer = Callable[[CompletionOutput], float]


def token_logprobs(c: CompletionOutput) -> list[float]:
    """The logprob of each generated token (the engine records them when logprobs >= 0)."""
    if c.logprobs is None:
        raise ValueError("scoring needs the sampled tokens' logprobs: set logprobs >= 0")
    return [pos[tid].logprob for tid, pos in zip(c.token_ids, c.logprobs, strict=True)]


def mean_logprob(c: CompletionOutput) -> float:
    """Average confidence per token; unlike the sum it does not favour short answers."""
    lps = token_logprobs(c)
    return sum(lps) / len(lps) if lps else -math.inf


def sum_logprob(c: CompletionOutput) -> float:
    """The completion's log-likelihood under the model."""
    lps = token_logprobs(c)
    return sum(lps) if lps else -math.inf


def min_logprob(c: CompletionOutput) -> float:
    """The least confident token: one wild guess sinks a chain of reasoning."""
    return min(token_logprobs(c), default=-math.inf)


SCORERS: dict[str, Scorer] = {
    "mean_logprob": mean_logprob,
    "sum_logprob": sum_logprob,
    "min_logprob": min_logprob,
}


def resolve_scorer(scorer: str | Scorer) -> Scorer:
    if callable(scorer):
        return scorer
    if scorer not in SCORERS:
        raise InvalidRequestError(
            f"strategy_options.scorer: must be one of {tuple(SCORERS)} (or a Python callable "
            f"offline), got {scorer!r}",
            param="strategy_options",
        )
    return SCORERS[scorer]
