"""Context-aware decoding (CAD, Shi et al. 2023) inside the batched engine.

A CAD request runs as a pair of sequences: the request's own (context + question) and a
context-free companion (the same prompt with the context text removed), each with its own
KV blocks, scheduled like any other sequence. Each step a sequence of a pair that reaches a
new position hands its logits here; once both halves have them, one token is drawn from
(1 + alpha) * logits(with context) - alpha * logits(without) with the request's sampling
settings, appended to both, and the pair goes on. A half that gets ahead (its prompt was
shorter, or the other was preempted) simply waits, holding no work in the scheduler, so the
pair stays in lockstep whatever the batch, the chunking or the preemptions do."""

from __future__ import annotations

import torch

from heron.engine.sequence import Sequence
from heron.errors import InvalidRequestError
from heron.tokenizer import Tokenizer


def context_free_prompt(tokenizer: Tokenizer, prompt_ids: list[int], context: str) -> list[int]:
    """The prompt with the first occurrence of ``context`` removed from its text (special
    tokens kept, so a chat-templated prompt stays well formed)."""
    text = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    if context not in text:
        raise InvalidRequestError(
            "cad_context: the context text does not occur in the prompt; pass the exact "
            "text of the context the prompt contains",
            param="cad_context",
        )
    ids = tokenizer.hf.encode(text.replace(context, "", 1), add_special_tokens=False)
    if not ids:
        raise InvalidRequestError(
            "cad_context: the prompt without its context is empty; the question must follow "
            "the context in the prompt",
            param="cad_context",
        )
    return ids


def contrast_logits(
    with_context: torch.Tensor, without: torch.Tensor, alpha: float
) -> torch.Tensor:
    return (1 + alpha) * with_context - alpha * without


def pair_rows(seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
    """Take this step's rows of paired sequences out of (``seqs``, ``logits``) and hold them;
    add one combined row, under the request's own sequence, for every pair now complete."""
    keep: list[int] = []
    ready: list[Sequence] = []
    for row, seq in enumerate(seqs):
        if seq.contrast is None and seq.contrast_of is None:
            keep.append(row)
            continue
        seq.pending_logits = logits[row].clone()
        main = seq.contrast_of or seq
        if (
            main.pending_logits is not None
            and main.contrast.pending_logits is not None
            and main not in ready
        ):
            ready.append(main)
    if not ready:
        return seqs, logits
    combined = []
    for main in ready:
        alpha = main.request.params.cad_alpha
        combined.append(contrast_logits(main.pending_logits, main.contrast.pending_logits, alpha))
        main.pending_logits = main.contrast.pending_logits = None
    return [seqs[i] for i in keep] + ready, torch.cat([logits[keep], torch.stack(combined)])


def follow(seq: Sequence, token: int) -> None:
    """The token drawn for a CAD request also extends its context-free companion."""
    if seq.contrast is not None and not seq.is_finished:
        seq.contrast.token_ids.append(token)
