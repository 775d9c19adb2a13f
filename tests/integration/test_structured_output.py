"""Constrained decoding (heron.structured): outputs follow their JSON schema, regex, choice
list or grammar, on the real default model, alone and batched with free requests, and from
the CLI's flags. Through the server: tests/server/test_server_structured_output.py."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading

import jsonschema
import pytest
import torch

from heron import SamplingParams, StructuredOutputsParams
from heron.engine.runner import ModelRunner
from heron.errors import InvalidRequestError
from heron.server.async_engine import AsyncEngine
from heron.structured.grammar import GrammarCompiler
from tests.support.cli import heron
from tests.support.prompts import PHONE

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


def constrained(temperature: float = 1.0, **spec) -> SamplingParams:
    return SamplingParams(
        temperature=temperature,
        max_tokens=80,
        structured_outputs=StructuredOutputsParams(**spec),
    )


def test_json_schema_outputs_validate_for_many_seeds(llm):
    prompts = ["Describe a person as JSON:", "Tell me about the weather."] * 4
    params = [
        SamplingParams(
            temperature=1.0,
            seed=seed,
            max_tokens=80,
            structured_outputs=StructuredOutputsParams(json=SCHEMA),
        )
        for seed in range(len(prompts))
    ]
    for out in llm.generate(prompts, params, use_tqdm=False):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion
        jsonschema.validate(json.loads(completion.text), SCHEMA)


def test_regex_choice_grammar_and_json_object(llm):
    """Without the constraint the model writes prose: each of these would fail unconstrained."""
    free = llm.generate(["Call me at"], SamplingParams(temperature=0, max_tokens=12))
    assert not re.fullmatch(PHONE, free[0].outputs[0].text)
    for seed in range(4):
        params = constrained(regex=PHONE)
        params.seed = seed
        text = llm.generate(["Call me at"], params, use_tqdm=False)[0].outputs[0].text
        assert re.fullmatch(PHONE, text), text
    choices = ["red", "green", "light blue"]
    out = llm.generate(["Name a colour."], constrained(choice=choices), use_tqdm=False)
    assert out[0].outputs[0].text in choices
    grammar = 'root ::= "(" digit ("," digit)* ")"\ndigit ::= [0-9]'
    params = constrained(grammar=grammar)
    params.seed = 0  # unseeded, a sample may count on past max_tokens and never close
    out = llm.generate(["A tuple:"], params, use_tqdm=False)
    assert re.fullmatch(r"\(\d(,\d)*\)", out[0].outputs[0].text), out[0].outputs[0].text
    out = llm.generate(["A JSON object:"], constrained(0.0, json_object=True), use_tqdm=False)
    assert out[0].outputs[0].finish_reason == "stop"
    assert isinstance(json.loads(out[0].outputs[0].text), dict)


def test_batched_with_free_requests_each_gives_what_it_gives_alone(llm):
    prompts = ["Describe a person as JSON:", "Write a haiku about rain.", "Call me at"]
    params = [
        constrained(0.0, json=SCHEMA),
        SamplingParams(temperature=0, max_tokens=24),
        constrained(0.0, regex=PHONE),
    ]
    alone = [
        llm.generate([p], [sp], use_tqdm=False)[0].outputs[0]
        for p, sp in zip(prompts, params, strict=True)
    ]
    together = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    jsonschema.validate(json.loads(together[0].text), SCHEMA)
    assert re.fullmatch(PHONE, together[2].text)


def test_n_samples_each_follow_the_schema(llm):
    params = SamplingParams(
        n=4,
        temperature=1.0,
        seed=7,
        max_tokens=80,
        structured_outputs=StructuredOutputsParams(json=SCHEMA),
    )
    outs = llm.generate(["Describe a person as JSON:"], params, use_tqdm=False)[0].outputs
    assert len(outs) == 4
    for completion in outs:
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(completion.text), SCHEMA)
    assert len({o.text for o in outs}) > 1  # four samples, not one copied


def test_chunked_prefill_and_preemption_keep_the_constraint(heron_runner):
    """Tiny chunks and a KV cache too small for every request at once: sequences are preempted
    and recomputed; greedy outputs equal those of a roomy engine."""
    intro = "Here is a record from the staff database of a small company, written as JSON. "
    prompts = [f"{intro * 2}Person number {i}:" for i in range(6)]
    params = constrained(0.0, json=SCHEMA)
    roomy = heron_runner()
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    per_block = ModelRunner.bytes_per_block(roomy.engine.model_config, 16, torch.float32)
    del roomy
    # 12 blocks of 16 tokens; the six requests need 3-5 each
    tight = heron_runner(
        max_num_batched_tokens=8, kv_cache_memory=12 * per_block, max_model_len=128
    )
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.stats()["num_preemptions"] > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    for o in outs:
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)


def test_ignore_eos_goes_on_with_stop_tokens_only(llm):
    params = SamplingParams(
        temperature=0,
        max_tokens=8,
        ignore_eos=True,
        structured_outputs=StructuredOutputsParams(choice=["yes", "no"]),
    )
    out = llm.generate(["Is water wet?"], params, use_tqdm=False)[0].outputs[0]
    eos = set(llm.engine.eos_token_ids)
    text_ids = [t for t in out.token_ids if t not in eos]
    assert llm.get_tokenizer().decode(text_ids) in ("yes", "no")
    assert len(out.token_ids) == 8 and all(t in eos for t in out.token_ids[len(text_ids) :])


def test_a_slow_compile_does_not_hold_the_running_requests(llm, monkeypatch):
    """The server compiles a request's grammar before handing it to the engine's thread: a
    free request goes on generating while another's compile is stuck."""
    release = threading.Event()
    compile_ = GrammarCompiler._compile

    def stuck(self, spec):
        release.wait(timeout=120)
        return compile_(self, spec)

    monkeypatch.setattr(GrammarCompiler, "_compile", stuck)
    engine = AsyncEngine(llm.engine)
    engine.start()
    tok = llm.get_tokenizer()

    async def run(prompt: str, params: SamplingParams, request_id: str):
        stream = await engine.add(tok.encode(prompt), params, request_id)
        return [out async for out in stream][-1]

    async def both():
        slow = asyncio.ensure_future(run("A person as JSON:", constrained(json=SCHEMA), "slow"))
        free = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        done = await asyncio.wait_for(run("Tell me a story.", free, "free"), timeout=120)
        stuck_then = not slow.done()
        release.set()
        return done, stuck_then, await slow

    try:
        free_out, stuck_then, slow_out = asyncio.run(both())
    finally:
        release.set()
        engine.stop()
    assert len(free_out.outputs[0].token_ids) == 16 and stuck_then
    jsonschema.validate(json.loads(slow_out.outputs[0].text), SCHEMA)


