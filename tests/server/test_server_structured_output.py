"""Constrained decoding (heron.structured) through the server: the openai SDK's parse with a
pydantic model, JSON mode and vLLM's extra constraint fields on both endpoints, and bad
constraints as 400s naming the parameter."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from heron.models.catalog import DEFAULT_MODEL
from tests.support.prompts import PHONE

MODEL = DEFAULT_MODEL


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_openai_sdk_parse_with_a_pydantic_model(client):
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a person."}],
        response_format=Person,
        max_tokens=60,
        temperature=0,
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Person), message.content


def test_json_mode_and_vllm_extras_on_both_endpoints(client, server):
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": 'Reply with a JSON object with one key, "ok".'}],
        response_format={"type": "json_object"},
        max_tokens=100,
        temperature=0,
    )
    assert chat.choices[0].finish_reason == "stop", chat.choices[0].message.content
    assert isinstance(json.loads(chat.choices[0].message.content), dict)
    for extra in ({"structured_outputs": {"regex": PHONE}}, {"guided_regex": PHONE}):
        out = client.completions.create(
            model=MODEL, prompt="Call me at", max_tokens=12, temperature=0, extra_body=extra
        )
        assert re.fullmatch(PHONE, out.choices[0].text), out.choices[0].text
    out = client.completions.create(
        model=MODEL,
        prompt="Pick one:",
        max_tokens=8,
        extra_body={"guided_choice": ["alpha", "beta"]},
    )
    assert out.choices[0].text in ("alpha", "beta")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
            "response_format.json_schema",
        ),
        ({"structured_outputs": {"regex": "(a"}}, "structured_outputs.regex"),
        ({"guided_grammar": 'root ::= "a" |'}, "structured_outputs.grammar"),
        ({"guided_json": {"type": "nonsense"}}, "structured_outputs.json"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex"),
        ({"structured_outputs": {"xml": "a"}}, "structured_outputs"),
    ],
)
def test_bad_constraints_are_400s(server, body, param):
    r = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": "x", "max_tokens": 4, **body},
        timeout=120,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
