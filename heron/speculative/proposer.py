"""The proposer interface: draft up to k next tokens for a sequence.

Lookup proposers (n-gram, trie) only read the sequence's tokens; model proposers (layer skip,
draft model) run a network and also return the draft distribution ``probs`` each token was
drawn from, which the verifier needs for the lossless acceptance rule. A proposer that returns
no probabilities proposed deterministically (q is one-hot on the drafted token). A draft is a
chain, or a tree (``parents``, parents before children) whose branches are verified together
in one pass under a tree attention mask (heron.speculative.verify).

A proposer is a dataclass of its options (``PROPOSERS.make(name, options)``); what it needs of
the engine it drafts for (the runner, the block manager, the tokenizer) it takes in
``start``, once the engine is built."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from heron.engine.sampler import draw, filtered_probs
from heron.engine.sequence import Sequence
from heron.registry import Registry

if TYPE_CHECKING:
    from heron.engine.plugin import EngineParts

# Proposers by name, as ``EngineConfig.speculative_method``/``speculative_options`` and the
# CLI/server flags name them.
PROPOSERS: Registry[Proposer] = Registry(
    "speculative_method", "heron.speculative", "speculative_options"
)


@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None = None  # [len(tokens), V] draft distributions, or None
    # parents[i]: the draft token i follows (-1: the last real token); None: a chain. Trees
    # are deterministic (no ``probs``).
    parents: list[int] | None = None


@dataclass(eq=False)
class Proposer(ABC):
    name: ClassVar[str]
    # The most drafts per step unless EngineConfig.num_speculative_tokens says otherwise.
    default_num_tokens: ClassVar[int] = 4

    def start(self, parts: EngineParts) -> None:
        """The engine this proposer drafts for is built: take what it needs of it, and
        refuse (``InvalidRequestError``) what it cannot work with."""
        return None

    @abstractmethod
    def propose(self, seq: Sequence, k: int) -> Draft:
        """Up to ``k`` tokens that may follow ``seq.token_ids`` (fewer, or none, is fine)."""

    def propose_batch(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        """Drafts for several sequences; model proposers override this to batch their work."""
        return [self.propose(s, k) for s, k in zip(seqs, ks, strict=True)]

    # Proposers with per-sequence state (a draft model's cache) free it in these two.
    def release(self, seq_id: int) -> None:
        """The sequence finished or was aborted."""
        return None

    def retain(self, seq_ids: set[int]) -> None:
        """Called each step with the running sequences (the others may have been preempted)."""
        return None

    def forget(self) -> None:
        """Drop what was learnt from earlier requests (benchmarks start each run clean)."""
        return None


def draw_draft_token(logits: torch.Tensor, seq: Sequence) -> tuple[int, torch.Tensor | None]:
    """A model proposer's next draft token from its logits row [V]: the argmax for greedy
    requests (q one-hot, no probabilities), else a draw from the request's filtered
    distribution, which is returned as q for the verifier."""
    params = seq.request.params
    if params.greedy:
        return int(logits.argmax()), None
    probs = filtered_probs(logits[None], [params])[0]
    return int(draw(probs, seq.generator)), probs


def stack_probs(dists: list[torch.Tensor | None]) -> torch.Tensor | None:
    return torch.stack(dists) if dists and dists[0] is not None else None
