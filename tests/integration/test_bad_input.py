"""Bad input to the engine on the real model gives an InvalidRequestError or ModelLoadError
naming the field, never a crash, and leaves the engine able to serve the next request. Bad
settings refused before a model loads: tests/unit/test_bad_settings.py."""

from __future__ import annotations

import math

import pytest

from heron import LLM, SamplingParams
from heron.errors import InvalidRequestError, ModelLoadError
from tests.support.faults import poison_logits

GOOD = SamplingParams(temperature=0, max_tokens=2)


def assert_engine_idle(llm):
    e = llm.engine
    assert not e.has_unfinished_requests()
    stats = e.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


@pytest.fixture(scope="module")
def good_output(llm):
    return llm.generate("The sky is", GOOD, use_tqdm=False)[0].outputs[0].token_ids


def assert_still_serves(llm, good_output):
    assert_engine_idle(llm)
    out = llm.generate("The sky is", GOOD, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == good_output


# ---------------------------------------------------------------- prompts


def test_empty_prompt(llm, good_output):
    for bad in ("", [], [[]]):
        with pytest.raises(InvalidRequestError) as info:
            llm.generate(bad, GOOD, use_tqdm=False)
        assert "prompt" in str(info.value)
    with pytest.raises(InvalidRequestError) as info:
        llm.engine.add_request("", GOOD)
    assert info.value.param == "prompt"
    assert_still_serves(llm, good_output)


def test_prompt_longer_than_context(llm, good_output):
    limit = llm.engine.max_model_len
    with pytest.raises(InvalidRequestError) as info:
        llm.generate([[100] * limit], GOOD, use_tqdm=False)
    assert info.value.param == "prompt"
    assert "max_model_len" in str(info.value) and str(limit) in str(info.value)
    text = "hello " * (limit + 10)
    with pytest.raises(InvalidRequestError) as info:
        llm.generate(text, GOOD, use_tqdm=False)
    assert info.value.param == "prompt"
    # So long that no tokenizing is needed to tell (it would take seconds)
    text = "a" * (4 * limit * llm.get_tokenizer().max_token_chars + 1)
    with pytest.raises(InvalidRequestError) as info:
        llm.generate(text, GOOD, use_tqdm=False)
    assert info.value.param == "prompt" and "cannot fit" in str(info.value)
    assert_still_serves(llm, good_output)


def test_lone_surrogate_in_prompt_or_message(llm, good_output):
    with pytest.raises(InvalidRequestError) as info:
        llm.generate("a\ud800b", GOOD, use_tqdm=False)
    assert info.value.param == "prompt" and "surrogate" in str(info.value)
    with pytest.raises(InvalidRequestError) as info:
        llm.chat([{"role": "user", "content": "\udfff"}], GOOD, use_tqdm=False)
    assert info.value.param == "messages" and "messages[0].content" in str(info.value)
    assert_still_serves(llm, good_output)


def test_token_ids_out_of_vocab(llm, good_output):
    vocab = llm.engine.model_config.vocab_size
    for bad_id in (-1, vocab, 10**9):
        with pytest.raises(InvalidRequestError) as info:
            llm.generate([[1, 2, bad_id]], GOOD, use_tqdm=False)
        assert info.value.param == "prompt"
        assert str(vocab) in str(info.value) and str(bad_id) in str(info.value)
    assert_still_serves(llm, good_output)


def test_one_bad_prompt_in_a_batch_leaves_nothing_queued(llm, good_output):
    with pytest.raises(InvalidRequestError):
        llm.generate(["A good prompt", "Another good one", ""], GOOD, use_tqdm=False)
    assert_still_serves(llm, good_output)


def test_mismatched_sampling_params_list(llm, good_output):
    with pytest.raises(InvalidRequestError) as info:
        llm.generate(["a", "b"], [GOOD], use_tqdm=False)
    assert "sampling_params" in str(info.value)
    assert_still_serves(llm, good_output)


def test_duplicate_request_id(llm, good_output):
    llm.engine.add_request("The sky is", GOOD, request_id="dup")
    try:
        with pytest.raises(InvalidRequestError) as info:
            llm.engine.add_request("The sky is", GOOD, request_id="dup")
        assert info.value.param == "request_id"
    finally:
        llm.engine.abort_request("dup")
    assert_still_serves(llm, good_output)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_non_finite_logits_end_only_that_request(llm, monkeypatch, value, temperature):
    prompts = ["The sky is", "Water boils at", "Paris is the capital of"]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    sampled = SamplingParams(temperature=temperature, max_tokens=6, seed=3, ignore_eos=True)
    params = [greedy, sampled, greedy]
    solo = [llm.generate(p, greedy, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    poison_logits(monkeypatch, llm, prompts[1], value, after=2)
    outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs[1].finish_reason == "error" and len(outs[1].token_ids) == 2
    assert [outs[0].token_ids, outs[2].token_ids] == [solo[0], solo[2]]
    assert outs[0].finish_reason == outs[2].finish_reason == "length"
    monkeypatch.undo()
    assert_engine_idle(llm)


# ---------------------------------------------------------------- model files


def test_truncated_gguf(tmp_path, model_path):
    cut = tmp_path / "truncated.gguf"
    with open(model_path, "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    with pytest.raises(ModelLoadError) as info:
        LLM(str(cut), device="cpu")
    assert str(cut) in str(info.value)
