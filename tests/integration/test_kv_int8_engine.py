"""The int8 KV cache (``kv_cache_dtype="int8"``) in the engine on the real model: more tokens
in the same memory, outputs that stay close to the float cache when later chunks and decode
steps read quantized K/V, and copy-on-write moving the scales."""

from __future__ import annotations

import pytest
import torch

from heron import SamplingParams
from tests.support.prompts import TEXT


@pytest.fixture(scope="module")
def engines(heron_runner):
    kw = {"kv_cache_memory": 64 * 2**20, "max_num_batched_tokens": 48, "max_model_len": 1024}
    return heron_runner(**kw), heron_runner(kv_cache_dtype="int8", **kw)


def test_int8_cache_holds_more_tokens_in_the_same_memory(engines):
    full, int8 = engines
    runner = int8.engine.runner
    assert runner.kv_cache.dtype == torch.int8 and runner.kv_scales is not None
    ratio = int8.engine.block_manager.num_blocks / full.engine.block_manager.num_blocks
    assert 3.5 < ratio < 4.0  # fp32: 4 * 64 bytes per head -> 64 + 4


def test_int8_cache_stays_close_to_the_float_cache(engines):
    """48-token prefill chunks: every chunk after the first, and every decode step, attends to
    quantized K/V."""
    params = SamplingParams(temperature=0, max_tokens=16, prompt_logprobs=0)
    outs = [llm.generate(TEXT, params, use_tqdm=False)[0] for llm in engines]
    means = []
    for out in outs:
        ids = out.prompt_token_ids
        lps = [pos[t].logprob for pos, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
        means.append(sum(lps) / len(lps))
    assert len(outs[0].prompt_token_ids) > 200
    assert abs(means[0] - means[1]) < 0.02, means
    assert means[0] != means[1]  # the cache really holds something else
    assert outs[1].outputs[0].token_ids[:8] == outs[0].outputs[0].token_ids[:8]


def test_int8_cache_copy_on_write_moves_scales(engines):
    _, int8 = engines
    runner = int8.engine.runner
    bs = int8.engine.block_manager.block_size
    src, dst = 5, 9
    runner.kv_cache[:, :, src * bs : (src + 1) * bs] = 7
    runner.kv_scales[:, :, src * bs : (src + 1) * bs] = 0.5
    runner.copy_blocks([(src, dst)])
    assert bool((runner.kv_scales[:, :, dst * bs : (dst + 1) * bs] == 0.5).all())
    assert bool((runner.kv_cache[:, :, dst * bs : (dst + 1) * bs] == 7).all())
    # n > 1 forks and copies the prompt's last block on first write: seeded samples run.
    params = SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=8)
    out = int8.generate("Once upon a time", params, use_tqdm=False)[0]
    assert len(out.outputs) == 3 and all(len(c.token_ids) == 8 for c in out.outputs)
