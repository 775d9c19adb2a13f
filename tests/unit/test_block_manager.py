"""BlockManager on its own (no model): allocation, ref counts, prefix cache, eviction, fork and
copy-on-write."""

from __future__ import annotations

import itertools

import pytest
import torch

from heron.config import SamplingParams
from heron.engine.block_manager import BlockManager
from heron.engine.sequence import Request, Sequence

_ids = itertools.count()


def make_seq(prompt: list[int]) -> Sequence:
    req = Request(f"r{next(_ids)}", None, list(prompt), SamplingParams())
    seq = Sequence(next(_ids), req, 0, list(prompt), torch.Generator())
    req.seqs.append(seq)
    return seq


def make_child(parent: Sequence, index: int = 1) -> Sequence:
    req = parent.request
    child = Sequence(next(_ids), req, index, list(req.prompt_token_ids), torch.Generator())
    req.seqs.append(child)
    return child


def compute(bm: BlockManager, seq: Sequence, n: int | None = None) -> list[tuple[int, int]]:
    """What the scheduler + engine do for one step: make room, 'compute', register."""
    n = seq.num_uncomputed if n is None else n
    assert bm.can_append(seq, n)
    copies = bm.append_slots(seq, n)
    seq.num_computed_tokens += n
    bm.register_full_blocks(seq)
    return copies


def admit(bm: BlockManager, seq: Sequence) -> int:
    cached = bm.allocate_cached_prefix(seq)
    seq.num_computed_tokens = cached
    return cached


def refs(bm: BlockManager, seq: Sequence) -> list[int]:
    return [bm.blocks[b].ref_count for b in seq.block_table]


# ---------------------------------------------------------------- allocation and free


def test_allocate_and_free_counts_blocks_and_refs():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    assert bm.blocks_needed(seq, 10) == 3  # ceil(10 / 4)
    compute(bm, seq)
    assert len(seq.block_table) == 3
    assert len(set(seq.block_table)) == 3
    assert refs(bm, seq) == [1, 1, 1]
    assert bm.num_free_blocks == 5

    # Two more tokens fit in the partial third block; a third one needs a fourth block.
    seq.token_ids += [10, 11]
    assert bm.blocks_needed(seq, 2) == 0
    compute(bm, seq)
    assert len(seq.block_table) == 3
    seq.token_ids.append(12)
    assert bm.blocks_needed(seq, 1) == 1
    compute(bm, seq)
    assert len(seq.block_table) == 4
    assert bm.num_free_blocks == 4

    table = list(seq.block_table)
    bm.free(seq)
    assert seq.block_table == []
    assert bm.num_free_blocks == 8
    assert all(bm.blocks[b].ref_count == 0 for b in table)


def test_two_sequences_get_distinct_blocks():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a, b = make_seq(list(range(8))), make_seq(list(range(8)))
    compute(bm, a)
    compute(bm, b)
    assert not set(a.block_table) & set(b.block_table)
    assert bm.num_free_blocks == 4


def test_can_append_and_out_of_blocks():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(list(range(8)))
    assert bm.can_append(seq, 8)
    assert not bm.can_append(seq, 9)
    compute(bm, seq)
    seq.token_ids.append(8)
    assert bm.blocks_needed(seq, 1) == 1
    assert not bm.can_append(seq, 1)
    with pytest.raises(RuntimeError):
        bm.append_slots(seq, 1)


# ---------------------------------------------------------------- prefix cache


def test_prefix_cache_hit_shares_full_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(list(range(10)))  # 2 full blocks + 2 tokens
    assert admit(bm, a) == 0
    compute(bm, a)

    b = make_seq(list(range(8)) + [100, 101, 102])  # same first 2 blocks, different tail
    free_before = bm.num_free_blocks
    assert admit(bm, b) == 8
    assert b.block_table == a.block_table[:2]
    assert refs(bm, a) == [2, 2, 1]
    assert bm.num_free_blocks == free_before  # hits take no new block
    compute(bm, b)  # only the 3 uncached tokens
    assert b.num_computed_tokens == 11
    assert b.block_table[2] not in a.block_table
    assert bm.prefix_hits == 8
    assert bm.prefix_queries == 10 + 11


def test_prefix_cache_disabled_gives_no_hits():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    a = make_seq(list(range(10)))
    admit(bm, a)
    compute(bm, a)
    b = make_seq(list(range(10)))
    assert admit(bm, b) == 0
    assert b.block_table == []


def test_prefix_cache_always_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(list(range(8)))  # exactly two full blocks
    admit(bm, a)
    compute(bm, a)
    assert bm.blocks[a.block_table[1]].hash is not None  # both blocks are cached

    same = make_seq(list(range(8)))
    cached = admit(bm, same)
    assert cached == 4  # not 8: the last token must be computed to get logits
    assert same.num_uncomputed >= 1
    assert same.block_table == a.block_table[:1]


