"""Tool calling (heron.tools): the Hermes parser, whole and streamed; tools and tool results
through SmolLM2's template (heron's rendering) and Qwen2.5's (the template's own); forced
calls that validate on the default 135M model; the server through the openai SDK and
LangChain; and bad tools as 400s."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from heron import LLM, SamplingParams
from heron.errors import InvalidRequestError
from heron.models.catalog import DEFAULT_MODEL, KNOWN_MODELS
from heron.tokenizer import Tokenizer
from heron.tools import TOOL_PARSERS, ToolParams, prepare_chat

MODEL = DEFAULT_MODEL
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 20}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The current time in a timezone.",
            "parameters": TIME,
        },
    },
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
# A finished exchange: the assistant's call (no content) and the tool's result.
HISTORY = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": '{"city": "Paris", "unit": "celsius"}',
                },
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
]


def hermes():
    return TOOL_PARSERS.make("hermes")


def call_text(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'


def assert_valid_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS, name
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


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
