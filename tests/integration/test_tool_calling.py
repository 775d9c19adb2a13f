"""Tool calling on the engine (heron.tools): tools and tool results through SmolLM2's template
(heron's rendering) and Qwen2.5's (the template's own), and forced calls that validate on the
default 135M model. The parser: tests/unit/test_tool_parsers.py; the server:
tests/server/test_server_tool_calling.py."""

from __future__ import annotations

import json

import pytest

from heron import LLM, SamplingParams
from heron.errors import InvalidRequestError
from heron.models.catalog import DEFAULT_MODEL, KNOWN_MODELS
from heron.tokenizer import Tokenizer
from heron.tools import ToolParams, prepare_chat
from tests.support.tools import (
    ASK,
    HISTORY,
    NAMED,
    TOOLS,
    assert_valid_call,
    call_text,
)

MODEL = DEFAULT_MODEL


# ---------------------------------------------------------------------------- rendering
@pytest.fixture(scope="module")
def qwen_tokenizer() -> Tokenizer:
    known = KNOWN_MODELS["qwen2.5-coder-0.5b-instruct"]
    path = known.locate()
    if path is None:
        pytest.skip(f"{known.name} is not installed: {known.install_hint}")
    return Tokenizer(path)


def render(tok: Tokenizer, messages: list[dict], tools: ToolParams | None) -> str:
    chat = prepare_chat(tok, messages, tools)
    return tok.apply_chat_template(chat.messages, True, chat.tools)


def test_smollm2_template_gets_heron_rendering(llm):
    """SmolLM2's template knows no tools: the tools go in the system message, the past call
    in the assistant's text, the result in a user message."""
    tok = llm.get_tokenizer()
    text = render(tok, HISTORY, ToolParams(TOOLS))
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert json.dumps(TOOLS[0]) in text
    assert "You are a helpful AI assistant named SmolLM" not in text
    call = call_text("get_weather", {"city": "Paris", "unit": "celsius"})
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in text
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response>' in text
    system = [{"role": "system", "content": "Be brief."}, *ASK]
    assert render(tok, system, ToolParams(TOOLS)).startswith(
        "<|im_start|>system\nBe brief.\n\n# Tools\n"
    )
    # "none": the tools are not shown, the history still is
    plain = render(tok, HISTORY, ToolParams(TOOLS, "none"))
    assert "# Tools" not in plain and call in plain


def test_qwen_template_renders_tools_itself(qwen_tokenizer):
    text = render(qwen_tokenizer, HISTORY, ToolParams(TOOLS))
    assert text.count("# Tools") == 1 and "You are Qwen" in text  # the template's own words
    assert json.dumps(TOOLS[1]["function"]["parameters"]) in text
    # arguments as an object, not a JSON string inside JSON
    assert call_text("get_weather", {"city": "Paris", "unit": "celsius"}) in text
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response>' in text
    chat = prepare_chat(qwen_tokenizer, ASK, ToolParams(TOOLS, NAMED))
    assert chat.parser.name == "hermes" and chat.constraint is not None
    assert "# Tools" not in render(qwen_tokenizer, ASK, ToolParams(TOOLS, "none"))


def test_bad_history_is_an_invalid_request(llm):
    bad = json.loads(json.dumps(HISTORY))
    bad[1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    with pytest.raises(InvalidRequestError, match=r"messages\[1\].tool_calls\[0\]") as e:
        prepare_chat(llm.get_tokenizer(), bad, None)
    assert e.value.param == "messages"


# ---------------------------------------------------------------------------- offline
def sampled(seed: int, max_tokens: int = 120) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens)


def test_forced_calls_validate_for_many_seeds(llm):
    """Without the grammar the 135M model rarely writes a call at all; with it, every seed
    gives calls that parse and follow the functions' schemas."""
    seeds = range(6)
    asks = [ASK] * len(seeds)
    named = llm.chat(asks, [sampled(s) for s in seeds], False, tools=TOOLS, tool_choice=NAMED)
    required = llm.chat(
        asks[:4], [sampled(s, 400) for s in seeds[:4]], False, tools=TOOLS, tool_choice="required"
    )
    for out in named:
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        assert c.message.content is None, c.text
        assert [call.name for call in c.message.tool_calls] == ["get_weather"]
        assert_valid_call("get_weather", c.message.tool_calls[0].arguments)
    for out in required:
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        assert c.message.content is None and c.message.tool_calls, c.text
        for call in c.message.tool_calls:
            assert_valid_call(call.name, call.arguments)


def test_auto_and_none_offline(llm):
    auto = llm.chat(ASK, SamplingParams(temperature=0, max_tokens=24), False, tools=TOOLS)
    message = auto[0].outputs[0].message
    assert message is not None and (message.content is not None or message.tool_calls)
    for call in message.tool_calls:
        assert isinstance(json.loads(call.arguments), dict)
    one = SamplingParams(max_tokens=1)
    none = llm.chat(ASK, one, False, tools=TOOLS, tool_choice="none")[0]
    assert none.outputs[0].message is None
    plain = llm.chat(ASK, one, False)[0]
    assert none.prompt_token_ids == plain.prompt_token_ids  # the tools were not shown


def test_forced_call_beside_another_constraint_is_refused(llm):
    from heron import StructuredOutputsParams

    params = SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True))
    with pytest.raises(InvalidRequestError, match="response_format") as e:
        llm.chat(ASK, params, False, tools=TOOLS, tool_choice="required")
    assert e.value.param == "tool_choice"


def test_qwen_forced_and_auto_calls():
    """Qwen2.5's own template shows the tools: the forced call follows the schema; left to
    choose (this 0.5B coder model tends to answer with a fenced JSON block, not a call), the
    reply is still well formed."""
    known = KNOWN_MODELS["qwen2.5-coder-0.5b-instruct"]
    if known.locate() is None:
        pytest.skip(f"{known.name} is not installed: {known.install_hint}")
    path = known.path_for_loading()
    qwen = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=256 * 2**20)
    greedy = SamplingParams(temperature=0, max_tokens=60)
    forced = qwen.chat(ASK, greedy, False, tools=TOOLS, tool_choice=NAMED)[0].outputs[0]
    assert [c.name for c in forced.message.tool_calls] == ["get_weather"], forced.text
    assert_valid_call("get_weather", forced.message.tool_calls[0].arguments)
    auto = qwen.chat(ASK, greedy, False, tools=TOOLS)[0].outputs[0]
    assert auto.message.tool_calls or auto.message.content == auto.text
    for call in auto.message.tool_calls:
        assert isinstance(json.loads(call.arguments), dict)
