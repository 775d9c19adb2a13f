"""Paged KV-cache bookkeeping: which block holds which tokens, who shares it, what is cached.

Blocks are ref-counted. A full block is registered under a hash of (parent block's hash, its
token ids), so a later request whose prompt starts with the same tokens reuses it instead of
recomputing it (prefix caching). A freed block keeps its content and registration until the
allocator needs it again (oldest first), so the prefix cache outlives the request that filled
it. Sequences forked from one prompt (``n > 1``) share blocks; the first write into a shared
block copies it (copy-on-write)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from heron.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once full and registered in the prefix cache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: uncached ones first, then cached ones oldest first.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> block id
        # Called with a block's id when its last user lets it go (a KIVI cache then frees the
        # block's full-precision staging row).
        self.on_release: Callable[[int], None] | None = None
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    # ------------------------------------------------------------------ queries
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so the sequence can hold ``num_new_tokens`` more, counting the copy a
        shared partial block needs before it is written."""
        total = seq.num_kv_slots + num_new_tokens
        need = max(0, -(-total // self.block_size) - len(seq.block_table))
        return need + int(self._write_needs_copy(seq))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    # ------------------------------------------------------------------ prefix cache
    def block_hashes(self, seq: Sequence, num_tokens: int) -> list[bytes]:
        """Hashes of the sequence's full blocks within its first ``num_tokens`` tokens."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < num_tokens // bs:
            i = len(hashes)
            h = hashlib.sha256(hashes[-1] if hashes else b"heron")
            h.update(repr(seq.token_ids[i * bs : (i + 1) * bs]).encode())
            hashes.append(h.digest())
        return hashes[: num_tokens // bs]

    def allocate_cached_prefix(self, seq: Sequence) -> int:
        """Give a new sequence the cached blocks of its longest cached prefix; returns tokens.

        At least one token is always left to compute, so the step yields logits to sample."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return 0
        hits: list[int] = []
        for h in self.block_hashes(seq, seq.num_tokens - 1):
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        for block_id in hits:
            self._acquire(block_id)
        seq.block_table.extend(hits)
        seq.num_registered_blocks = len(hits)
        num_hit = len(hits) * self.block_size
        self.prefix_queries += seq.num_prompt_tokens
        self.prefix_hits += min(num_hit, seq.num_prompt_tokens)
        return num_hit

    def register_full_blocks(self, seq: Sequence) -> None:
        """Put the sequence's newly completed blocks into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        hashes = self.block_hashes(seq, seq.num_computed_tokens)
        for i in range(seq.num_registered_blocks, len(hashes)):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and hashes[i] not in self._cached:
                block.hash = hashes[i]
                self._cached[hashes[i]] = block.block_id
        seq.num_registered_blocks = len(hashes)

    # ------------------------------------------------------------------ allocation
    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for ``num_new_tokens``; returns (src, dst) block copies to perform first."""
        copies = []
        if self._write_needs_copy(seq):
            idx = seq.num_kv_slots // self.block_size
            src = seq.block_table[idx]
            dst = self._allocate()
            self._release(src)
            seq.block_table[idx] = dst
            copies.append((src, dst))
        total = seq.num_kv_slots + num_new_tokens
        while len(seq.block_table) * self.block_size < total:
            seq.block_table.append(self._allocate())
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent (copy-on-write on its first write)."""
        for block_id in parent.block_table:
            self._acquire(block_id)
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_evicted = parent.num_evicted
        child.num_registered_blocks = parent.num_registered_blocks

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks past the first ``num_tokens`` tokens (rejected drafts')."""
        keep = -(-num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def compact(self, seq: Sequence, num_slots: int) -> bool:
        """Shrink the sequence to ``num_slots`` slots that it owns alone, about to be rewritten
        by KV compaction: trailing blocks go back, leading blocks shared with a sibling
        (``n > 1``) are swapped for fresh ones (their content is rewritten, so nothing is
        copied). False, changing nothing, when the fresh blocks are not there."""
        keep = -(-num_slots // self.block_size)
        trailing = seq.block_table[keep:]
        freed = sum(self.blocks[b].ref_count == 1 for b in trailing)
        shared = [i for i, b in enumerate(seq.block_table[:keep]) if self.blocks[b].ref_count > 1]
        if len(shared) > self.num_free_blocks + freed:
            return False
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())
        for i in shared:
            old = seq.block_table[i]
            seq.block_table[i] = self._allocate()
            self._release(old)
        return True

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_registered_blocks = 0

    # ------------------------------------------------------------------ internals
    def _write_needs_copy(self, seq: Sequence) -> bool:
        idx = seq.num_kv_slots // self.block_size
        return (
            seq.num_kv_slots % self.block_size != 0
            and idx < len(seq.block_table)
            and self.blocks[seq.block_table[idx]].ref_count > 1
        )

    def _allocate(self) -> int:
        if not self._free:
            raise RuntimeError("out of KV blocks; the scheduler must check can_append first")
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its prefix-cache entry
            del self._cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} freed twice"
        if block.ref_count == 0:
            if self.on_release is not None:
                self.on_release(block_id)
            self._free[block_id] = None
            if block.hash is None:  # nothing worth keeping: reuse it first
                self._free.move_to_end(block_id, last=False)