def test_prefix_cache_outlives_the_request():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(list(range(9)))
    admit(bm, a)
    compute(bm, a)
    full = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 4

    b = make_seq(list(range(9)))
    assert admit(bm, b) == 8
    assert b.block_table == full
    assert bm.num_free_blocks == 2  # the two reused blocks left the free list
    assert refs(bm, b) == [1, 1]


def test_partial_blocks_are_not_cached():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(7)))
    admit(bm, a)
    compute(bm, a)
    assert bm.blocks[a.block_table[0]].hash is not None
    assert bm.blocks[a.block_table[1]].hash is None


def test_eviction_reuses_uncached_blocks_first_then_oldest_cached():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq([1, 2, 3, 4, 5])  # one full (cached) block + one partial
    admit(bm, a)
    compute(bm, a)
    a_cached = a.block_table[0]
    bm.free(a)
    b = make_seq([11, 12, 13, 14, 15])
    admit(bm, b)
    compute(bm, b)
    b_cached = b.block_table[0]
    bm.free(b)  # freed after a: a's cached block is the oldest
    assert bm.num_free_blocks == 4
    assert a_cached != b_cached

    c = make_seq(list(range(21, 29)))  # two blocks: the uncached free ones suffice
    admit(bm, c)
    compute(bm, c)
    assert a_cached not in c.block_table and b_cached not in c.block_table
    assert bm.blocks[a_cached].hash is not None and bm.blocks[b_cached].hash is not None

    c.token_ids.append(29)  # a third block: must evict a cached one, the oldest
    compute(bm, c)
    assert c.block_table[2] == a_cached
    assert bm.blocks[a_cached].hash is None
    assert bm.num_free_blocks == 1

    assert admit(bm, make_seq([1, 2, 3, 4, 5])) == 0  # a's prefix is gone
    b2 = make_seq([11, 12, 13, 14, 15])
    assert admit(bm, b2) == 4  # b's survived
    assert b2.block_table == [b_cached]


# ---------------------------------------------------------------- fork and copy-on-write


def test_fork_shares_blocks_and_copies_partial_block_on_first_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq(list(range(6)))  # blocks: one full, one partial (2 of 4 slots)
    admit(bm, parent)
    compute(bm, parent)
    full, partial = parent.block_table
    child = make_child(parent)
    free_before = bm.num_free_blocks
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    assert child.num_computed_tokens == parent.num_computed_tokens
    assert refs(bm, parent) == [2, 2]
    assert bm.num_free_blocks == free_before

    # Parent writes first into the shared partial block: it must copy it.
    parent.token_ids.append(50)
    child.token_ids.append(60)
    assert bm.blocks_needed(parent, 1) == 1
    copies = compute(bm, parent)
    assert len(copies) == 1
    src, dst = copies[0]
    assert src == partial and dst not in (full, partial)
    assert parent.block_table == [full, dst]
    assert bm.blocks[partial].ref_count == 1
    assert bm.blocks[dst].ref_count == 1
    assert bm.blocks[full].ref_count == 2  # full blocks stay shared
    assert bm.num_free_blocks == free_before - 1

    # The child is now the partial block's only owner: it writes in place.
    assert bm.blocks_needed(child, 1) == 0
    assert compute(bm, child) == []
    assert child.block_table == [full, partial]

    bm.free(child)
    assert bm.blocks[full].ref_count == 1
    assert bm.blocks[partial].ref_count == 0
    bm.free(parent)
    assert bm.num_free_blocks == 8


def test_fork_three_ways_copies_twice():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq(list(range(5)))
    admit(bm, parent)
    compute(bm, parent)
    kids = [make_child(parent, i) for i in (1, 2)]
    for k in kids:
        bm.fork(parent, k)
    partial = parent.block_table[1]
    assert bm.blocks[partial].ref_count == 3
    copies = []
    for i, s in enumerate([parent, *kids]):
        s.token_ids.append(100 + i)
        copies += compute(bm, s)
    assert [src for src, _ in copies] == [partial, partial]
    assert len({dst for _, dst in copies}) == 2
    assert kids[1].block_table[1] == partial  # the last owner kept the original
    assert bm.blocks[partial].ref_count == 1
    assert bm.blocks[parent.block_table[0]].ref_count == 3


def test_fork_at_block_boundary_needs_no_copy():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq(list(range(8)))
    admit(bm, parent)
    compute(bm, parent)
    child = make_child(parent)
    bm.fork(parent, child)
    parent.token_ids.append(9)
    assert bm.blocks_needed(parent, 1) == 1  # a new block, not a copy
    assert compute(bm, parent) == []
    assert parent.block_table[:2] == child.block_table
    assert len(parent.block_table) == 3


def test_copy_on_write_counts_against_free_blocks():
    bm = BlockManager(num_blocks=2, block_size=4)
    parent = make_seq(list(range(6)))
    admit(bm, parent)
    compute(bm, parent)
    child = make_child(parent)
    bm.fork(parent, child)
    assert bm.num_free_blocks == 0
    parent.token_ids.append(7)
    assert bm.blocks_needed(parent, 1) == 1  # the copy
    assert not bm.can_append(parent, 1)