@pytest.mark.parametrize(
    ("spec", "param", "message"),
    [
        ({"json": '{"type": "objec'}, "structured_outputs.json", "not valid JSON"),
        ({"json": {"type": "nonsense"}}, "structured_outputs.json", "nonsense"),
        ({"regex": "(a"}, "structured_outputs.regex", "parenthesis"),
        ({"grammar": 'root ::= "a" |'}, "structured_outputs.grammar", "EBNF"),
        ({"choice": []}, "structured_outputs.choice", "non-empty list"),
        ({"structural_tag": "{"}, "structured_outputs.structural_tag", "not valid JSON"),
        (
            {"structural_tag": {"type": "structural_tag"}},
            "structured_outputs.structural_tag",
            "format",
        ),
        ({"regex": "a", "choice": ["a"]}, "structured_outputs", "exactly one"),
        ({}, "structured_outputs", "exactly one"),
    ],
)
def test_bad_specs_are_invalid_requests(llm, spec, param, message):
    with pytest.raises(InvalidRequestError, match=message) as e:
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(**spec)))
    assert e.value.param == param
    assert not llm.engine.has_unfinished_requests()


def test_refused_beside_speculative_decoding(heron_runner):
    spec_llm = heron_runner(speculative_method="ngram")
    with pytest.raises(InvalidRequestError, match="speculative") as e:
        spec_llm.generate(["x"], constrained(regex="a+"))
    assert e.value.param == "structured_outputs"
    # e's traceback holds this frame: left bound, that cycle would keep spec_llm (and its KV
    # cache) alive after the test, until a garbage collection.
    del e


# ---------------------------------------------------------------------------- the CLI
def heron_cli(*args: str) -> subprocess.CompletedProcess:
    return heron("generate", "--dtype", "float32", *args)


def test_cli_constraint_flags(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    proc = heron_cli("Describe a person.", "--json-schema", str(schema), "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    jsonschema.validate(json.loads(proc.stdout), SCHEMA)
    proc = heron_cli("Is the sky blue?", "--choice", "yes,no")
    assert proc.returncode == 0 and proc.stdout.strip() in ("yes", "no"), proc.stderr
    proc = heron_cli("x", "--regex", "(a")
    assert proc.returncode == 2 and "structured_outputs.regex" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    proc = heron_cli("x", "--regex", "a", "--choice", "a,b")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
