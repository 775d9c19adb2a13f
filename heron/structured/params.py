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
    a list of strings (``choice``), an EBNF grammar in xgrammar's GBNF dialect (``grammar``)
    or an xgrammar structural tag (``structural_tag``, a dict or its JSON text: tagged
    sections such as tool calls, each with its own schema)."""

    json: str | dict | Any | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | dict | None = None

    def __post_init__(self) -> None:
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequestError(
                f"{PARAM}: give exactly one of json, regex, choice, grammar, json_object or "
                f"structural_tag; got {', '.join(given) or 'none'}",
                param=PARAM,
            )
        if self.json is not None:
            object.__setattr__(self, "json", _json_text(self.json, "json", sort_keys=True))
        if self.structural_tag is not None:
            tag = _json_text(self.structural_tag, "structural_tag", sort_keys=False)
            object.__setattr__(self, "structural_tag", tag)
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


def _json_text(value: Any, name: str, sort_keys: bool) -> str:
    """A JSON schema or structural tag as JSON text (a pydantic model class gives its own
    schema); ``sort_keys``: canonical, so equal schemas share a compiled grammar. A structural
    tag keeps its order: the order of a schema's properties there is the order written."""
    model_json_schema = getattr(value, "model_json_schema", None)
    if callable(model_json_schema):
        value = model_json_schema()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(
                f"{PARAM}.{name}: not valid JSON ({e})", param=f"{PARAM}.{name}"
            ) from None
    if not isinstance(value, dict):
        raise InvalidRequestError(
            f"{PARAM}.{name}: must be a JSON object, got {type(value).__name__}",
            param=f"{PARAM}.{name}",
        )
    return json.dumps(value, sort_keys=sort_keys)
