"""Forcing calls: ``tool_choice`` ``"required"`` or a named function becomes an xgrammar
structural tag, decoded by the structured-output plugin like any other constraint. Each
call's fixed text (its tags and name) comes from the parser, its arguments follow the
function's parameters schema, so even a small model writes calls that parse and validate."""

from __future__ import annotations

from typing import Any

from heron.structured import StructuredOutputsParams
from heron.tools.params import Function, ToolParams
from heron.tools.parser import ToolParser


def forced_calls(tools: ToolParams, parser: ToolParser) -> StructuredOutputsParams | None:
    """The constraint for the request's ``tool_choice``: one call of the named function, or
    one call or more of any of them (``"required"``); None when the model chooses."""
    if tools.mode == "named":
        form: dict[str, Any] = _call(tools.named, parser)  # type: ignore[arg-type]
    elif tools.mode == "required":
        form = {
            "type": "tags_with_separator",
            "tags": [_call(f, parser) for f in tools.functions],
            "separator": parser.separator,
            "at_least_one": True,
        }
    else:
        return None
    return StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": form})


def _call(function: Function, parser: ToolParser) -> dict[str, Any]:
    return {
        "type": "tag",
        "begin": parser.call_begin(function.name),
        "content": {"type": "json_schema", "json_schema": function.parameters},
        "end": parser.call_end,
    }
