"""Strategies by name (``base.STRATEGIES``), for ``LLM.generate(strategy=...)``, the CLI and
the server."""

from __future__ import annotations

from typing import Any

from heron.errors import InvalidRequestError
from heron.strategies.base import STRATEGIES, Strategy

__all__ = ["STRATEGIES", "make_strategy"]


def make_strategy(
    spec: str | Strategy, n: int = 1, options: dict[str, Any] | None = None
) -> Strategy:
    """A strategy from its name, ``n`` samples and its options; an instance passes through
    (its own ``n`` rules, so a different ``n`` > 1 given beside it is an error)."""
    if isinstance(spec, Strategy):
        if options:
            raise InvalidRequestError(
                "strategy_options: give options to the strategy's constructor instead",
                param="strategy_options",
            )
        if n not in (1, spec.n):
            raise InvalidRequestError(
                f"n: the strategy draws its own n={spec.n} samples; leave n at 1 or set it "
                f"to {spec.n}",
                param="n",
            )
        return spec
    return STRATEGIES.make(spec, options, n=n)
