"""Tool calling's parts without a model (heron.tools): the Hermes parser, whole and streamed, and
the checks of ``tools`` and ``tool_choice``."""

from __future__ import annotations

import json

import pytest

from heron.errors import InvalidRequestError
from heron.tools import TOOL_PARSERS, ToolParams
from tests.support.tools import (
    NAMED,
    TOOLS,
    call_text,
)


def hermes():
    return TOOL_PARSERS.make("hermes")


# ---------------------------------------------------------------------------- the parser
def test_text_around_a_call_is_the_content():
    call = call_text("get_weather", {"city": "Paris"})
    message = hermes().parse(f"Let me check.\n{call}\nOne moment.")
    assert message.content == "Let me check.\nOne moment."
    assert [(c.name, json.loads(c.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert message.tool_calls[0].id.startswith("call_")


def test_several_calls_and_no_other_text_give_null_content():
    text = call_text("get_weather", {"city": "Oslo"}) + "\n" + call_text("get_time", {})
    message = hermes().parse(text)
    assert message.content is None
    assert [c.name for c in message.tool_calls] == ["get_weather", "get_time"]
    assert message.to_openai()["tool_calls"][1]["function"] == {
        "name": "get_time",
        "arguments": "{}",
    }
    assert len({c.id for c in message.tool_calls}) == 2


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {</tool_call> and on',  # bad JSON
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',  # arguments not an object
        'Sure: <tool_call>\n{"name": "get_weather", "arguments": {}}',  # never closed
        "  plain text, no call, with spaces around \n",
        "ends with a half tag <tool_ca",
    ],
)
def test_what_is_not_a_call_stays_content_as_written(text):
    message = hermes().parse(text)
    assert message.tool_calls == [] and message.content == text


def test_a_malformed_call_beside_a_good_one():
    good = call_text("get_time", {"timezone": "UTC"})
    text = f"{good}\n<tool_call>not json</tool_call>"
    message = hermes().parse(text)
    assert [c.name for c in message.tool_calls] == ["get_time"]
    assert message.content == "<tool_call>not json</tool_call>"


@pytest.mark.parametrize(
    "text",
    [
        "Let me check.\n" + call_text("get_weather", {"city": "Paris"}) + "\nDone.",
        call_text("a", {"x": [1, 2]}) + "\n" + call_text("b", {}) + "\n",
        "Intro <tool_call>oops</tool_call> then " + call_text("c", {"y": "</tool"}),
        "no calls at all, just <tags> and < signs\n\n",
    ],
)
def test_streamed_in_any_pieces_equals_whole(text):
    whole = hermes().parse(text)
    for size in (1, 2, 5, 13):
        reader = hermes().reader()
        content, calls = "", []
        for start in range(0, len(text), size):
            piece, done = reader.feed(text[start : start + size])
            content += piece
            calls += done
        content += reader.finish()
        streamed = reader.message(content)
        assert streamed.content == whole.content, size
        assert [(c.name, c.arguments) for c in calls] == [
            (c.name, c.arguments) for c in whole.tool_calls
        ]


# ---------------------------------------------------------------------------- tool params
@pytest.mark.parametrize(
    ("tools", "choice", "param", "message"),
    [
        (TOOLS, NAMED | {"function": {"name": "nope"}}, "tool_choice", "no function named"),
        (None, "required", "tool_choice", "needs tools"),
        (None, NAMED, "tool_choice", "no function named"),
        (TOOLS, "sometimes", "tool_choice", "one of none, auto, required"),
        (TOOLS, {"type": "function"}, "tool_choice", "expected"),
        ([{"type": "function"}], None, "tools", r"tools\[0\].function"),
        ([{"type": "retrieval"}], None, "tools", r"tools\[0\]"),
        ("get_weather", None, "tools", "a list"),
        ([{"function": {"name": "has space"}}], None, "tools", "name"),
        ([TOOLS[0], TOOLS[0]], None, "tools", "unique"),
        ([{"function": {"name": "f", "parameters": []}}], None, "tools", "parameters"),
        (
            [{"function": {"name": "f", "parameters": {"type": "nonsense"}}}],
            None,
            "tools",
            r"tools\[0\].function.parameters",
        ),
    ],
)
def test_bad_tools_are_invalid_requests(tools, choice, param, message):
    with pytest.raises(InvalidRequestError, match=message) as e:
        ToolParams(tools, choice)
    assert e.value.param == param


def test_tool_choice_modes():
    assert ToolParams(TOOLS).mode == "auto"
    assert ToolParams(None, "none").mode == "none" and not ToolParams(None, "none").offered
    assert ToolParams([]).mode == "none"
    named = ToolParams(TOOLS, NAMED)
    assert named.mode == "named" and named.named.name == "get_weather"
    assert [f.name for f in ToolParams(TOOLS, "required").functions] == ["get_weather", "get_time"]
    # no parameters: a function without arguments
    assert ToolParams([{"function": {"name": "f"}}]).functions[0].parameters["type"] == "object"
