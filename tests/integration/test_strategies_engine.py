"""Decoding strategies end to end on the real engine: round 0 is plain n-sample sampling,
adaptive draws further rounds with new seeds, best-of-n picks the most likely sample, the
samples really share the prompt's KV blocks, and the CLI takes a strategy. The strategies'
choices on hand-made samples: tests/unit/test_strategies.py."""

from __future__ import annotations

import re

import pytest

from heron import SamplingParams
from heron.strategies import Adaptive
from tests.support.cli import heron


def test_strategy_end_to_end_on_the_engine(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8)
    prompts = ["Two plus two is", "The capital of France is"]
    plain = llm.generate(prompts, params, use_tqdm=False)
    outs = llm.generate(prompts, params, use_tqdm=False, strategy="majority")
    for p, out in zip(plain, outs, strict=True):
        r = out.strategy
        assert r is not None and r.strategy == "majority"
        assert len(out.outputs) == 1 and out.outputs[0].index == 0
        # Round 0 uses the request's own seed: the same samples as plain n = 4 sampling.
        assert [s.text for s in r.samples] == [c.text for c in p.outputs]
        assert out.outputs[0].text == r.samples[r.chosen].text
        assert (r.num_samples, r.rounds) == (4, 1)
        assert r.num_tokens == sum(len(c.token_ids) for c in p.outputs)
        # one prefill step (the first token of every sample), then one step per token
        assert r.model_calls == max(len(c.token_ids) for c in p.outputs)


def test_adaptive_on_the_engine_spends_more_when_samples_disagree(llm):
    """With the whole text as the answer, greedy samples always agree (one round) and hot
    random samples almost never do, so adaptive draws further rounds, with new seeds."""
    prompt = "Pick a random number between 1 and 1000:"
    strategy = Adaptive(n=8, initial=2, agreement=1.0, answer_regex=r"(?s).+")
    agree = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False, strategy=strategy
    )[0].strategy
    assert (agree.num_samples, agree.rounds) == (2, 1)
    hot = SamplingParams(temperature=1.5, seed=0, max_tokens=6)
    spread = llm.generate(prompt, hot, use_tqdm=False, strategy=strategy)[0].strategy
    assert spread.rounds >= 2 and spread.num_samples in (4, 8)
    texts = [s.text for s in spread.samples]
    assert len(set(texts)) > 2, "later rounds must not replay the first round's seeds"


def test_best_of_n_returns_the_most_likely_sample_on_the_engine(llm):
    params = SamplingParams(n=4, temperature=1.2, seed=5, max_tokens=6, logprobs=2)
    out = llm.generate("Once upon a time", params, use_tqdm=False, strategy="best_of_n")[0]
    r = out.strategy
    means = [sum(p[t].logprob for t, p in zip(s.token_ids, s.logprobs, strict=True)) / 6
             for s in r.samples]  # fmt: skip
    assert all(len(s.token_ids) == 6 for s in r.samples)
    assert r.chosen == max(range(4), key=means.__getitem__)
    assert r.score == pytest.approx(max(means))
    assert all(len(p) >= 2 for p in out.outputs[0].logprobs)  # the user's top-2 kept


def test_samples_share_the_prompt_kv_blocks(llm):
    """n = 4 forks at prompt end: during decoding every full prompt block has ref count 4
    and the group holds far fewer blocks than four separate requests would."""
    engine = llm.engine
    bm = engine.block_manager
    prompt = list(range(100, 100 + 5 * bm.block_size + 3))  # 5 full blocks + 3 tokens

    def run(n: int) -> tuple[int, list[list[int]]]:
        params = SamplingParams(n=n, temperature=1.0, seed=1, max_tokens=4, ignore_eos=True)
        req = engine.add_request(prompt, params)
        held, refs = 0, []
        while not req.finished:
            engine.step()
            if req.forked and not req.finished:
                held = max(held, bm.num_blocks - bm.num_free_blocks)
                refs = [[bm.blocks[b].ref_count for b in s.block_table] for s in req.seqs]
        return held, refs

    held_1, _ = run(1)
    held_4, refs = run(4)
    assert all(r[:5] == [4] * 5 for r in refs), refs  # the full prompt blocks: shared by 4
    assert all(r[5] == 1 for r in refs), refs  # the partial block: copied on first write
    assert held_1 == 6 and held_4 == 5 + 4  # vs 24 without sharing


def test_cli_generate_with_a_strategy():
    proc = heron(
        "generate", "Two plus two is", "--no-chat", "-q",
        "--strategy", "best_of_majority", "--n", "3", "--strategy-option", "threshold=0.5",
        "--max-tokens", "4", "--seed", "1", "--dtype", "float32", "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "===" not in proc.stdout and proc.stdout.strip()  # one completion, the chosen one
    assert re.search(r"best_of_majority: sample [123]/3, .* tokens, \d+ engine steps", proc.stderr)
