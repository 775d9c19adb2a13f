"""The verifier: which drafted tokens the target keeps, given its logits at every drafted
position (row i predicts the token after draft i-1; row 0 follows the last real token).

Greedy keeps the longest prefix of drafts equal to the target's argmax, then adds the
target's own token at the first mismatch (or after the last draft): exactly greedy decoding.
Sampling uses speculative sampling's rule (Leviathan et al.; Chen et al.): keep draft d with
probability min(1, p(d) / q(d)); at the first rejection draw from the normalised residual
max(p - q, 0); if all are kept draw a bonus token from the last row. Every emitted token is
then distributed exactly as the target's p, whatever the draft did."""

from __future__ import annotations

import torch

from heron.engine.sampler import draw


def accept_greedy(target_logits: torch.Tensor, drafts: list[int]) -> list[int]:
    """target_logits: [len(drafts) + 1, V]. Returns the accepted drafts plus one token."""
    best = target_logits.argmax(dim=-1).tolist()
    out = []
    for i, d in enumerate(drafts):
        if d != best[i]:
            break
        out.append(d)
    out.append(best[len(out)])
    return out


def accept_sampled(
    target_probs: torch.Tensor,
    drafts: list[int],
    draft_probs: torch.Tensor | None,
    generator: torch.Generator,
) -> list[int]:
    """target_probs: [len(drafts) + 1, V] (after temperature/top-k/top-p/min-p); draft_probs:
    [len(drafts), V], or None for a deterministic proposer (q one-hot on each draft)."""
    out = []
    uniforms = torch.rand(len(drafts), generator=generator, device=target_probs.device)
    for i, d in enumerate(drafts):
        p = target_probs[i]
        q_d = 1.0 if draft_probs is None else float(draft_probs[i, d])
        if q_d > 0 and float(uniforms[i]) * q_d < float(p[d]):
            out.append(d)
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[d] = 0.0
        else:
            residual = (p - draft_probs[i]).clamp_min(0.0)
        total = residual.sum()
        # p == q exactly leaves no residual mass; then any draw from p is correct.
        residual = residual / total if total > 0 else p
        out.append(int(draw(residual, generator)))
        return out
    out.append(int(draw(target_probs[len(drafts)], generator)))
    return out
