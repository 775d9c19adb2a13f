"""One registry per method family (heron.registry), through the front ends around the real
engine: a request's own KV policy and strategy are refused by the running engine, and the
CLI refuses every family's bad names and options with exit status 2 and one line, no
traceback. The registries themselves: tests/unit/test_registry.py; the server:
tests/server/test_server_errors.py."""

from __future__ import annotations

import pytest

from heron import SamplingParams
from heron.errors import InvalidRequestError
from heron.kv.registry import KV_POLICIES
from heron.sparse.patterns import SPARSE_PATTERNS
from heron.speculative.registry import PROPOSERS
from heron.strategies import STRATEGIES, make_strategy
from tests.support.cli import assert_user_error, heron
from tests.support.methods import FAMILIES, IDS, error_cases


def test_a_request_refuses_its_own_kv_policy_and_strategy(llm):
    for (name, options), param, message in error_cases(*FAMILIES[0]):
        params = SamplingParams(max_tokens=2, kv_policy=name, kv_policy_options=options)
        with pytest.raises(InvalidRequestError, match=message) as e:
            llm.generate("Hello", params, use_tqdm=False)
        assert e.value.param == param
    for (name, options), param, message in error_cases(*FAMILIES[3]):
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
        for (name, options), _, message in error_cases(registry, method, unknown, bad, option):
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
