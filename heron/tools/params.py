"""What a chat request offers the model to call: OpenAI's ``tools`` and ``tool_choice``,
checked once for the server and ``LLM.chat`` alike."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from heron.errors import InvalidRequestError
from heron.structured.grammar import xgrammar_message, xgrammar_module

# OpenAI's rule for a function's name
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MODES = ("none", "auto", "required")


@dataclass(frozen=True)
class Function:
    """One callable function: its name, what it does, and its arguments' JSON schema."""

    name: str
    description: str | None
    parameters: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        """As a ``tools`` entry (what chat templates render)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolParams:
    """``tools``: OpenAI's list of ``{"type": "function", "function": {"name", "description",
    "parameters"}}``. ``tool_choice``: ``"none"`` (no call: the tools are not shown),
    ``"auto"`` (the model chooses; the default with tools), ``"required"`` (one call or more)
    or ``{"type": "function", "function": {"name": NAME}}`` (exactly that call)."""

    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: tuple[Function, ...] = field(init=False)
    mode: str = field(init=False)  # "none" | "auto" | "required" | "named"
    named: Function | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        tools = self.tools or []
        if not isinstance(tools, list):
            raise InvalidRequestError(
                f"tools: a list of functions, got {type(tools).__name__}", param="tools"
            )
        functions = tuple(_function(i, tool) for i, tool in enumerate(tools))
        names = [f.name for f in functions]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InvalidRequestError(
                f"tools: function names must be unique; {', '.join(twice)} given twice",
                param="tools",
            )
        object.__setattr__(self, "functions", functions)
        choice = self.tool_choice
        if choice is None:
            object.__setattr__(self, "mode", "auto" if functions else "none")
            return
        if isinstance(choice, str):
            if choice not in MODES:
                raise InvalidRequestError(
                    f"tool_choice: one of none, auto, required or "
                    f'{{"type": "function", "function": {{"name": ...}}}}; got {choice!r}',
                    param="tool_choice",
                )
            mode = choice
        else:
            object.__setattr__(self, "named", self._named(choice))
            mode = "named"
        if mode != "none" and not functions:
            raise InvalidRequestError(
                f"tool_choice: {mode!r} needs tools; none were given", param="tool_choice"
            )
        object.__setattr__(self, "mode", mode)

    @property
    def offered(self) -> bool:
        """Whether the model is shown the tools and its answer read for calls."""
        return self.mode != "none"

    def _named(self, choice: Any) -> Function:
        valid = isinstance(choice, dict) and choice.get("type", "function") == "function"
        function = choice.get("function") if valid else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise InvalidRequestError(
                'tool_choice: expected {"type": "function", "function": {"name": ...}}, '
                f"got {json.dumps(choice, default=repr)[:200]}",
                param="tool_choice",
            )
        for f in self.functions:
            if f.name == name:
                return f
        known = ", ".join(f.name for f in self.functions) or "none"
        raise InvalidRequestError(
            f"tool_choice: no function named {name!r} in tools (given: {known})",
            param="tool_choice",
        )


def _function(i: int, tool: Any) -> Function:
    """``tools[i]`` checked: its name, description and parameters' schema."""
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise InvalidRequestError(
            f'{where}: expected {{"type": "function", "function": {{...}}}}', param="tools"
        )
    function = tool.get("function")
    if not isinstance(function, dict):
        raise InvalidRequestError(
            f"{where}.function: an object with name, description and parameters is required",
            param="tools",
        )
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequestError(
            f"{where}.function.name: 1 to 64 letters, digits, _ or -; got {name!r}",
            param="tools",
        )
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidRequestError(f"{where}.function.description: a string", param="tools")
    # No parameters: a function without arguments (OpenAI's meaning).
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise InvalidRequestError(
            f"{where}.function.parameters: a JSON schema object, got {type(parameters).__name__}",
            param="tools",
        )
    why = _schema_error(json.dumps(parameters, sort_keys=True))
    if why is not None:
        raise InvalidRequestError(f"{where}.function.parameters: {why}", param="tools")
    return Function(name, description, parameters)


@functools.lru_cache(maxsize=256)
def _schema_error(schema: str) -> str | None:
    """Why xgrammar cannot turn the schema into a grammar (it is not a valid schema, or uses
    what xgrammar does not support), else None: a schema that would fail only once a call is
    forced is refused whatever the tool_choice."""
    xgr = xgrammar_module()
    try:
        xgr.Grammar.from_json_schema(schema)
    except RuntimeError as e:
        return xgrammar_message(e)
    return None
