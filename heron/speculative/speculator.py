"""Speculative decoding's engine plugin (heron.engine.plugin): draft before scheduling, settle
after the target's forward pass.

Eligible sequences are running decodes whose sampling does not depend on the tokens drafted
before it in the same step: no repetition/presence/frequency penalties and ``min_tokens``
already reached (those fall back to one token per step, still batched with the rest).

Drafting is priced, not guessed: ``StepCost`` fits the target's step time as a + b * rows from
the steps it sees, so a drafted row costs b / (a + b * rows) of a step and, for a batch of B
decoding sequences, pays for itself when it brings more than B * b / (a + b * rows) accepted
tokens. Each sequence's adaptive k keeps its accepted-per-drafted rate against that price: it
grows while drafts pay twice over, halves when they do not pay, and speculation pauses for a
while when even one draft does not. On top, a step's drafts together may add at most a
quarter to its time (``_DRAFT_SHARE``), given first to the sequences whose drafts are
accepted most; where even one row is priced above that, one draft row every
``_PAUSE_STEPS`` steps keeps the price measured. On a CPU at batch 1 a verify row costs a
small share of a step (the weights are read once for all rows), so a wide draft tree stays
on; at larger batches, and with int4 weights (a cheap memory-bound step where each extra row
adds its integer products and its attention), a row costs more, so drafts get narrower.
Step times are measured, so which drafts are tried can differ between runs: outputs are still
exactly the target's (greedy) or distributed as the target's (sampling), but a seeded sampled
request repeats only in distribution, not token for token."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from heron.config import EngineConfig
from heron.engine.plugin import EngineParts, EnginePlugin, register_plugin
from heron.engine.sampler import filtered_probs, top_logprobs
from heron.engine.scheduler import ScheduledBatch
from heron.engine.sequence import Request, Sequence
from heron.outputs import PositionLogprobs
from heron.speculative.registry import build_proposer
from heron.speculative.verify import accept_sampled, accept_tree

_EMA = 0.3  # weight of the latest step in the acceptance-rate average
# Drafts may add at most this share to a step's time: the sequences whose drafts are accepted
# most get the rows first. Past the knee of the cost curve (where the products turn
# compute-bound) a step of many sequences slows every one of them, drafted or not.
_DRAFT_SHARE = 0.25
_PAUSE_STEPS = 16


class StepCost:
    """Least-squares fit of step seconds = a + b * rows over recent steps (each step's weight
    decays by ``decay`` per later step)."""

    def __init__(self, decay: float = 0.98) -> None:
        self.decay = decay
        self.sums = [0.0] * 5  # weight, x, x^2, y, x*y

    def observe(self, rows: int, seconds: float) -> None:
        w = self.decay
        new = (1.0, rows, rows * rows, seconds, rows * seconds)
        self.sums = [w * s + v for s, v in zip(self.sums, new, strict=True)]

    def fit(self) -> tuple[float, float] | None:
        """(a, b), or None until two different row counts have been seen."""
        n, sx, sxx, sy, sxy = self.sums
        var = n * sxx - sx * sx
        if n < 2 or var <= 1e-9 * max(1.0, n * sxx):
            return None
        b = max(0.0, (n * sxy - sx * sy) / var)
        return max(1e-9, (sy - b * sx) / n), b

    def row_price(self, decoding: int, rows: int) -> float:
        """Accepted tokens per drafted row below which drafting slows a step of ``decoding``
        sequences and ``rows`` rows down (0 until fitted)."""
        fit = self.fit()
        return 0.0 if fit is None else decoding * fit[1] / (fit[0] + fit[1] * rows)

    def draft_rows(self, rows: int, share: float) -> float:
        """Drafted rows that add at most ``share`` to the time of a step of ``rows`` rows
        (unbounded until fitted, or where rows cost nothing)."""
        fit = self.fit()
        if fit is None or fit[1] == 0:
            return math.inf
        a, b = fit
        return share * (a + b * rows) / b


@dataclass
class AdaptiveK:
    """Per-sequence draft length."""

    k_max: int
    k: int
    rate: float = 1.0  # moving average of accepted / drafted rows
    paused: int = 0  # steps left without speculation

    def next(self) -> int:
        if self.paused:
            self.paused -= 1
            if not self.paused:  # try again, cautiously
                self.k, self.rate = 1, 0.5
            return 0
        return self.k

    def update(self, drafted: int, accepted: int, price: float) -> None:
        """``price``: the accepted tokens per drafted row that drafting needs to pay off."""
        self.rate = (1 - _EMA) * self.rate + _EMA * accepted / drafted
        if self.rate < price:
            if self.k == 1:
                self.paused = _PAUSE_STEPS
            self.k = max(1, self.k // 2)
        elif self.rate >= 2 * price:
            self.k = min(self.k_max, 2 * self.k)


@register_plugin
class Speculator(EnginePlugin):
    """Runs in engines built with a ``speculative_method``; each sequence's adaptive k is
    kept here, by seq_id."""

    name = "speculative"
    multi_token_steps = True

    @classmethod
    def enabled(cls, config: EngineConfig) -> bool:
        return config.speculative_method is not None

    def __init__(self, parts: EngineParts) -> None:
        super().__init__(parts)
        self.proposer = build_proposer(parts)
        self.k_max = parts.config.num_speculative_tokens or self.proposer.default_num_tokens
        self.max_model_len = parts.max_model_len
        self.adaptive: dict[int, AdaptiveK] = {}
        self.num_drafted = 0
        self.num_accepted = 0
        self.num_verify_steps = 0
        self.cost = StepCost()
        self.price = 0.0  # accepted tokens per drafted row that drafting needs (StepCost)
        self.unprobed = 0  # steps since a draft was last allowed while rows seemed too dear

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

    def add_request(self, req: Request, seq: Sequence) -> list[Sequence]:
        req.metrics.update(spec_draft_tokens=0, spec_accepted_tokens=0, spec_acceptance_rate=0.0)
        return []

    def before_schedule(self, running: list[Sequence]) -> None:
        """Set the drafts of the sequences that speculate."""
        self.proposer.retain({seq.seq_id for seq in running})
        wanted: list[tuple[Sequence, int]] = []
        for seq in running:
            seq.set_drafts([])
            if not self.eligible(seq):
                continue
            adaptive = self.adaptive.setdefault(seq.seq_id, AdaptiveK(self.k_max, self.k_max))
            p = seq.request.params
            room = self.max_model_len - seq.num_tokens - 1
            if p.max_tokens is not None:
                room = min(room, p.max_tokens - len(seq.output_token_ids) - 1)
            k = min(adaptive.next(), room)
            if k > 0:
                wanted.append((seq, k))
        budget = self.cost.draft_rows(len(running), _DRAFT_SHARE)
        if wanted and budget < 1:
            # Rows priced above the share: no draft would run, so the fit would only ever see
            # plain steps again and keep a price it got from a few (maybe unlucky) steps.
            # One draft row every _PAUSE_STEPS steps keeps measuring it.
            self.unprobed += 1
            if self.unprobed >= _PAUSE_STEPS:
                budget, self.unprobed = 1, 0
        seqs, ks = [], []
        for seq, k in sorted(wanted, key=lambda item: -self.adaptive[item[0].seq_id].rate):
            k = int(min(k, budget))
            if k > 0:
                seqs.append(seq)
                ks.append(k)
                budget -= k
        for seq, draft in zip(seqs, self.proposer.propose_batch(seqs, ks), strict=True):
            seq.set_drafts(draft.tokens, draft.parents, draft.probs)

    def after_forward(self, batch: ScheduledBatch, seconds: float) -> None:
        self.observe(batch.seqs, batch.num_new_tokens, seconds)

    def observe(self, seqs: list[Sequence], num_new_tokens: list[int], seconds: float) -> None:
        """The target's time for a step: decode-only steps (verify rows included) refine the
        price of a drafted row; prefill chunks are another regime and are left out."""
        work = zip(seqs, num_new_tokens, strict=True)
        if any(n != 1 + len(seq.draft_token_ids) for seq, n in work):
            return
        rows = sum(num_new_tokens)
        self.cost.observe(rows, seconds)
        self.price = self.cost.row_price(len(seqs), rows)

    def settle_drafts(
        self, seq: Sequence, logits: torch.Tensor
    ) -> tuple[list[tuple[int, PositionLogprobs | None]], list[int]]:
        """logits: [1 + drafts, V] of the verify pass. Returns the tokens to append (accepted
        drafts plus one), with logprobs when the request asked for them, and the accepted
        drafts' indices (their K/V sit at the slots after the last real token's, in draft
        order)."""
        drafts, parents = seq.draft_token_ids, seq.draft_parents
        p = seq.request.params
        if p.greedy:
            tokens, path = accept_tree(logits, drafts, parents)
        else:
            probs = filtered_probs(logits, [p] * logits.shape[0])
            if seq.draft_probs is None:
                tokens, path = accept_tree(probs, drafts, parents, seq.generator)
            else:
                tokens = accept_sampled(probs, drafts, seq.draft_probs, seq.generator)
                path = list(range(len(tokens) - 1))
        accepted = len(path)
        self.adaptive[seq.seq_id].update(len(drafts), accepted, self.price)
        m = seq.request.metrics
        m["spec_draft_tokens"] += len(drafts)
        m["spec_accepted_tokens"] += accepted
        m["spec_acceptance_rate"] = m["spec_accepted_tokens"] / m["spec_draft_tokens"]
        self.num_drafted += len(drafts)
        self.num_accepted += accepted
        self.num_verify_steps += 1
        seq.set_drafts([])
        if p.logprobs is None:
            return [(t, None) for t in tokens], path
        rows = [0] + [i + 1 for i in path]  # the rows each emitted token was predicted from
        raw = torch.log_softmax(logits[rows], dim=-1)
        return [(t, top_logprobs(raw[i], t, p.logprobs)) for i, t in enumerate(tokens)], path

    def finished(self, seq: Sequence) -> None:
        self.adaptive.pop(seq.seq_id, None)
        self.proposer.release(seq.seq_id)

    def stats(self) -> dict[str, float]:
        return {
            "spec_draft_tokens": self.num_drafted,
            "spec_accepted_tokens": self.num_accepted,
            "spec_verify_steps": self.num_verify_steps,
        }
