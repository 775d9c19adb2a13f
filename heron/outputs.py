"""What generate() returns: the same shapes and names as vLLM's offline API."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from heron.tools import AssistantMessage


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = most likely
    decoded_token: str | None = None


# One position: token id -> Logprob, holding the chosen token and the top-k alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None = None
    # "stop" | "length" | "abort" | None while running; "error": its logits became NaN or
    # infinite (the server fails the request), the batch's other samples unaffected.
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or token that ended it
    # LLM.chat with tools: the text read for tool calls (content outside them, the calls)
    message: AssistantMessage | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StrategyReport:
    """What a decoding strategy (``generate(..., strategy=...)``) chose and what it spent."""

    strategy: str
    chosen: int  # position of the returned sample in ``samples``
    answer: str | None  # the extracted answer, for strategies that vote
    vote_share: float | None
    votes: dict[str, int]  # answer -> samples that gave it
    score: float | None  # the returned sample's score, for strategies that score
    num_samples: int  # samples drawn
    num_tokens: int  # tokens generated over all samples
    model_calls: int  # engine steps (forward passes) the request's samples took part in
    rounds: int  # engine requests drawn one after another (> 1 only for adaptive)
    samples: list[CompletionOutput]
    # The engine's accounting of the last round, e.g. entropy-adaptive decoding's cheap and
    # full tokens or context-aware decoding's context-free prompt tokens.
    metrics: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        """Everything but the samples themselves, JSON-safe (what the server returns): the
        score of an empty completion (-inf) becomes None."""
        out = {k: v for k, v in vars(self).items() if k != "samples"}
        if out["score"] is not None and not math.isfinite(out["score"]):
            out["score"] = None
        return out


@dataclass
class RequestTimes:
    """When a request arrived, sampled its first token and finished (``time.monotonic()``
    seconds, as vLLM's RequestMetrics): time to first token and the decode phase's time per
    output token follow from them."""

    arrival: float
    first_token: float | None = None
    finished: float | None = None

    @property
    def decode_seconds(self) -> float | None:
        """From the first token to the last (None until finished)."""
        if self.first_token is None or self.finished is None:
            return None
        return self.finished - self.first_token


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    strategy: StrategyReport | None = None  # set when a decoding strategy chose the output
    times: RequestTimes | None = None
