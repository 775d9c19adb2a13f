"""Best-of-majority: keep the samples whose answer has at least ``threshold`` of the votes,
then return the best by score among them. Voting filters out rare (likely wrong) answers,
the score picks among the plausible ones, so one confident outlier cannot win as in
best-of-n, and a near-tie is not settled by sampling luck as in a plain vote."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from heron.outputs import CompletionOutput
from heron.strategies.base import STRATEGIES, Selection, check_option
from heron.strategies.best_of_n import BestOfN
from heron.strategies.majority import Majority


@STRATEGIES.register("best_of_majority")
@dataclass
class BestOfMajority(Majority, BestOfN):
    threshold: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option(
            isinstance(self.threshold, int | float) and 0 < self.threshold <= 1,
            "threshold",
            f"the vote share an answer needs, in (0, 1]; got {self.threshold!r}",
        )

    def select(self, samples: Sequence[CompletionOutput]) -> Selection:
        votes = self.votes(samples)
        kept = {a for a in votes.counts if votes.share(a) >= self.threshold}
        if not kept and votes.winner is not None:  # no answer is that popular: the top one
            kept = {votes.winner}
        pool = [i for i, a in enumerate(votes.answers) if a in kept] or range(len(samples))
        scores = self.scores(samples)
        best = max(pool, key=scores.__getitem__)
        answer = votes.answers[best]
        return Selection(
            index=best,
            answer=answer,
            vote_share=votes.share(answer),
            votes=dict(votes.counts),
            score=scores[best],
        )
