"""Scheduler behaviour end to end on the real model: preemption under a tiny KV budget, chunked
prefill, prefix caching, n > 1 with shared prompt blocks, and max_num_seqs."""

from __future__ import annotations

import pytest
import torch

from heron import SamplingParams
from heron.engine.runner import ModelRunner

PROMPTS = [
    "The following is a detailed description of how a steam engine works, written for students:",
    "In the small village at the foot of the mountains, the old baker woke up before dawn and",
    "Here is a list of ten useful tips for learning a new programming language quickly:",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to",
    "The history of the Roman Empire can be divided into several periods, the first of which",
    "To make a simple tomato sauce at home, you will need the following ingredients and tools:",
    "Dear hiring manager, I am writing to apply for the position of software engineer at your",
    "The three laws of motion formulated by Isaac Newton describe the relationship between a body",
]
NEW = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(llm):
    """Greedy token ids of every prompt from the unconstrained session engine."""
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    ids = [o.outputs[0].token_ids for o in outs]
    assert all(len(t) == NEW for t in ids)
    return ids


@pytest.fixture(scope="module")
def small_llm(heron_runner):
    """Tiny step budget (chunked prefill), at most 2 running sequences, no prefix cache."""
    return heron_runner(max_num_batched_tokens=16, max_num_seqs=2, enable_prefix_caching=False)


class Recorder:
    """Wraps an engine's scheduler.schedule to see every batch it makes."""

    def __init__(self, engine, monkeypatch):
        self.engine = engine
        self.batches = []  # [(seq_id, start, n, prompt_len)] per step
        self.copies = []
        self.max_running = 0
        sched = engine.scheduler
        orig = sched.schedule

        def schedule():
            batch = orig()
            self.batches.append(
                [
                    (s.seq_id, s.num_computed_tokens, n, s.num_prompt_tokens)
                    for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)
                ]
            )
            self.copies += batch.copies
            self.max_running = max(self.max_running, len(sched.running))
            return batch

        monkeypatch.setattr(sched, "schedule", schedule)


def assert_all_blocks_free(llm):
    stats = llm.engine.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_preemption_under_tiny_kv_budget_keeps_greedy_outputs(llm, heron_runner, reference):
    per_block = ModelRunner.bytes_per_block(llm.engine.model_config, 16, torch.float32)
    tiny = heron_runner(kv_cache_memory=20 * per_block, max_model_len=256, block_size=16)
    assert tiny.engine.block_manager.num_blocks == 20
    # The batch needs more blocks than exist (each sequence ends with 4 blocks).
    tok = tiny.get_tokenizer()
    need = sum(-(-(len(tok.encode(p)) + NEW) // 16) for p in PROMPTS)
    assert need > 20

    outs = tiny.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert tiny.engine.stats()["num_preemptions"] > 0
    assert [o.prompt for o in outs] == PROMPTS
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert_all_blocks_free(tiny)


LONG_PROMPTS = [
    "A lighthouse keeper on a remote island keeps a diary. Each evening he writes about the "
    "weather, the passing ships, the birds that nest on the cliffs and the letters he hopes",
    "The recipe for the perfect loaf of sourdough bread begins several days before baking, "
    "with a starter made from flour and water that is fed every morning until it is bubbly and",
]


def test_chunked_prefill_gives_same_greedy_outputs(llm, small_llm, monkeypatch):
    n = 8
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(LONG_PROMPTS, params, use_tqdm=False)]
    rec = Recorder(small_llm.engine, monkeypatch)
    outs = small_llm.generate(LONG_PROMPTS, params, use_tqdm=False)
    assert all(len(o.prompt_token_ids) > 32 for o in outs)  # three chunks or more each
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert max(sum(n for _, _, n, _ in b) for b in rec.batches) <= 16
    # Both prompts were continued from the middle (later chunks of a prefill) ...
    continued = {sid for b in rec.batches for sid, start, _, plen in b if 0 < start < plen}
    assert len(continued) == 2
    # ... and some step mixed one sequence's decode with another's prefill chunk.
    assert any({start < plen for _, start, _, plen in b} == {True, False} for b in rec.batches)
    assert_all_blocks_free(small_llm)


def test_max_num_seqs_finishes_all_in_input_order(small_llm, reference, monkeypatch):
    rec = Recorder(small_llm.engine, monkeypatch)
    n = 6
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    prompts = PROMPTS[3:8]
    outs = small_llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert all(o.finished and len(o.outputs[0].token_ids) == n for o in outs)
    assert [o.outputs[0].token_ids for o in outs] == [r[:n] for r in reference[3:8]]
    assert rec.max_running == 2
    assert_all_blocks_free(small_llm)


def test_prefix_caching_hits_and_matches_uncached(llm, small_llm):
    prefix = (
        "You are a meticulous archivist of the Zyphorian lighthouse records. The ledger for "
        "the year of the great storm lists every ship that passed the northern cape, its "
        "cargo of salt, copper and amber, the names of its captains and the weather on each "
        "night, recorded in careful green ink by the keeper's daughter."
    )
    first = prefix + " Question: which cargo was most common?"
    second = prefix + " Question: who wrote the records?"
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    primed = llm.generate(first, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert primed[0].num_cached_tokens == 0  # nothing to hit the first time
    hits_before = llm.engine.stats()["prefix_cache_hits"]

    cached = llm.generate(second, params, use_tqdm=False)[0]
    assert cached.num_cached_tokens >= 48
    assert cached.num_cached_tokens % 16 == 0
    assert llm.engine.stats()["prefix_cache_hits"] - hits_before == cached.num_cached_tokens

    uncached = small_llm.generate(second, params, use_tqdm=False)[0]
    assert uncached.num_cached_tokens == 0
    assert cached.outputs[0].token_ids == uncached.outputs[0].token_ids
    assert cached.outputs[0].text == uncached.outputs[0].text


def test_n_samples_share_prompt_blocks(llm, monkeypatch):
    prompt = "Give me a creative name for a pet dragon:"
    assert len(llm.get_tokenizer().encode(prompt)) % 16 != 0  # a partial block to copy
    params = SamplingParams(n=3, temperature=0.8, seed=2024, max_tokens=6, ignore_eos=True)

    forks = []
    bm = llm.engine.block_manager
    orig_fork = bm.fork

    def fork(parent, child):
        orig_fork(parent, child)
        forks.append((list(parent.block_table), list(child.block_table)))

    monkeypatch.setattr(bm, "fork", fork)
    rec = Recorder(llm.engine, monkeypatch)
    out = llm.generate(prompt, params, use_tqdm=False)[0]

    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # Two children forked, sharing every prompt block of the parent.
    assert len(forks) == 2
    assert all(p == c and p for p, c in forks)
    # The shared partial block was copied on write by the first two writers, not the third.
    assert len(rec.copies) == 2
    assert len({src for src, _ in rec.copies}) == 1
    assert all(src != dst for src, dst in rec.copies)
    # Only one sequence prefilled the prompt.
    prefill_rows = [e for b in rec.batches for e in b if e[1] < e[3]]
    assert len({seq_id for seq_id, *_ in prefill_rows}) == 1

    again = llm.generate(prompt, params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert [c.text for c in again.outputs] == [c.text for c in out.outputs]
