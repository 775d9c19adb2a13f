"""Greedy parity with transformers on the same GGUF (dequantized, float32).

transformers is the reference: for every parity prompt heron must produce the same 64 greedy
tokens, alone, batched, with tiny prefill chunks and with prefix-cache hits, under
tests.support.parity's rules (a divergence only after a near-tie; prompt logprobs close)."""

from __future__ import annotations

import pytest

from heron import SamplingParams
from tests.support.parity import assert_matches, assert_prompt_logprobs_close, encode_prompts
from tests.support.prompts import PARITY_PROMPTS

pytestmark = pytest.mark.slow

MAX_NEW = 64


@pytest.fixture(scope="module")
def prompt_ids(llm) -> list[list[int]]:
    out = encode_prompts(llm.get_tokenizer(), PARITY_PROMPTS)
    lengths = [len(ids) for ids in out]
    assert min(lengths) <= 8 and max(lengths) >= 450, lengths
    return out


@pytest.fixture(scope="module")
def reference(model_path, prompt_ids, llm, transformers_runner):
    return transformers_runner(model_path, prompt_ids, MAX_NEW, llm.engine.eos_token_ids)


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW)


def test_each_prompt_alone(llm, prompt_ids, reference):
    for i, ids in enumerate(prompt_ids):
        out = llm.generate([ids], GREEDY, use_tqdm=False)[0]
        assert_matches(out.outputs[0].token_ids, reference[i], f"prompt {i} alone")


def test_all_prompts_in_one_batch_then_from_prefix_cache(llm, prompt_ids, reference):
    for run in ("batched", "prefix-cached"):
        before = llm.engine.stats()["prefix_cache_hits"]
        outs = llm.generate(prompt_ids, GREEDY, use_tqdm=False)
        for i, out in enumerate(outs):
            assert_matches(out.outputs[0].token_ids, reference[i], f"prompt {i} {run}")
        if run == "prefix-cached":
            assert llm.engine.stats()["prefix_cache_hits"] > before
            assert outs[-1].num_cached_tokens >= 400  # the long prompt came from the cache


def test_small_prefill_chunks(prompt_ids, reference, heron_runner):
    llm = heron_runner(max_num_batched_tokens=24, enable_prefix_caching=False)
    outs = llm.generate(prompt_ids, GREEDY, use_tqdm=False)
    for i, out in enumerate(outs):
        assert_matches(out.outputs[0].token_ids, reference[i], f"prompt {i} chunked")


def test_prompt_logprobs_close(llm, prompt_ids, reference):
    assert_prompt_logprobs_close(llm, prompt_ids, reference)
