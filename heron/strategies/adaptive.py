"""Adaptive self-consistency: draw ``initial`` samples, and while the answers do not agree
(the top answer has less than ``agreement`` of the votes) double the samples, up to ``n``.
Easy problems stop after the first round; the budget goes to the uncertain ones. The answer
is the majority vote over everything drawn."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from heron.outputs import CompletionOutput
from heron.strategies.base import STRATEGIES, check_option
from heron.strategies.majority import Majority


@STRATEGIES.register("adaptive")
@dataclass
class Adaptive(Majority):
    """``n``: the most samples; rounds draw ``initial``, then double (4, 8, 16 for n = 16)."""

    n: int = 16
    initial: int = 4
    agreement: float = 0.75

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option(
            isinstance(self.initial, int)
            and not isinstance(self.initial, bool)
            and self.initial >= 1,
            "initial",
            f"samples in the first round, an integer >= 1; got {self.initial!r}",
        )
        check_option(
            isinstance(self.agreement, int | float) and 0 < self.agreement <= 1,
            "agreement",
            f"the top answer's vote share that stops sampling, in (0, 1]; got {self.agreement!r}",
        )

    def samples_to_draw(self, samples: Sequence[CompletionOutput]) -> int:
        drawn = len(samples)
        if drawn == 0:
            return min(self.initial, self.n)
        if drawn >= self.n:
            return 0
        votes = self.votes(samples)
        if votes.share(votes.winner) >= self.agreement:
            return 0
        return min(drawn, self.n - drawn)
