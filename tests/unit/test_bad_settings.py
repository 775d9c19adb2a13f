"""Bad settings give an InvalidRequestError or ModelLoadError naming the field, never a
crash, before any model is loaded: sampling parameters, a per-token strategy's options,
engine settings, and model paths or files that are missing, unsupported or corrupt. Bad
input to a running engine: tests/integration/test_bad_input.py."""

from __future__ import annotations

import json
import os

import pytest

from heron import LLM, SamplingParams
from heron.errors import InvalidRequestError, ModelLoadError
from heron.strategies import ContextAware, EntropyAdaptive

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


def test_not_a_model_file(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError):
        LLM(str(bad), device="cpu")
