"""Sampler: penalties, temperature, top-k / top-p / min-p, then one draw per sequence from
that sequence's own generator, so a seeded request samples the same tokens whatever else
shares its batch. Logprobs are those of the raw model distribution (before any processing).
A row whose logits are not finite draws nothing (None): only its sequence fails."""

from __future__ import annotations

import torch

from heron.config import SamplingParams
from heron.engine.sequence import Sequence
from heron.outputs import Logprob, PositionLogprobs


class Sampler:
    def __init__(self, eos_token_ids: list[int]) -> None:
        self.eos_token_ids = eos_token_ids

    @torch.inference_mode()
    def sample(
        self, logits: torch.Tensor, seqs: list[Sequence]
    ) -> list[tuple[int, PositionLogprobs | None] | None]:
        """logits: [N, V] float32, row i for seqs[i]. Returns (token, logprobs) per sequence,
        or None where the row is not finite (from the model, or after the penalties and the
        temperature): its draw would be garbage, e.g. token 0 from NaN probabilities."""
        params = [s.request.params for s in seqs]
        want_logprobs = [p.logprobs is not None for p in params]
        raw = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        x = logits
        for i, (seq, p) in enumerate(zip(seqs, params, strict=True)):
            banned = len(seq.output_token_ids) < p.min_tokens
            if not (banned or _penalised(p)):
                continue
            if x is logits:  # copied once, and only when some row is changed
                x = logits.clone()
            apply_penalties(x[i], seq, p)
            if banned:
                x[i, p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)] = float(
                    "-inf"
                )

        finite = finite_rows(x)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        rand = [i for i, p in enumerate(params) if not p.greedy]
        # max(...).indices is argmax (the first maximum) at a third of its cost on CPU.
        if not rand:
            tokens = x.max(dim=-1).indices
        else:
            tokens = torch.empty(len(seqs), dtype=torch.long, device=x.device)
        if greedy and rand:
            tokens[greedy] = x[greedy].max(dim=-1).indices
        if rand:
            probs = filtered_probs(x[rand], [params[i] for i in rand])
            finite[rand] &= finite_rows(probs)  # logits / temperature may overflow
            for j, i in enumerate(rand):
                tokens[i] = draw(probs[j], seqs[i].generator)

        out: list[tuple[int, PositionLogprobs | None] | None] = []
        for i, (tok, ok) in enumerate(zip(tokens.tolist(), finite.tolist(), strict=True)):
            lp = top_logprobs(raw[i], tok, params[i].logprobs) if want_logprobs[i] else None
            out.append((tok, lp) if ok else None)
        return out


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """[N] bool: rows with no NaN, no +inf and some token above -inf (-inf alone is a mask).
    One reduction: max propagates NaN."""
    return torch.isfinite(x.amax(dim=-1))


def _penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)


def apply_penalties(row: torch.Tensor, seq: Sequence, p: SamplingParams) -> None:
    """Repetition penalty (prompt and output, HF/vLLM style); presence and frequency
    penalties (output only, OpenAI style). In place on one row of logits."""
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=row.device)
        v = row[seen]
        row[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    out = seq.output_token_ids
    if out and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(torch.tensor(out, device=row.device), minlength=row.shape[0]).to(
            row.dtype
        )[: row.shape[0]]
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def filtered_probs(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks, row-wise. Returns probabilities."""
    dev = x.device
    temp = torch.tensor([p.temperature for p in params], device=dev, dtype=x.dtype)
    x = x / temp[:, None]
    vocab = x.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p for p in params]
    if any(k < vocab for k in top_k) or any(tp < 1.0 for tp in top_p):
        sorted_x, order = x.sort(dim=-1, descending=True)
        k = torch.tensor(top_k, device=dev)
        ranks = torch.arange(vocab, device=dev)[None, :]
        drop = ranks >= k[:, None]
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        sp = sorted_x.softmax(dim=-1)
        before = sp.cumsum(dim=-1) - sp  # probability mass ranked above each token
        tp = torch.tensor(top_p, device=dev, dtype=sp.dtype)
        drop |= (before >= tp[:, None]) & (ranks > 0)
        x = torch.full_like(x, float("-inf")).scatter(
            -1, order, sorted_x.masked_fill(drop, float("-inf"))
        )
    probs = x.softmax(dim=-1)
    min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=probs.dtype)
    if bool((min_p > 0).any()):
        keep = probs >= min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One sample from ``probs`` via the exponential race: argmax p_i / E_i, E_i ~ Exp(1)."""
    e = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / e).argmax()


def top_logprobs(raw: torch.Tensor, token: int, k: int) -> PositionLogprobs:
    """The chosen token's logprob and rank, plus the k most likely tokens."""
    chosen = raw[token].item()
    result = {token: Logprob(chosen, int((raw > chosen).sum().item()) + 1)}
    if k:
        values, ids = raw.topk(k)
        for rank, (tid, v) in enumerate(zip(ids.tolist(), values.tolist(), strict=True), 1):
            result.setdefault(tid, Logprob(v, rank))
    return result
