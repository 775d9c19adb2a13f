"""What a request constrains its output to: vLLM's ``StructuredOutputsParams``."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from heron.errors import InvalidRequestError

PARAM = "structured_outputs"


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint: a JSON schema (``json``, a dict, its JSON text or a pydantic
    model class), any JSON object (``json_object``), a regular expression (``regex``), one of
    a list of strings (``choice``) or an EBNF grammar in xgrammar's GBNF dialect
    (``grammar``)."""

    json: str | dict | Any | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequestError(
                f"{PARAM}: give exactly one of json, regex, choice, grammar or json_object; "
                f"got {', '.join(given) or 'none'}",
                param=PARAM,
            )
        if self.json is not None:
            object.__setattr__(self, "json", _schema_text(self.json))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidRequestError(
                    f"{PARAM}.{name}: must be a non-empty string", param=f"{PARAM}.{name}"
                )
        if self.choice is not None:
            choice = self.choice
            if (
                isinstance(choice, str)
                or not choice
                or not all(isinstance(c, str) and c for c in choice)
            ):
                raise InvalidRequestError(
                    f"{PARAM}.choice: must be a non-empty list of non-empty strings",
                    param=f"{PARAM}.choice",
                )
            object.__setattr__(self, "choice", list(choice))

    @property
    def kind(self) -> str:
        """Which constraint this is (the field's name)."""
        return next(f.name for f in fields(self) if getattr(self, f.name) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the compiled grammar (equal specs share one)."""
        value = getattr(self, self.kind)
        return self.kind, value if isinstance(value, str) else json.dumps(value)


def _schema_text(schema: Any) -> str:
    """A JSON schema as canonical JSON text (a pydantic model class gives its own schema)."""
    model_json_schema = getattr(schema, "model_json_schema", None)
    if callable(model_json_schema):
        schema = model_json_schema()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(
                f"{PARAM}.json: not valid JSON ({e})", param=f"{PARAM}.json"
            ) from None
    if not isinstance(schema, dict):
        raise InvalidRequestError(
            f"{PARAM}.json: a JSON schema must be an object, got {type(schema).__name__}",
            param=f"{PARAM}.json",
        )
    return json.dumps(schema, sort_keys=True)
