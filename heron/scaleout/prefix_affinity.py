"""PrefixAffinity: which replica has seen which prompt prefixes, to send a request where its
prefix is likely still in the KV cache (as SGLang's cache-aware router does).

A prompt is cut into the engine's KV blocks and each full block named by a chained hash (the
block's tokens and everything before it), as the engines' own prefix caches do. For every
replica the router remembers the hashes of the prompts it sent there, newest last, up to
``max_blocks``; a new request's match on a replica is the number of its leading blocks found
there. It is an estimate (a replica may have evicted those blocks since), which only decides
where to send a request, never what it computes."""

from __future__ import annotations

from collections import OrderedDict


class PrefixAffinity:
    def __init__(self, num_replicas: int, block_size: int, max_blocks: int = 200_000) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks  # per replica
        self.seen: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_replicas)]

    def block_hashes(self, prompt_ids: list[int]) -> list[int]:
        """One chained hash per full block of the prompt."""
        hashes, h = [], 0
        size = self.block_size
        for start in range(0, len(prompt_ids) - size + 1, size):
            h = hash((h, tuple(prompt_ids[start : start + size])))
            hashes.append(h)
        return hashes

    def matched(self, hashes: list[int]) -> list[int]:
        """For each replica, how many leading blocks of the prompt it has seen."""
        counts = []
        for seen in self.seen:
            n = 0
            while n < len(hashes) and hashes[n] in seen:
                n += 1
            counts.append(n)
        return counts

    def record(self, replica: int, hashes: list[int]) -> None:
        seen = self.seen[replica]
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.max_blocks:
            seen.popitem(last=False)
