"""Proposers by name, as ``EngineConfig.speculative_method`` and the CLI/server flags name
them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from heron.errors import InvalidRequestError
from heron.speculative.draft_model import DraftModelProposer
from heron.speculative.layer_skip import LayerSkipProposer, default_kept_layers
from heron.speculative.lookahead import LookaheadProposer
from heron.speculative.ngram import NgramProposer
from heron.speculative.proposer import Proposer

if TYPE_CHECKING:
    from heron.engine.plugin import EngineParts

PROPOSERS: dict[str, type[Proposer]] = {
    "ngram": NgramProposer,
    "lookahead": LookaheadProposer,
    "layer_skip": LayerSkipProposer,
    "draft": DraftModelProposer,
}


def build_proposer(parts: EngineParts) -> Proposer:
    config = parts.config
    method = config.speculative_method
    if method == "ngram":
        return NgramProposer(config.ngram_min, config.ngram_max)
    if method == "lookahead":
        return LookaheadProposer(config.ngram_min, config.ngram_max, config.lookahead_depth)
    if method == "layer_skip":
        num_layers = parts.model_config.num_layers
        keep = config.draft_num_layers or default_kept_layers(num_layers)
        return LayerSkipProposer(parts.runner, parts.block_manager, keep)
    if method == "draft":
        return DraftModelProposer(
            config.draft_model,
            config.draft_num_layers,
            parts.tokenizer,
            parts.block_manager.num_blocks,
            config.block_size,
            parts.runner.device,
            parts.runner.dtype,
        )
    raise InvalidRequestError(f"speculative_method: unknown {method!r}", "speculative_method")
