"""Self-speculative decoding (Draft & Verify, LayerSkip): the target model with some of its
layers skipped is the draft. No second model and no second cache: the draft reuses the
target's K/V of the context, writes its own K/V for the drafted positions into the same
slots, and the verify pass overwrites them with the full model's.

Which layers to keep: ``draft_num_layers`` of them spread evenly over depth (first and last
always kept), the "balanced across depth" choice; the default keeps 5/6 of them. Small models
suffer from skipping: on SmolLM2-135M, 22 of 30 layers agree with the full model's next token
almost never and 25 of 30 about half the time (measured teacher-forced on a paragraph), so
there this proposer is a correctness feature more than a speed-up; a one-shot calibration
(drop the individually least harmful layers) did no better than the even spread at 25."""

from __future__ import annotations

import logging

from heron.engine.block_manager import BlockManager
from heron.engine.runner import ModelRunner
from heron.engine.sequence import Sequence
from heron.errors import InvalidRequestError
from heron.speculative.proposer import Draft, Proposer, draw_draft_token, stack_probs

logger = logging.getLogger(__name__)


def default_kept_layers(num_layers: int) -> int:
    """How many layers a layer-skipped model keeps unless told: 5/6 of them."""
    return max(1, num_layers * 5 // 6)


def spread_layers(num_layers: int, keep: int) -> list[int]:
    """``keep`` layer indices evenly spaced over ``num_layers``, first and last included."""
    if not 1 <= keep <= num_layers:
        raise InvalidRequestError(
            f"draft_num_layers: must be in [1, {num_layers}], got {keep}", "draft_num_layers"
        )
    if keep == 1:
        return [0]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


class LayerSkipProposer(Proposer):
    name = "layer_skip"

    def __init__(self, runner: ModelRunner, block_manager: BlockManager, keep: int) -> None:
        self.runner = runner
        self.bm = block_manager
        self.layers = spread_layers(len(runner.model.layers), keep)
        logger.info("layer_skip draft: %d of %d layers", len(self.layers), len(runner.model.layers))

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
