"""Self-speculative decoding (Draft & Verify, LayerSkip): the target model with some of its
layers skipped is the draft. No second model and no second cache: the draft reuses the
target's K/V of the context, writes its own K/V for the drafted positions into the same
slots, and the verify pass overwrites them with the full model's.

Which layers to keep: ``num_layers`` of them spread evenly over depth (first and last
always kept), the "balanced across depth" choice; the default keeps 5/6 of them. Small models
suffer from skipping: on SmolLM2-135M a draft of most of its layers rarely agrees with the
full model's next token, so there this proposer is a correctness feature more than a
speed-up; a one-shot calibration (drop the individually least harmful layers) did no better
than the even spread."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from heron.engine.sequence import Sequence
from heron.errors import InvalidRequestError
from heron.speculative.proposer import (
    PROPOSERS,
    Draft,
    Proposer,
    draw_draft_token,
    stack_probs,
)

if TYPE_CHECKING:
    from heron.engine.plugin import EngineParts

logger = logging.getLogger(__name__)


def default_kept_layers(num_layers: int) -> int:
    """How many layers a layer-skipped model keeps unless told: 5/6 of them."""
    return max(1, num_layers * 5 // 6)


def spread_layers(num_layers: int, keep: int, param: str, option: str) -> list[int]:
    """``keep`` layer indices evenly spaced over ``num_layers``, first and last included;
    ``keep`` is option ``option`` of ``param`` (e.g. ``speculative_options``), named in the
    error when the model has fewer layers."""
    if not 1 <= keep <= num_layers:
        raise InvalidRequestError(
            f"{param}.{option}: must be in [1, {num_layers}] (the model's layers), got {keep}",
            param=param,
        )
    if keep == 1:
        return [0]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


@PROPOSERS.register("layer_skip")
@dataclass(eq=False)
class LayerSkipProposer(Proposer):
    num_layers: int | None = None  # layers the draft keeps (None: 5/6 of them)

    def __post_init__(self) -> None:
        if self.num_layers is not None:
            PROPOSERS.check_int("num_layers", self.num_layers, 1)

    def start(self, parts: EngineParts) -> None:
        self.runner = parts.runner
        self.bm = parts.block_manager
        total = parts.model_config.num_layers
        keep = self.num_layers or default_kept_layers(total)
        self.layers = spread_layers(total, keep, PROPOSERS.options_param, "num_layers")
        logger.info("layer_skip draft: %d of %d layers", len(self.layers), total)

    def propose(self, seq: Sequence, k: int) -> Draft:
        return self.propose_batch([seq], [k])[0]

    def propose_batch(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        # The drafted positions need blocks now (the scheduler would only add them later);
        # a sequence that cannot get them does not speculate this step.
        active = []
        for seq, k in zip(seqs, ks, strict=True):
            if self.bm.can_append(seq, 1 + k):
                copies = self.bm.append_slots(seq, 1 + k)
                if copies:
                    self.runner.copy_blocks(copies)
                active.append((seq, k))
        drafts = {seq.seq_id: ([], []) for seq in seqs}
        last = {seq.seq_id: seq.token_ids[-1] for seq, _ in active}
        for j in range(max((k for _, k in active), default=0)):
            step = [(seq, k) for seq, k in active if k > j]
            batch = [seq for seq, _ in step]
            logits = self.runner.decode_logits(
                batch,
                [last[s.seq_id] for s in batch],
                [s.num_tokens - 1 + j for s in batch],
                self.layers,
            )
            for row, seq in enumerate(batch):
                token, probs = draw_draft_token(logits[row], seq)
                tokens, dists = drafts[seq.seq_id]
                tokens.append(token)
                dists.append(probs)
                last[seq.seq_id] = token
        return [Draft(t, stack_probs(d)) for t, d in (drafts[s.seq_id] for s in seqs)]
