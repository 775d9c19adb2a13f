"""Lookahead (Ant Group's trie-based retrieval): draft a tree of continuations, not one chain.

Every sequence keeps a trie of the n-grams of its prompt and output (each window of up to
``ngram_max + depth`` tokens, with how often and how recently it occurred), extended as tokens
arrive. To draft, the trie is entered with the sequence's last ``ngram_max`` tokens (down to
``ngram_min`` when that was never seen; every length that matches contributes, longer matches
first) and its most frequent continuations are taken best-first until ``k`` nodes: several
branches, each at most ``depth`` deep. The verifier checks them all in one forward pass
under a tree attention mask (heron.speculative.verify, the runner's tree spans), so where the
text could go on in several remembered ways, one of them is usually right. Finished requests'
outputs feed a shared trie too (bounded), so repeated answers across requests are drafted as
well.

Where verification is cheap (small batches: a forward pass of 1 or 20 rows costs about the
same on a CPU or GPU), a wide tree buys a longer accepted length than a single chain for free.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from heron.engine.sequence import Sequence
from heron.errors import InvalidRequestError
from heron.layers.kivi import KIVI_BITS
from heron.speculative.ngram import check_ngram_range
from heron.speculative.proposer import PROPOSERS, Draft, Proposer

if TYPE_CHECKING:
    from heron.engine.plugin import EngineParts

_SHARED_MAX_NODES = 500_000  # the shared trie starts over past this many nodes


class _Node:
    __slots__ = ("children", "count", "last")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.count = 0  # how many windows passed through this node
        self.last = 0  # when the latest of them was added (larger = more recent)


class NgramTrie:
    """The n-grams (up to ``width`` tokens) of a token stream that grows at its end."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.root = _Node()
        self.num_nodes = 0
        self.num_tokens = 0  # tokens of the stream added so far
        self._open: list[tuple[_Node, int]] = []  # windows still growing: (end node, length)

    def extend(self, tokens: list[int]) -> None:
        """Add the stream's next tokens: each extends the growing windows and starts one."""
        for token in tokens:
            self.num_tokens += 1
            grown = []
            for node, length in [*self._open, (self.root, 0)]:
                child = node.children.get(token)
                if child is None:
                    child = node.children[token] = _Node()
                    self.num_nodes += 1
                child.count += 1
                child.last = self.num_tokens
                if length + 1 < self.width:
                    grown.append((child, length + 1))
            self._open = grown

    def add_sequence(self, tokens: list[int]) -> None:
        """Add a whole, separate stream (windows do not cross from the previous one)."""
        self._open = []
        self.extend(tokens)
        self._open = []

    def find(self, context: list[int]) -> _Node | None:
        node = self.root
        for token in context:
            node = node.children.get(token)
            if node is None:
                return None
        return node


@PROPOSERS.register("lookahead")
@dataclass(eq=False)
class LookaheadProposer(Proposer):
    default_num_tokens = 16  # the nodes of its draft tree
    ngram_min: int = 1  # shortest context matched
    ngram_max: int = 3  # longest context matched
    depth: int = 8  # the longest branch of the draft tree

    def __post_init__(self) -> None:
        check_ngram_range(self.ngram_min, self.ngram_max)
        PROPOSERS.check_int("depth", self.depth, 1)
        self.tries: dict[int, NgramTrie] = {}  # seq_id -> its prompt + output
        self.shared = NgramTrie(self.ngram_max + self.depth)  # earlier requests' outputs
        self._seqs: dict[int, Sequence] = {}  # seq_id -> sequence, whose output feeds ``shared``

    def start(self, parts: EngineParts) -> None:
        dtype = parts.config.kv_cache_dtype
        if dtype in KIVI_BITS:
            raise InvalidRequestError(
                f"kv_cache_dtype: {dtype} (KIVI) cannot hold lookahead's draft trees, whose "
                "accepted branch is moved in the cache; use auto or int8",
                param="kv_cache_dtype",
            )

    def propose(self, seq: Sequence, k: int) -> Draft:
        trie = self.tries.get(seq.seq_id)
        if trie is None:
            trie = self.tries[seq.seq_id] = NgramTrie(self.ngram_max + self.depth)
        tokens = seq.token_ids
        trie.extend(tokens[trie.num_tokens :])
        self._seqs[seq.seq_id] = seq
        roots = []
        for trie_ in (trie, self.shared):
            for n in range(min(self.ngram_max, len(tokens)), self.ngram_min - 1, -1):
                node = trie_.find(tokens[len(tokens) - n :])
                if node is not None and node.children:
                    roots.append((n, node))
        drafts, parents = best_first_tree(roots, k, self.depth)
        return Draft(drafts, parents=parents)

    def retain(self, seq_ids: set[int]) -> None:
        for sid in [s for s in self.tries if s not in seq_ids]:
            del self.tries[sid]  # preempted: rebuilt from its tokens when it returns

    def forget(self) -> None:
        self.shared = NgramTrie(self.shared.width)

    def release(self, seq_id: int) -> None:
        self.tries.pop(seq_id, None)
        seq = self._seqs.pop(seq_id, None)
        output = seq.output_token_ids if seq is not None else []
        if output:
            if self.shared.num_nodes > _SHARED_MAX_NODES:
                self.shared = NgramTrie(self.shared.width)
            self.shared.add_sequence(output)


def best_first_tree(
    roots: list[tuple[int, _Node]], k: int, depth: int
) -> tuple[list[int], list[int]]:
    """Up to ``k`` draft tokens with their parents (parents first): the continuations below
    ``roots`` (trie nodes reached by matching ``n`` context tokens), the longest match first,
    then the most frequent, then the most recent. A path reached from several roots is one
    branch of the tree."""
    tokens: list[int] = []
    parents: list[int] = []
    kids: dict[tuple[int, int], int] = {}  # (draft parent, token) -> draft index
    order = itertools.count()  # ties: first pushed first
    heap: list[tuple[tuple[int, int, int], int, _Node, int, int, int]] = []

    def push(n: int, node: _Node, parent: int, level: int) -> None:
        for token, child in node.children.items():
            key = (-n, -child.count, -child.last)
            heapq.heappush(heap, (key, next(order), child, token, parent, level))

    for n, node in roots:
        push(n, node, -1, 1)
    while heap and len(tokens) < k:
        (neg_n, _, _), _, node, token, parent, level = heapq.heappop(heap)
        index = kids.get((parent, token))
        if index is None:
            index = kids[(parent, token)] = len(tokens)
            tokens.append(token)
            parents.append(parent)
        if level < depth:
            push(-neg_n, node, index, level + 1)
    return tokens, parents
