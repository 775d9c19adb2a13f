"""What the engine calls for speculative decoding: draft before scheduling, settle after the
target's forward pass.

Eligible sequences are running decodes whose sampling does not depend on the tokens drafted
before it in the same step: no repetition/presence/frequency penalties and ``min_tokens``
already reached (those fall back to one token per step, still batched with the rest). Each
sequence has its own adaptive k: it grows while every draft is accepted, halves when the
acceptance rate falls, and speculation pauses for a while when even k = 1 is mostly
rejected, so a request whose drafts are useless costs about what it would without them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heron.config import EngineConfig
from heron.engine.sampler import filtered_probs, top_logprobs
from heron.engine.sequence import Sequence
from heron.outputs import PositionLogprobs
from heron.spec.proposer import Proposer
from heron.spec.verify import accept_greedy, accept_sampled

_EMA = 0.3  # weight of the latest step in the acceptance-rate average
_SHRINK_BELOW = 0.35
_PAUSE_BELOW = 0.15
_PAUSE_STEPS = 16


@dataclass
class AdaptiveK:
    """Per-sequence draft length."""

    k_max: int
    k: int
    rate: float = 1.0  # moving average of accepted / drafted
    paused: int = 0  # steps left without speculation

    def next(self) -> int:
        if self.paused:
            self.paused -= 1
            if not self.paused:  # try again, cautiously
                self.k, self.rate = 1, 0.5
            return 0
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        self.rate = (1 - _EMA) * self.rate + _EMA * accepted / drafted
        if accepted == drafted:
            self.k = min(self.k_max, self.k + 1)
        elif self.rate < _PAUSE_BELOW and self.k == 1:
            self.paused = _PAUSE_STEPS
        elif self.rate < _SHRINK_BELOW:
            self.k = max(1, self.k // 2)


class Speculator:
    def __init__(self, config: EngineConfig, proposer: Proposer, max_model_len: int) -> None:
        self.proposer = proposer
        self.k_max = config.num_speculative_tokens
        self.max_model_len = max_model_len
        self.num_drafted = 0
        self.num_accepted = 0
        self.num_verify_steps = 0

    def eligible(self, seq: Sequence) -> bool:
        p = seq.request.params
        return (
            seq.num_uncomputed == 1
            and not seq.in_prompt_phase
            and p.repetition_penalty == 1.0
            and not p.presence_penalty
            and not p.frequency_penalty
            and len(seq.output_token_ids) >= p.min_tokens
        )

    def prepare(self, running: list[Sequence]) -> None:
        """Set ``draft_token_ids`` (and ``draft_probs``) of the sequences that speculate."""
        self.proposer.retain({seq.seq_id for seq in running})
        seqs, ks = [], []
        for seq in running:
            seq.draft_token_ids, seq.draft_probs = [], None
            if not self.eligible(seq):
                continue
            if seq.spec is None:
                seq.spec = AdaptiveK(self.k_max, self.k_max)
            p = seq.request.params
            room = self.max_model_len - seq.num_tokens - 1
            if p.max_tokens is not None:
                room = min(room, p.max_tokens - len(seq.output_token_ids) - 1)
            k = min(seq.spec.next(), room)
            if k > 0:
                seqs.append(seq)
                ks.append(k)
        for seq, draft in zip(seqs, self.proposer.propose_batch(seqs, ks), strict=True):
            seq.draft_token_ids = draft.tokens
            seq.draft_probs = draft.probs if draft.tokens else None

    def settle(
        self, seq: Sequence, logits: torch.Tensor
    ) -> list[tuple[int, PositionLogprobs | None]]:
        """logits: [1 + drafts, V] of the verify pass. Returns the tokens to append (accepted
        drafts plus one), with logprobs when the request asked for them."""
        drafts = seq.draft_token_ids
        p = seq.request.params
        if p.greedy:
            tokens = accept_greedy(logits, drafts)
        else:
            probs = filtered_probs(logits, [p] * logits.shape[0])
            tokens = accept_sampled(probs, drafts, seq.draft_probs, seq.generator)
        accepted = len(tokens) - 1
        seq.spec.update(len(drafts), accepted)
        seq.num_draft_tokens += len(drafts)
        seq.num_accepted_tokens += accepted
        self.num_drafted += len(drafts)
        self.num_accepted += accepted
        self.num_verify_steps += 1
        seq.draft_token_ids, seq.draft_probs = [], None
        if p.logprobs is None:
            return [(t, None) for t in tokens]
        raw = torch.log_softmax(logits[: len(tokens)], dim=-1)
        return [(t, top_logprobs(raw[i], t, p.logprobs)) for i, t in enumerate(tokens)]

    def stats(self) -> dict[str, float]:
        return {
            "spec_draft_tokens": self.num_drafted,
            "spec_accepted_tokens": self.num_accepted,
            "spec_verify_steps": self.num_verify_steps,
        }
