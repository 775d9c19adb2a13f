"""The verifier: which drafted tokens the target keeps, given its logits at every drafted
position (row 0 follows the last real token; row i + 1 follows draft i).

Drafts form a tree: ``parents[i]`` is the draft that draft i follows (-1: the last real token),
so a chain is ``parents = [-1, 0, 1, ...]`` (None). Deterministic drafts (lookup proposers, and
model proposers under greedy decoding) go through ``accept_tree``: greedy walks down while a
child equals the target's argmax, then adds the target's own token — exactly greedy decoding.
Sampling tries a node's children in order, keeping child c with probability p(c) / (mass p
still has), removing a rejected child's mass, and at the end draws from what is left: every
emitted token is distributed exactly as the target's p (SpecInfer's multi-candidate rule with
one-hot drafts). Drafts drawn from a distribution q (model proposers under sampling) use
``accept_sampled``: keep draft d with probability min(1, p(d) / q(d)); at the first rejection
draw from the normalised residual max(p - q, 0) (Leviathan et al.; Chen et al.)."""

from __future__ import annotations

import torch

from heron.engine.sampler import draw
from heron.engine.sequence import chain_parents


def accept_tree(
    target: torch.Tensor,
    drafts: list[int],
    parents: list[int] | None,
    generator: torch.Generator | None = None,
) -> tuple[list[int], list[int]]:
    """target: [len(drafts) + 1, V], logits (greedy, ``generator`` None) or filtered
    probabilities (sampling). Returns the emitted tokens (the accepted drafts plus one) and the
    accepted drafts' indices, root first."""
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents if parents is not None else chain_parents(len(drafts))):
        children.setdefault(parent, []).append(i)
    greedy = generator is None
    best = target.argmax(dim=-1).tolist() if greedy else None
    tokens: list[int] = []
    path: list[int] = []
    node = -1
    while True:
        row = node + 1
        if greedy:
            token = best[row]
            node = next((c for c in children.get(node, ()) if drafts[c] == token), None)
        else:
            token, node = _sample_children(target[row], drafts, children.get(node, ()), generator)
        tokens.append(token)
        if node is None:
            return tokens, path
        path.append(node)


def _sample_children(
    p: torch.Tensor, drafts: list[int], kids: list[int], generator: torch.Generator
) -> tuple[int, int | None]:
    """One position: the kept child (token, index) or the residual draw (token, None)."""
    residual = p
    for c in kids:
        d = drafts[c]
        mass = float(residual.sum())
        if float(torch.rand((), generator=generator, device=p.device)) * mass < float(residual[d]):
            return d, c
        residual = residual.clone() if residual is p else residual
        residual[d] = 0.0
    total = residual.sum()
    # Drafts covering all of p's mass leave no residual; then any draw from p is correct.
    return int(draw(residual / total if total > 0 else p, generator)), None


def accept_sampled(
    target_probs: torch.Tensor,
    drafts: list[int],
    draft_probs: torch.Tensor,
    generator: torch.Generator,
) -> list[int]:
    """target_probs: [len(drafts) + 1, V] (after temperature/top-k/top-p/min-p); draft_probs:
    [len(drafts), V], the distributions the chain of drafts was drawn from."""
    out = []
    uniforms = torch.rand(len(drafts), generator=generator, device=target_probs.device)
    for i, d in enumerate(drafts):
        p = target_probs[i]
        q_d = float(draft_probs[i, d])
        if q_d > 0 and float(uniforms[i]) * q_d < float(p[d]):
            out.append(d)
            continue
        residual = (p - draft_probs[i]).clamp_min(0.0)
        total = residual.sum()
        # p == q exactly leaves no residual mass; then any draw from p is correct.
        out.append(int(draw(residual / total if total > 0 else p, generator)))
        return out
    out.append(int(draw(target_probs[len(drafts)], generator)))
    return out
