"""Tool calling through the server: the openai SDK (named, required and auto calls, streamed
and whole), a conversation with a tool result, LangChain, and bad tools as 400s."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from heron.models.catalog import DEFAULT_MODEL
from tests.support.tools import (
    ASK,
    HISTORY,
    NAMED,
    TOOLS,
    assert_valid_call,
    call_text,
)

MODEL = DEFAULT_MODEL


# ---------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def ask(client: OpenAI, **kw):
    kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 120, **kw}
    return client.chat.completions.create(**kw)


def test_server_named_call(client):
    choice = ask(client, tool_choice=NAMED, temperature=1.0, seed=3).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert_valid_call(call.function.name, call.function.arguments)


def test_server_required_calls(client):
    choice = ask(client, tool_choice="required", temperature=1.0, seed=5, max_tokens=400)
    choice = choice.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert_valid_call(call.function.name, call.function.arguments)


def test_server_auto_is_well_formed(client):
    for seed in range(3):
        choice = ask(client, temperature=1.0, seed=seed, max_tokens=60).choices[0]
        calls = choice.message.tool_calls or []
        assert calls or isinstance(choice.message.content, str)
        if calls:
            assert choice.finish_reason in ("tool_calls", "length")
        for call in calls:
            assert isinstance(json.loads(call.function.arguments), dict)


def test_server_stream_equals_whole_for_a_forced_call(client):
    kw = dict(tool_choice="required", temperature=0)
    whole = ask(client, **kw).choices[0]
    content, calls, finish = "", {}, None
    for chunk in ask(client, stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            assert call.index not in calls and call.id.startswith("call_")  # each call whole
            calls[call.index] = (call.function.name, call.function.arguments)
        finish = chunk.choices[0].finish_reason or finish
    assert finish == whole.finish_reason == "tool_calls"
    assert (content or None) == whole.message.content
    assert [calls[i] for i in sorted(calls)] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]


def test_server_conversation_with_a_tool_result(client, server):
    r = client.chat.completions.create(
        model=MODEL, messages=HISTORY, tools=TOOLS, max_tokens=30, temperature=0
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content or r.choices[0].message.tool_calls
    # the prompt holds the call and its result, as the offline API renders them
    tokens = httpx.post(server.url + "/tokenize", json={"messages": HISTORY}, timeout=60)
    text = httpx.post(
        server.url + "/detokenize", json={"tokens": tokens.json()["tokens"]}, timeout=60
    ).json()["prompt"]
    assert call_text("get_weather", {"city": "Paris", "unit": "celsius"}) in text
    assert "<tool_response>\n" + HISTORY[2]["content"] in text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": TOOLS, "tool_choice": NAMED | {"function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools"),
        ({"tools": [{"function": {"name": "f", "parameters": {"type": "nope"}}}]}, "tools"),
        ({"tools": {"get_weather": {}}}, "tools"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        ({"messages": [{**HISTORY[1], "tool_calls": [{"function": {"name": "f"}}]}]}, "messages"),
        (
            {
                "messages": [
                    {
                        **HISTORY[1],
                        "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}],
                    }
                ]
            },
            "messages",
        ),
    ],
)
def test_bad_tools_are_400s(server, body, param):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": ASK, "max_tokens": 4, **body},
        timeout=120,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


# ---------------------------------------------------------------------------- LangChain
class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)


def get_weather(city: str, unit: str) -> str:
    """The current weather in a city.

    Args:
        city: the city's name
        unit: celsius or fahrenheit
    """
    return f"21 degrees {unit} in {city}"


@pytest.fixture(scope="module")
def chat_model(server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=server.url + "/v1",
        api_key="unused",
        model=MODEL,
        temperature=0,
        max_tokens=120,
        max_retries=0,
        timeout=300,
    )


def test_langchain_structured_output(chat_model):
    structured = chat_model.with_structured_output(Person, method="json_schema")
    person = structured.invoke("Describe a person.")
    assert isinstance(person, Person)


def test_langchain_bind_tools(chat_model):
    from langchain_core.messages import AIMessage

    bound = chat_model.bind_tools([get_weather], tool_choice="get_weather")
    message = bound.invoke("What is the weather in Paris?")
    assert isinstance(message, AIMessage)
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    assert call["id"].startswith("call_")
