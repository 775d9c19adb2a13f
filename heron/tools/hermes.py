"""The Hermes form, Qwen2.5's and NousResearch Hermes' templates' (and heron's own
system-prompt rendering's): each call is a JSON object on its own lines between tags,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and tool results go back to the model between ``<tool_response>`` tags."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from heron.tools.parser import TOOL_PARSERS, ToolCall, ToolParser

if TYPE_CHECKING:
    from heron.tools.params import Function


@TOOL_PARSERS.register("hermes")
@dataclass
class HermesToolParser(ToolParser):
    start = "<tool_call>"
    end = "</tool_call>"
    separator = "\n"
    call_end = "}\n</tool_call>"

    def writes_calls(self, template: str) -> bool:
        return self.start in template

    def call_begin(self, name: str) -> str:
        return f'{self.start}\n{{"name": {json.dumps(name)}, "arguments": '

    def parse_call(self, body: str) -> ToolCall | None:
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = call.get("arguments", {})
        if not call["name"] or not isinstance(arguments, dict):
            return None
        return ToolCall(call["name"], json.dumps(arguments, ensure_ascii=False))

    def tools_prompt(self, functions: list[Function]) -> str:
        listed = "\n".join(json.dumps(f.to_openai(), ensure_ascii=False) for f in functions)
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listed}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
            "</tool_call>"
        )

    def tool_results(self, results: list[str]) -> str:
        return "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)
