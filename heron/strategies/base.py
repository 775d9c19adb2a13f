"""The strategy interface: what to draw next for one prompt, and which sample to return.

A strategy works on one request's group of samples and never touches the engine: the caller
(``LLM``, the server, the benchmark) draws the samples it asks for, as one engine request
with ``n = k`` whose samples share the prompt's KV blocks copy-on-write, and hands them back.
Strategies hold only their options, so one instance serves any number of prompts.

A ``TokenStrategy`` decides each token of a single sample instead (context-aware and
entropy-adaptive decoding): it travels with the engine request as
``SamplingParams.token_strategy``, and its engine plugin does the work step by step, so the
front ends can stream it like a plain request."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

from heron.config import SamplingParams
from heron.errors import InvalidRequestError
from heron.outputs import CompletionOutput
from heron.registry import Registry

# Strategies by name, for ``LLM.generate(strategy=...)``, the CLI and the server; ``n`` is
# given beside the options (``SamplingParams.n``, the CLI's ``--n``).
STRATEGIES: Registry[Strategy] = Registry("strategy", "heron.strategies", given=("n",))


@dataclass
class Selection:
    """A strategy's decision over the samples it was given."""

    index: int  # the chosen sample's position in the list
    answer: str | None = None  # its extracted answer, for strategies that vote
    vote_share: float | None = None  # the answer's votes / all samples
    votes: dict[str, int] = field(default_factory=dict)  # answer -> samples that gave it
    score: float | None = None  # the chosen sample's score, for strategies that score


def check_option(ok: bool, option: str, message: str) -> None:
    """A strategy's check of one of its options; ``n`` is a parameter of its own."""
    if option != "n":
        STRATEGIES.check(ok, option, message)
    elif not ok:
        raise InvalidRequestError(f"n: {message}", param="n")


@dataclass
class Strategy(ABC):
    """``n``: samples to draw (the most, for strategies that may stop early)."""

    name: ClassVar[str]
    per_token: ClassVar[bool] = False
    n: int = 8

    def __post_init__(self) -> None:
        check_option(
            isinstance(self.n, int) and not isinstance(self.n, bool) and self.n >= 1,
            "n",
            f"samples to draw, an integer >= 1; got {self.n!r}",
        )

    def samples_to_draw(self, samples: Sequence[CompletionOutput]) -> int:
        """How many more samples to draw given those so far; 0 = decide now.
        Default: all ``n`` in one round."""
        return max(0, self.n - len(samples))

    @abstractmethod
    def select(self, samples: Sequence[CompletionOutput]) -> Selection:
        """Pick one of ``samples`` (at least one)."""

    def request_params(self, params: SamplingParams) -> SamplingParams:
        """The engine request's settings under this strategy (by default unchanged)."""
        return params


@dataclass
class TokenStrategy(Strategy):
    """A strategy the engine applies at every token of one sample (``n`` is 1)."""

    per_token = True
    n: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option(self.n == 1, "n", f"{self.name} draws one sample; leave n at 1")

    def select(self, samples: Sequence[CompletionOutput]) -> Selection:
        return Selection(index=0)

    def request_params(self, params: SamplingParams) -> SamplingParams:
        return replace(params, token_strategy=self)
