"""KV-cache compression (heron.kv) in the engine on the real model: lossless at a budget above
the prompt, blocks really freed, compressed and full-cache requests batched together, n
samples sharing the compressed prompt, StreamingLLM past the context window, preemption,
query-agnostic compression, and the errors."""

from __future__ import annotations

import math

import pytest

from heron import SamplingParams
from heron.errors import InvalidRequestError
from heron.kv.compressor import KVState


def _passkey_prompt(llm, reps: int = 14) -> list[int]:
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go again. "
    text = (
        filler * reps
        + "The pass key is 68142. Remember it. "
        + filler * reps
        + "What is the pass key? The pass key is"
    )
    return llm.engine.tokenizer.encode(text)


def _kv_state(engine, seq) -> KVState:
    """The KV-compression plugin's state of ``seq`` (it drops it once ``seq`` finishes)."""
    return engine.plugins.get("kv_compression").states[seq.seq_id]


def _greedy(n=12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def test_budget_above_prompt_is_the_full_cache(llm):
    ids = _passkey_prompt(llm)
    full = llm.generate([ids], _greedy(), use_tqdm=False)[0].outputs[0].token_ids
    for name in ("snapkv", "h2o", "streaming_llm", "pyramidkv", "d2o", "tokenselect"):
        before = llm.engine.stats()["kv_tokens_evicted"]
        out = llm.generate([ids], _greedy(kv_policy=name, kv_budget=len(ids) + 64), use_tqdm=False)
        assert out[0].outputs[0].token_ids == full, name
        assert llm.engine.stats()["kv_tokens_evicted"] == before, name


def test_compressed_sequence_holds_only_its_budget_of_blocks(llm):
    eng = llm.engine
    ids = _passkey_prompt(llm)
    bs = eng.block_manager.block_size
    for name in ("snapkv", "streaming_llm", "h2o"):
        req = eng.add_request(ids, _greedy(n=3 * bs, kv_policy=name, kv_budget=0.2))
        seq = req.seqs[0]
        target = math.ceil(0.2 * len(ids))
        held_after_prefill = None
        while not req.finished:
            eng.step()
            if held_after_prefill is None and seq.num_computed_tokens >= len(ids):
                held_after_prefill = len(seq.block_table)
                used = eng.block_manager.num_blocks - eng.block_manager.num_free_blocks
                assert used == held_after_prefill  # what the block manager really holds
            if not seq.is_finished and name != "snapkv":  # bounded while decoding
                assert len(seq.block_table) <= -(-(target + bs) // bs) + 1, name
        assert held_after_prefill <= -(-target // bs) + 1, name
        assert held_after_prefill < -(-len(ids) // bs) // 2, name
        assert seq.num_evicted >= len(ids) - target - bs, name


def test_compressed_and_full_requests_batched_equal_alone(llm):
    ids = _passkey_prompt(llm)
    other = llm.engine.tokenizer.encode("Write a short poem about the sea and the wind.")
    reqs = [
        (ids, _greedy(kv_policy="snapkv", kv_budget=0.3)),
        (other, _greedy()),
        (ids, _greedy(kv_policy="streaming_llm", kv_budget=96)),
        (ids, _greedy()),
        (ids, _greedy(kv_policy="tokenselect", kv_budget=40)),
    ]
    alone = [llm.generate([p], s, use_tqdm=False)[0].outputs[0].token_ids for p, s in reqs]
    together = llm.generate([p for p, _ in reqs], [s for _, s in reqs], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in together] == alone
    assert alone[0] != alone[3] or alone[2] != alone[3]  # compression changed something
    assert alone[4] != alone[3]  # 40 tokens attended to (4 sinks, 32 recent): key lost


def test_tokenselect_keeps_the_cache_and_its_prefix_hits(llm):
    eng = llm.engine
    ids = _passkey_prompt(llm)
    full = llm.generate([ids], _greedy(), use_tqdm=False)[0].outputs[0].token_ids
    req = eng.add_request(ids, _greedy(kv_policy="tokenselect", kv_budget=0.5))
    seq = req.seqs[0]
    st = _kv_state(eng, seq)
    while not req.finished:
        eng.step()
    assert seq.num_evicted == 0 and seq.num_cached_tokens > 0  # nothing evicted, cache read
    assert st.num_selections > 0 and st.num_reused > 0  # both paths ran
    assert seq.output_token_ids == full  # half the prompt is enough for this key


def test_n_samples_share_the_compressed_prompt(llm):
    ids = _passkey_prompt(llm, reps=8)
    one = llm.generate([ids], _greedy(kv_policy="snapkv", kv_budget=0.25), use_tqdm=False)
    two = llm.generate([ids], _greedy(n=12, kv_policy="snapkv", kv_budget=0.25), use_tqdm=False)
    two_params = _greedy(kv_policy="h2o", kv_budget=0.25)
    two_params.n = 2
    h2o_two = llm.generate([ids], two_params, use_tqdm=False)[0]
    h2o_one = llm.generate([ids], _greedy(kv_policy="h2o", kv_budget=0.25), use_tqdm=False)[0]
    assert two[0].outputs[0].token_ids == one[0].outputs[0].token_ids
    assert [o.token_ids for o in h2o_two.outputs] == [h2o_one.outputs[0].token_ids] * 2


def test_streaming_llm_generates_past_the_context_window(heron_runner):
    llm = heron_runner(max_model_len=96, kv_cache_memory=32 * 2**20)
    prompt = llm.engine.tokenizer.encode("Count from one to one thousand: one, two, three,")
    full = llm.generate([prompt], _greedy(n=200), use_tqdm=False)[0].outputs[0]
    assert len(full.token_ids) == 96 - len(prompt)  # the window stops the full cache
    out = llm.generate(
        [prompt], _greedy(n=200, kv_policy="streaming_llm", kv_budget=48), use_tqdm=False
    )[0].outputs[0]
    assert len(out.token_ids) == 200 and out.finish_reason == "length"
    assert llm.engine.stats()["kv_tokens_evicted"] > 100


def test_engine_refuses_unsupported_combinations(llm):
    with pytest.raises(InvalidRequestError, match="kv_budget"):
        llm.generate(["hi"], _greedy(kv_policy="snapkv", kv_budget=10**6), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="kv_policy"):
        llm.generate(["hi"], _greedy(kv_policy="bogus"), use_tqdm=False)


def test_preempted_compressed_sequence_recomputes_and_compresses_again(heron_runner):
    # 16 blocks of 16 tokens; chunks of 64 let a second prompt in before the first is done.
    per_block = 2 * 30 * 16 * 3 * 64 * 4
    llm = heron_runner(kv_cache_memory=16 * per_block, max_num_batched_tokens=64, max_model_len=256)
    ids = _passkey_prompt(llm, reps=4)
    params = _greedy(n=24, kv_policy="snapkv", kv_budget=0.5)
    alone = llm.generate([ids], params, use_tqdm=False)[0].outputs[0].token_ids
    outs = llm.generate([ids] * 4, params, use_tqdm=False)
    assert all(o.outputs[0].token_ids == alone for o in outs)
    assert llm.engine.scheduler.num_preemptions > 0


def _context_and_question(llm, reps: int = 14) -> tuple[list[int], int]:
    """A passkey prompt split where the question begins: (ids, context tokens)."""
    ids = _passkey_prompt(llm, reps)
    question = llm.engine.tokenizer.encode("What is the pass key? The pass key is")
    return ids, len(ids) - len(question)


def test_query_agnostic_compresses_the_context_before_the_question(llm):
    ids, context = _context_and_question(llm)
    full = llm.generate([ids], _greedy(), use_tqdm=False)[0].outputs[0].token_ids
    above = _greedy(kv_policy="snapkv", kv_budget=context + 8, kv_prefix_tokens=context)
    assert llm.generate([ids], above, use_tqdm=False)[0].outputs[0].token_ids == full
    eng = llm.engine
    req = eng.add_request(ids, _greedy(kv_policy="snapkv", kv_budget=0.3, kv_prefix_tokens=context))
    seq = req.seqs[0]
    st = _kv_state(eng, seq)
    while not req.finished:
        eng.step()
        if st.prefilled and seq.num_computed_tokens == context:  # stopped at the context
            assert seq.num_kv_slots == math.ceil(0.3 * context)
    target = math.ceil(0.3 * context)
    assert st.num_compressions == 1 and seq.num_evicted == context - target
    with pytest.raises(InvalidRequestError, match="kv_prefix_tokens"):
        llm.generate([ids], _greedy(kv_policy="snapkv", kv_prefix_tokens=len(ids)), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="kv_prefix_tokens"):
        llm.generate([ids], _greedy(kv_prefix_tokens=4), use_tqdm=False)


def test_query_agnostic_layer_budgets_mask_the_question_chunk_like_decode_steps(llm, heron_runner):
    """PyramidKV leaves smaller layers with unused slots; the question's prefill chunk must
    hide them exactly as decode steps do: one chunk equals one token at a time."""
    stepwise = heron_runner(max_model_len=256, max_num_batched_tokens=1)
    ids, context = _context_and_question(llm, reps=3)
    params = _greedy(n=8, kv_policy="pyramidkv", kv_budget=0.3, kv_prefix_tokens=context)
    outs = [m.generate([ids], params, use_tqdm=False)[0] for m in (llm, stepwise)]
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
