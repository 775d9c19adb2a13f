"""Context-aware decoding (Shi et al., 2023): amplify what the context says over what the
model believes without it. The prompt also runs without ``context`` in lockstep, and each
token is drawn from (1 + alpha) * logits(with context) - alpha * logits(without); alpha = 0
is plain decoding. Use it when the context should override the model's prior (a document
that contradicts what the model memorised).

``ContextAware`` carries the options (a request's ``SamplingParams.token_strategy``);
``ContextAwareDecoding`` is the engine's half. A CAD request runs as a
pair of sequences: the request's own (context + question) and a context-free companion (the
same prompt with the context text removed), each with its own KV blocks, scheduled like any
other sequence. Each step a sequence of a pair that reaches a new position hands its logits
over; once both halves have them, one token is drawn from the contrast with the request's
sampling settings, appended to both, and the pair goes on. A half that gets ahead (its prompt
was shorter, or the other was preempted) simply waits, holding no work in the scheduler, so
the pair stays in lockstep whatever the batch, the chunking or the preemptions do."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from heron.config import SamplingParams
from heron.engine.plugin import EngineParts, EnginePlugin, register_plugin
from heron.engine.sequence import Request, Sequence
from heron.errors import InvalidRequestError
from heron.registry import is_number
from heron.strategies.base import STRATEGIES, TokenStrategy, check_option
from heron.tokenizer import Tokenizer


@STRATEGIES.register("cad")
@dataclass
class ContextAware(TokenStrategy):
    """``context``: the exact text of the context inside the prompt (required);
    ``alpha``: how strongly the context-free prediction is subtracted."""

    context: str | None = None
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option(
            isinstance(self.context, str) and self.context != "",
            "context",
            "the text of the context inside the prompt is required (the part to leave out "
            "of the context-free run)",
        )
        check_option(
            is_number(self.alpha) and 0 <= self.alpha < math.inf,
            "alpha",
            f"a finite number >= 0; got {self.alpha!r}",
        )


def context_free_prompt(tokenizer: Tokenizer, prompt_ids: list[int], context: str) -> list[int]:
    """The prompt with the first occurrence of ``context`` removed from its text (special
    tokens kept, so a chat-templated prompt stays well formed)."""
    text = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    check_option(
        context in text,
        "context",
        "the context text does not occur in the prompt; pass the exact text of the context "
        "the prompt contains",
    )
    ids = tokenizer.hf.encode(text.replace(context, "", 1), add_special_tokens=False)
    check_option(
        bool(ids),
        "context",
        "the prompt without its context is empty; the question must follow the context in "
        "the prompt",
    )
    return ids


def contrast_logits(
    with_context: torch.Tensor, without: torch.Tensor, alpha: float
) -> torch.Tensor:
    return (1 + alpha) * with_context - alpha * without


@register_plugin
class ContextAwareDecoding(EnginePlugin):
    """The engine's half of CAD: the companions, and the pairing of their logits."""

    name = "context_aware"

    def __init__(self, parts: EngineParts) -> None:
        super().__init__(parts)
        self.companion: dict[int, Sequence] = {}  # request's sequence -> its companion
        self.main: dict[int, Sequence] = {}  # companion -> the request's sequence
        self.pending: dict[int, torch.Tensor] = {}  # a half's logits, until the other's come

    def add_request(self, req: Request, seq: Sequence) -> list[Sequence]:
        """The context-free companion: the request's prompt without its context, as a
        sequence of an internal request (never reported) that follows the request's
        tokens."""
        cad = req.params.token_strategy
        if not isinstance(cad, ContextAware):
            return []
        if self.parts.multi_token_steps:
            raise InvalidRequestError(
                "strategy: context-aware decoding cannot be combined with speculative "
                "decoding (the engine runs with a speculative method)",
                param="strategy",
            )
        ids = context_free_prompt(self.parts.tokenizer, req.prompt_token_ids, cad.context)
        inner = Request(f"{req.request_id}#without-context", None, ids, SamplingParams())
        companion = self.parts.new_sequence(inner, 0, list(ids))
        self.companion[seq.seq_id], self.main[companion.seq_id] = companion, seq
        req.metrics["cad_context_free_prompt_tokens"] = len(ids)
        return [companion]

    def before_sampling(
        self, seqs: list[Sequence], logits: torch.Tensor
    ) -> tuple[list[Sequence], torch.Tensor]:
        """Take this step's rows of paired sequences out of (``seqs``, ``logits``) and hold
        them; add one combined row, under the request's own sequence, for every pair now
        complete."""
        keep: list[int] = []
        ready: list[Sequence] = []
        for row, seq in enumerate(seqs):
            main = self.main.get(seq.seq_id, seq)
            if main.seq_id not in self.companion:
                keep.append(row)
                continue
            self.pending[seq.seq_id] = logits[row].clone()
            both = (main.seq_id, self.companion[main.seq_id].seq_id)
            if all(i in self.pending for i in both) and main not in ready:
                ready.append(main)
        if not ready:
            return seqs, logits
        combined = []
        for main in ready:
            with_context = self.pending.pop(main.seq_id)
            without = self.pending.pop(self.companion[main.seq_id].seq_id)
            alpha = float(main.request.params.token_strategy.alpha)
            combined.append(contrast_logits(with_context, without, alpha))
        return [seqs[i] for i in keep] + ready, torch.cat([logits[keep], torch.stack(combined)])

    def token_sampled(self, seq: Sequence, token: int, logits: torch.Tensor) -> None:
        """The token drawn for a CAD request also extends its context-free companion."""
        companion = self.companion.get(seq.seq_id)
        if companion is not None:
            companion.token_ids.append(token)

    def finished(self, seq: Sequence) -> None:
        companion = self.companion.pop(seq.seq_id, None)
        if companion is None:
            return
        del self.main[companion.seq_id]
        self.pending.pop(seq.seq_id, None)
        self.pending.pop(companion.seq_id, None)
        if not companion.is_finished:
            self.parts.scheduler.finish(companion)
