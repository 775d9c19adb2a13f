"""One registry per method family (heron.registry): a method registered in its own module is
reachable by name, and an unknown name, an unknown option or a bad option value gives the
same error through every front end: here the registries and ``LLM(...)`` before a model
loads; a running engine and the CLI (exit status 2 and one line, no traceback) in
tests/integration/test_registry_front_ends.py, the server (400 naming the parameter) in
tests/server/test_server_errors.py."""

from __future__ import annotations

import concurrent.futures
import importlib
import sys
from dataclasses import dataclass

import pytest

from heron import LLM
from heron.errors import InvalidRequestError
from heron.speculative.registry import PROPOSERS
from heron.strategies import STRATEGIES
from tests.support.methods import FAMILIES, IDS, error_cases

# The methods that need options to be built at all.
REQUIRED = {(PROPOSERS.kind, "draft"): {"model": "x"}, (STRATEGIES.kind, "cad"): {"context": "x"}}


# ---------------------------------------------------------------------------- the registry
def test_a_registered_method_is_reachable_by_name(tmp_path, monkeypatch):
    # A family's package: a method registered in its own module is found without an import.
    package = tmp_path / "toy_family"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "base.py").write_text(
        "from heron.registry import Registry\nTOYS = Registry('toy_method', 'toy_family')\n"
    )
    (package / "shiny.py").write_text(
        "from dataclasses import dataclass\nfrom toy_family.base import TOYS\n\n"
        "@TOYS.register('shiny')\n@dataclass\nclass Shiny:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    family = importlib.import_module("toy_family.base").TOYS
    assert "toy_family.shiny" not in sys.modules

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

    assert family.names() == ["needy", "shiny", "toy"] and family.get("toy") is Toy
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


def test_threads_looking_up_at_once_all_find_the_methods(tmp_path, monkeypatch):
    """The first lookup imports the family's modules; a server thread that looks up a name
    meanwhile waits for them instead of finding none."""
    package = tmp_path / "slow_family"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "base.py").write_text(
        "from heron.registry import Registry\nSLOW = Registry('slow_method', 'slow_family')\n"
    )
    (package / "late.py").write_text(  # slow to import: the other threads arrive meanwhile
        "import time\nfrom dataclasses import dataclass\nfrom slow_family.base import SLOW\n\n"
        "time.sleep(0.5)\n\n\n@SLOW.register('late')\n@dataclass\nclass Late:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    family = importlib.import_module("slow_family.base").SLOW
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        seen = list(pool.map(lambda _: family.names(), range(4)))
    assert seen == [["late"]] * 4


@pytest.mark.parametrize("registry", [f[0] for f in FAMILIES], ids=IDS)
def test_every_registered_method_is_made_by_name(registry):
    assert registry.names()
    for name in registry.names():
        method = registry.make(name, REQUIRED.get((registry.kind, name)))
        assert type(method).name == name and type(method) is registry.get(name)


@pytest.mark.parametrize(("registry", "method", "unknown", "bad", "option"), FAMILIES, ids=IDS)
def test_registry_errors(registry, method, unknown, bad, option):
    for (name, options), param, message in error_cases(registry, method, unknown, bad, option):
        with pytest.raises(InvalidRequestError, match=message) as e:
            registry.make(name, options)
        assert e.value.param == param


# ---------------------------------------------------------------------------- Python
@pytest.mark.parametrize(
    ("registry", "method", "unknown", "bad", "option"), FAMILIES[:3], ids=IDS[:3]
)
def test_llm_refuses_before_loading_the_model(registry, method, unknown, bad, option):
    for (name, options), param, message in error_cases(registry, method, unknown, bad, option):
        settings = {registry.kind: name, registry.options_param: options}
        with pytest.raises(InvalidRequestError, match=message) as e:
            LLM(model="no-such-model", **settings)  # a model it would fail to find
        assert e.value.param == param
