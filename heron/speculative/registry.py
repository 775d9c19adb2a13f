"""Proposers by name (``proposer.PROPOSERS``), as ``EngineConfig.speculative_method`` and the
CLI/server flags name them, with their options (``speculative_options``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from heron.speculative.proposer import PROPOSERS, Proposer

if TYPE_CHECKING:
    from heron.engine.plugin import EngineParts

__all__ = ["PROPOSERS", "build_proposer"]


def build_proposer(parts: EngineParts) -> Proposer:
    """The engine's proposer, from its options, started on the engine's parts."""
    config = parts.config
    proposer = PROPOSERS.make(config.speculative_method, config.speculative_options)
    proposer.start(parts)
    return proposer
