"""Methods by name, one ``Registry`` per family: KV policies, speculative proposers, sparse
prefill patterns, decoding strategies, tool-call parsers.

A method is a dataclass registered under its name (``@KV_POLICIES.register("snapkv")``) in its
own module of the family's package, which the registry imports the first time a name is looked
up: adding a method touches its module and its test, nothing else. Its fields are its options,
typed and defaulted, and its ``__post_init__`` checks their values. What a method needs of a
running engine (a runner, a block manager...) is never an option: the family hands it over
after construction. So every front end (Python, the CLI, the HTTP server) reaches a method the
same way, ``registry.make(name, options)``, and a bad name, an unknown option or a bad value
gives the same ``InvalidRequestError``: the family's ``kind`` (``kv_policy``) names an unknown
method, its ``options_param`` (``kv_policy_options``) a bad option."""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from heron.errors import InvalidRequestError

T = TypeVar("T")
C = TypeVar("C", bound=type)


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """One option of a method, for help texts and docs."""

    name: str
    type: str  # as annotated, e.g. "int" or "float | None"
    default: Any = dataclasses.MISSING  # MISSING: the option is required

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def __str__(self) -> str:
        if self.required:
            return f"{self.name}: {self.type} (required)"
        return f"{self.name}: {self.type} = {self.default!r}"


class Registry(Generic[T]):
    """The methods of one family. ``kind``: the parameter that names a method (an
    EngineConfig field or request field, e.g. ``kv_policy``); ``options_param``: the one that
    holds its options (default ``<kind>_options``); ``given``: fields that are set by the
    caller, not options (a strategy's ``n``); ``package``: the family's package, whose
    modules register its methods."""

    def __init__(
        self,
        kind: str,
        package: str,
        options_param: str | None = None,
        given: Iterable[str] = (),
    ) -> None:
        self.kind = kind
        self.package = package
        self.options_param = options_param or f"{kind}_options"
        self.given = frozenset(given)
        self._registered: dict[str, type[T]] = {}
        self._discovered = False
        # Server threads may look up names at once: one imports the package's modules while
        # the others wait. Re-entrant: a module being imported may look up a name itself.
        self._discovery = threading.RLock()
        self._discovering = False

    @property
    def _methods(self) -> dict[str, type[T]]:
        """The registered methods, once every module of the family's package is imported
        (each registers its methods as it loads)."""
        if not self._discovered:
            with self._discovery:
                if not self._discovered and not self._discovering:
                    self._discovering = True
                    try:
                        path = importlib.import_module(self.package).__path__
                        for module in pkgutil.iter_modules(path):
                            importlib.import_module(f"{self.package}.{module.name}")
                        self._discovered = True
                    finally:
                        self._discovering = False
        return self._registered

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator: the class is the method ``name`` (which it gets as ``name``)."""

        def deco(cls: C) -> C:
            if name in self._registered:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"{self.kind} {name!r}: a method is a dataclass of its options")
            cls.name = name
            self._registered[name] = cls
            return cls

        return deco

    def names(self) -> list[str]:
        return sorted(self._methods)

    def get(self, name: str) -> type[T]:
        cls = self._methods.get(name) if isinstance(name, str) else None
        if cls is None:
            raise InvalidRequestError(
                f"{self.kind}: unknown {self.kind.replace('_', ' ')} {name!r}; known: "
                f"{', '.join(self.names())}",
                param=self.kind,
            )
        return cls

    def options(self, name: str) -> list[OptionInfo]:
        """The options of method ``name``, in declaration order."""
        out = []
        for f in dataclasses.fields(self.get(name)):
            if not f.init or f.name in self.given:
                continue
            default = f.default
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            out.append(
                OptionInfo(f.name, f.type if isinstance(f.type, str) else f.type.__name__, default)
            )
        return out

    def signature(self, name: str) -> str:
        """``name(option: type = default, ...)``: a method and its options on one line."""
        return f"{name}({', '.join(map(str, self.options(name)))})"

    def make(self, name: str, options: Mapping[str, Any] | None = None, **given: Any) -> T:
        """Method ``name`` with ``options`` (from Python, the CLI or JSON) and the ``given``
        fields the caller sets."""
        cls = self.get(name)
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise InvalidRequestError(
                f"{self.options_param}: an object of option names to values, got "
                f"{type(options).__name__}",
                param=self.options_param,
            )
        known = self.options(name)
        unknown = sorted(set(options) - {o.name for o in known})
        if unknown:
            raise InvalidRequestError(
                f"{self.options_param}: {', '.join(map(str, unknown))} not an option of {name}; "
                f"its options: {', '.join(o.name for o in known) or 'none'}",
                param=self.options_param,
            )
        missing = [o.name for o in known if o.required and o.name not in options]
        if missing:
            raise InvalidRequestError(
                f"{self.options_param}.{missing[0]}: required by {name}",
                param=self.options_param,
            )
        return cls(**options, **given)

    def check(self, ok: bool, option: str, message: str) -> None:
        """A method's check of one of its options (in its ``__post_init__``): options arrive
        from Python, the CLI and JSON, one error shape for all."""
        if not ok:
            raise InvalidRequestError(
                f"{self.options_param}.{option}: {message}", self.options_param
            )

    def check_int(self, option: str, value: object, minimum: int) -> None:
        """An integer option that must be at least ``minimum``."""
        self.check(
            is_int(value) and value >= minimum, option, f"an integer >= {minimum}; got {value!r}"
        )


def is_int(value: object) -> bool:
    """An integer and not a bool (JSON's and Python's ``true`` is an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_options(pairs: Iterable[str] | None, param: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings (the CLI's ``--*-option`` flags) as options: a JSON value
    (number, true, null...) where the value parses as one, else the plain string."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequestError(f"{param}: expected KEY=VALUE, got {pair!r}", param=param)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options
