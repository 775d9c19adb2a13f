"""One registry per method family (heron.registry): a method registered in its own module is
reachable by name, and an unknown name, an unknown option or a bad option value gives the
same error through every front end: Python (``LLM(...)``, ``SamplingParams``), the CLI (exit
status 2 and one line, no traceback) and the server (400 naming the parameter)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest

from heron import LLM, SamplingParams
from heron.errors import InvalidRequestError
from heron.kv.registry import KV_POLICIES
from heron.registry import Registry
from heron.sparse.registry import SPARSE_PATTERNS
from heron.speculative.registry import PROPOSERS
from heron.strategies import STRATEGIES, make_strategy
from tests.support.cli import assert_user_error, heron

# (family's registry, a method, its bad options: unknown option, bad value, the option named)
FAMILIES = [
    (KV_POLICIES, "snapkv", {"width": 8}, {"window": 0}, "window"),
    (PROPOSERS, "ngram", {"depth": 2}, {"ngram_min": 0}, "ngram_min"),
    (SPARSE_PATTERNS, "xattention", {"last_q": 8}, {"threshold": 1.5}, "threshold"),
    (STRATEGIES, "majority", {"temperature": 1}, {"answer": "essay"}, "answer"),
]
IDS = [f[0].kind for f in FAMILIES]
# The methods that need options to be built at all.
REQUIRED = {(PROPOSERS.kind, "draft"): {"model": "x"}, (STRATEGIES.kind, "cad"): {"context": "x"}}


def _errors(registry, method, unknown, bad, option):
    """(settings, the parameter named, a piece of the message) of each bad case."""
    return [
        (("nope", None), registry.kind, f"unknown {registry.kind.replace('_', ' ')} 'nope'"),
        ((method, unknown), registry.options_param, f"not an option of {method}"),
        ((method, bad), registry.options_param, f"{registry.options_param}.{option}:"),
    ]


# ---------------------------------------------------------------------------- the registry
def test_a_registered_method_is_reachable_by_name():
    family = Registry("toy_method")

    @family.register("toy")
    @dataclass
    class Toy:
        size: int = 3
        label: str = "a"
        given: int = 0

    @family.register("needy")
    @dataclass
    class Needy:
        model: str

    assert family.names() == ["needy", "toy"] and family.get("toy") is Toy
    assert Toy.name == "toy" and family.make("toy", {"size": 5}) == Toy(size=5)
    assert family.options_param == "toy_method_options"
    assert family.signature("toy") == "toy(size: int = 3, label: str = 'a', given: int = 0)"
    assert str(family.options("needy")[0]) == "model: str (required)"
    with pytest.raises(InvalidRequestError, match="toy_method_options.model: required") as e:
        family.make("needy")
    assert e.value.param == "toy_method_options"
    with pytest.raises(InvalidRequestError, match="an object of option names") as e:
        family.make("toy", [("size", 5)])
    assert e.value.param == "toy_method_options"
    with pytest.raises(ValueError, match="registered twice"):
        family.register("toy")(Toy)
    with pytest.raises(TypeError, match="dataclass"):
        family.register("plain")(type("Plain", (), {}))
    # Fields the caller sets (a strategy's n) are not options.
    assert "n" not in [o.name for o in STRATEGIES.options("majority")]


@pytest.mark.parametrize("registry", [f[0] for f in FAMILIES], ids=IDS)
def test_every_registered_method_is_made_by_name(registry):
    assert registry.names()
    for name in registry.names():
        method = registry.make(name, REQUIRED.get((registry.kind, name)))
        assert type(method).name == name and type(method) is registry.get(name)


@pytest.mark.parametrize(("registry", "method", "unknown", "bad", "option"), FAMILIES, ids=IDS)
def test_registry_errors(registry, method, unknown, bad, option):
    for (name, options), param, message in _errors(registry, method, unknown, bad, option):
        with pytest.raises(InvalidRequestError, match=message) as e:
            registry.make(name, options)
        assert e.value.param == param


# ---------------------------------------------------------------------------- Python
@pytest.mark.parametrize(
    ("registry", "method", "unknown", "bad", "option"), FAMILIES[:3], ids=IDS[:3]
)
def test_llm_refuses_before_loading_the_model(registry, method, unknown, bad, option):
    for (name, options), param, message in _errors(registry, method, unknown, bad, option):
        settings = {registry.kind: name, registry.options_param: options}
        with pytest.raises(InvalidRequestError, match=message) as e:
            LLM(model="no-such-model", **settings)  # a model it would fail to find
        assert e.value.param == param


def test_a_request_refuses_its_own_kv_policy_and_strategy(llm):
    for (name, options), param, message in _errors(*FAMILIES[0]):
        params = SamplingParams(max_tokens=2, kv_policy=name, kv_policy_options=options)
        with pytest.raises(InvalidRequestError, match=message) as e:
            llm.generate("Hello", params, use_tqdm=False)
        assert e.value.param == param
    for (name, options), param, message in _errors(*FAMILIES[3]):
        with pytest.raises(InvalidRequestError, match=message) as e:
            llm.generate("Hello", SamplingParams(n=2), strategy=make_strategy(name, 2, options))
        assert e.value.param == param
    with pytest.raises(InvalidRequestError, match="set kv_policy too") as e:
        SamplingParams(kv_policy_options={"window": 8})
    assert e.value.param == "kv_policy_options"
    assert not llm.engine.has_unfinished_requests()


# ---------------------------------------------------------------------------- the CLI
def _flags(registry, name, options) -> list[str]:
    flags = ["--" + registry.kind.replace("_", "-"), name]
    option_flag = "--" + registry.options_param.removesuffix("s").replace("_", "-")
    for key, value in (options or {}).items():
        flags += [option_flag, f"{key}={value}"]
    return flags


@pytest.mark.parametrize(("registry", "method", "unknown", "bad", "option"), FAMILIES, ids=IDS)
def test_cli_errors(registry, method, unknown, bad, option):
    """``generate`` for every family, ``serve`` for the engine's: each fails before a model
    loads (no such model is given)."""
    commands = [["generate", "hi"]]
    if registry is not STRATEGIES:
        commands.append(["serve"])
    for command in commands:
        for (name, options), _, message in _errors(registry, method, unknown, bad, option):
            proc = heron(*command, "-m", "no-such-model", *_flags(registry, name, options))
            # argparse refuses an unknown name itself, listing the choices
            assert_user_error(proc, "invalid choice: 'nope'" if name == "nope" else message)


def test_cli_help_lists_each_methods_options():
    proc = heron("serve", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for registry in (KV_POLICIES, PROPOSERS, SPARSE_PATTERNS):
        for name in registry.names():
            assert " ".join(registry.signature(name).split()) in text, name
    proc = heron("generate", "--kv-policy-option", "window8")
    assert_user_error(proc, "--kv-policy-option: expected KEY=VALUE")


# ---------------------------------------------------------------------------- the server
@pytest.mark.parametrize(
    ("registry", "method", "unknown", "bad", "option"),
    [FAMILIES[0], FAMILIES[3]],
    ids=[IDS[0], IDS[3]],
)
def test_server_errors(server, registry, method, unknown, bad, option):
    for (name, options), param, message in _errors(registry, method, unknown, bad, option):
        body = {"prompt": "Hello", "max_tokens": 2, "n": 2, registry.kind: name}
        body[registry.options_param] = options
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and message in error["message"], error
