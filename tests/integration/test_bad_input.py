"""Bad input gives an InvalidRequestError or ModelLoadError naming the field, never a crash,
and leaves the engine able to serve the next request."""

from __future__ import annotations

import json
import math
import os

import pytest

from heron import LLM, SamplingParams
from heron.errors import InvalidRequestError, ModelLoadError
from heron.strategies import ContextAware, EntropyAdaptive
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


# ---------------------------------------------------------------- sampling parameters


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("max_tokens", {"max_tokens": 0}),
        ("max_tokens", {"max_tokens": -5}),
        ("temperature", {"temperature": -0.1}),
        ("top_p", {"top_p": 0.0}),
        ("top_p", {"top_p": 1.5}),
        ("n", {"n": 0}),
        ("top_k", {"top_k": -2}),
        ("min_p", {"min_p": 1.5}),
        ("repetition_penalty", {"repetition_penalty": 0.0}),
        ("repetition_penalty", {"repetition_penalty": 1e-300}),  # 0 in float32
        ("repetition_penalty", {"repetition_penalty": 101.0}),
        ("temperature", {"temperature": float("inf")}),
        ("top_p", {"top_p": float("nan")}),
        ("frequency_penalty", {"frequency_penalty": float("nan")}),
        ("kv_budget", {"kv_budget": float("inf")}),
        ("presence_penalty", {"presence_penalty": 3.0}),
        ("frequency_penalty", {"frequency_penalty": -2.5}),
        ("min_tokens", {"min_tokens": 10, "max_tokens": 5}),
        ("logprobs", {"logprobs": -1}),
        ("stop", {"stop": [""]}),
    ],
)
def test_bad_sampling_params(field, kwargs):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == field
    assert field in str(info.value)


def test_bad_token_strategy_options():
    """A per-token strategy's options are checked like SamplingParams' own (NaN and inf
    included), naming the option."""
    for kwargs in ({"alpha": float("inf")}, {"alpha": float("nan")}, {"alpha": -1}):
        with pytest.raises(InvalidRequestError) as info:
            ContextAware(context="ctx", **kwargs)
        assert info.value.param == "strategy_options" and "alpha" in str(info.value)
    with pytest.raises(InvalidRequestError) as info:
        EntropyAdaptive(threshold=float("inf"))
    assert info.value.param == "strategy_options" and "threshold" in str(info.value)


def test_good_sampling_params_edges_are_accepted():
    SamplingParams(temperature=0, top_p=1.0, n=1, max_tokens=1, min_p=1.0, top_k=-1)
    SamplingParams(repetition_penalty=0.01)
    SamplingParams(repetition_penalty=100)


@pytest.mark.parametrize("temperature", [0, 1e-300, 1e-6])
def test_temperature_below_eps_is_greedy(temperature):
    assert SamplingParams(temperature=temperature).greedy
    assert not SamplingParams(temperature=1e-4).greedy


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


# ---------------------------------------------------------------- engine settings and models


def test_bad_engine_settings():
    with pytest.raises(InvalidRequestError) as info:
        LLM(dtype="float64")
    assert info.value.param == "dtype"
    with pytest.raises(InvalidRequestError) as info:
        LLM(block_size=0)
    assert info.value.param == "block_size"
    with pytest.raises(InvalidRequestError) as info:
        LLM(max_num_seqs=0)
    assert info.value.param == "max_num_seqs"
    with pytest.raises(InvalidRequestError) as info:
        LLM(no_such_option=1)
    assert "no_such_option" in str(info.value)


def test_unknown_model_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError) as info:
        LLM(str(missing), device="cpu")
    assert str(missing) in str(info.value)
    with pytest.raises(ModelLoadError):
        LLM("no-such-model-name", device="cpu")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["FooForCausalLM"], "vocab_size": 10})
    )
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError) as info:
        LLM(str(tmp_path), device="cpu")
    assert "unsupported architecture" in str(info.value)
    assert "llama" in str(info.value)  # says what is supported


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        LLM(str(tmp_path), device="cpu")
    assert "config.json" in str(info.value)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(1 << 16))
    with pytest.raises(ModelLoadError) as info:
        LLM(str(bad), device="cpu")
    assert str(bad) in str(info.value)


def test_truncated_gguf(tmp_path, model_path):
    cut = tmp_path / "truncated.gguf"
    with open(model_path, "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    with pytest.raises(ModelLoadError) as info:
        LLM(str(cut), device="cpu")
    assert str(cut) in str(info.value)


def test_not_a_model_file(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError):
        LLM(str(bad), device="cpu")
