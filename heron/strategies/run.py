"""One prompt under a strategy: the samples drawn so far, round by round, and what they cost.

The front ends share this loop and differ only in how they draw a round (``LLM`` batches the
rounds of all its prompts into one engine run; the server awaits each prompt's rounds; the
benchmark replays samples it drew once)::

    run = StrategyRun(strategy)
    while k := run.wanted():
        out = <draw one engine request with run.round_params(params)>   # n = k samples
        run.add(out.outputs, model_calls=<engine steps it took part in>)
    result = run.result(out)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from heron.config import SamplingParams
from heron.outputs import CompletionOutput, RequestOutput, StrategyReport
from heron.strategies.base import Strategy


class StrategyRun:
    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.samples: list[CompletionOutput] = []
        self.model_calls = 0
        self.rounds = 0

    @classmethod
    def single(cls, strategy: Strategy, out: RequestOutput, model_calls: int) -> RequestOutput:
        """The report of a strategy that drew ``out`` in one round (a per-token strategy the
        engine applied while the request ran as a plain one)."""
        run = cls(strategy)
        run.add(out.outputs, model_calls)
        return run.result(out)

    def wanted(self) -> int:
        """Samples to draw in the next round; 0 when the strategy can decide."""
        return self.strategy.samples_to_draw(self.samples)

    def round_params(self, params: SamplingParams) -> SamplingParams:
        """The next round's request: ``wanted()`` samples, the chosen tokens' logprobs (the
        scorers read them), and a seed of its own per round so rounds differ yet reproduce."""
        seed = None if params.seed is None else params.seed + self.rounds
        params = replace(params, n=self.wanted(), seed=seed, logprobs=params.logprobs or 0)
        return self.strategy.request_params(params)

    def add(self, outputs: Sequence[CompletionOutput], model_calls: int) -> None:
        """One round's samples, renumbered after the earlier rounds'."""
        base = len(self.samples)
        self.samples += [replace(c, index=base + i) for i, c in enumerate(outputs)]
        self.model_calls += model_calls
        self.rounds += 1

    def report(self, metrics: dict[str, float] | None = None) -> StrategyReport:
        """``metrics``: the engine's accounting of the last round (e.g. a per-token
        strategy's cheap/full tokens)."""
        sel = self.strategy.select(self.samples)
        return StrategyReport(
            strategy=self.strategy.name,
            chosen=sel.index,
            answer=sel.answer,
            vote_share=sel.vote_share,
            votes=sel.votes,
            score=sel.score,
            num_samples=len(self.samples),
            num_tokens=sum(len(c.token_ids) for c in self.samples),
            model_calls=self.model_calls,
            rounds=self.rounds,
            samples=self.samples,
            metrics=dict(metrics or {}),
        )

    def result(self, last: RequestOutput) -> RequestOutput:
        """``last`` (the final round's output) with the chosen sample as its only output and
        the report attached."""
        report = self.report(last.metrics)
        chosen = replace(self.samples[report.chosen], index=0)
        return replace(last, outputs=[chosen], finished=True, strategy=report)
