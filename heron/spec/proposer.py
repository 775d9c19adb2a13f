"""The proposer interface: draft up to k next tokens for a sequence.

Lookup proposers (n-gram, trie) only read the sequence's tokens; model proposers (layer skip,
draft model) run a network and also return the draft distribution ``probs`` each token was
drawn from, which the verifier needs for the lossless acceptance rule. A proposer that returns
no probabilities proposed deterministically (q is one-hot on the drafted token)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from heron.engine.sequence import Sequence


@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None = None  # [len(tokens), V] draft distributions, or None


class Proposer(ABC):
    name: str

    @abstractmethod
    def propose(self, seq: Sequence, k: int) -> Draft:
        """Up to ``k`` tokens that may follow ``seq.token_ids`` (fewer, or none, is fine)."""

    def propose_batch(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        """Drafts for several sequences; model proposers override this to batch their work."""
        return [self.propose(s, k) for s, k in zip(seqs, ks, strict=True)]
