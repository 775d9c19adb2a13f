"""A chat request with tools, made ready for the model's chat template.

Where the template renders tools itself (it uses ``tools`` and writes calls in a form a
registered parser reads, as Qwen2.5's does) it gets the tools, past calls with their
arguments as objects and ``role: "tool"`` results, as transformers' templates expect. Any
other template gets heron's rendering in plain messages: the functions and how to call them
(the Hermes form) at the end of the system message, past calls written out in the
assistant's text, results as a user message between ``<tool_response>`` tags."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from heron.errors import InvalidRequestError
from heron.tools.grammar import forced_calls
from heron.tools.parser import TOOL_PARSERS, ToolParser

if TYPE_CHECKING:
    from heron.config import SamplingParams
    from heron.structured import StructuredOutputsParams
    from heron.tokenizer import Tokenizer
    from heron.tools.params import ToolParams

FALLBACK_PARSER = "hermes"  # the form of heron's own rendering
_USES_TOOLS = re.compile(r"\btools\b")


@dataclass
class ChatPrompt:
    """``messages`` and ``tools`` for the chat template; ``parser``: how the reply is read for
    calls (None: it is not); ``constraint``: the grammar that forces the calls, if any."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    parser: ToolParser | None
    constraint: StructuredOutputsParams | None

    def sampling_params(self, params: SamplingParams) -> SamplingParams:
        """``params`` with the forced calls' constraint; another constraint beside it is an
        error (the output cannot follow both)."""
        if self.constraint is None:
            return params
        if params.structured_outputs is not None:
            raise InvalidRequestError(
                "tool_choice: 'required' or a named function constrains the output; it cannot "
                "be combined with response_format or structured_outputs",
                param="tool_choice",
            )
        return replace(params, structured_outputs=self.constraint)


def template_format(tokenizer: Tokenizer) -> tuple[ToolParser, bool]:
    """The parser for calls in this model's replies, and whether its template renders tools
    (else heron does, in the fallback parser's form)."""
    template = tokenizer.hf.chat_template or ""
    if isinstance(template, dict):  # named templates ("default", "tool_use")
        template = "\n".join(template.values())
    if _USES_TOOLS.search(template):
        for name in TOOL_PARSERS.names():
            parser = TOOL_PARSERS.make(name)
            if parser.writes_calls(template):
                return parser, True
    return TOOL_PARSERS.make(FALLBACK_PARSER), False


def prepare_chat(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: ToolParams | None
) -> ChatPrompt:
    """``messages`` (OpenAI's form: assistant ``tool_calls`` with arguments as JSON text or
    objects, ``role: "tool"`` results) and ``tools`` as the model's template takes them."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise InvalidRequestError(
                f"messages[{i}] must be a dict with 'role' and 'content'", param="messages"
            )
    parser, renders_tools = template_format(tokenizer)
    functions = list(tools.functions) if tools is not None and tools.offered else []
    if renders_tools:
        messages = [_template_message(i, m) for i, m in enumerate(messages)]
    else:
        messages = _written_out(messages, parser)
        if functions:
            messages = _with_tools_prompt(messages, parser.tools_prompt(functions))
    if tools is None or not functions:
        return ChatPrompt(messages, None, None, None)
    listed = [f.to_openai() for f in functions] if renders_tools else None
    return ChatPrompt(messages, listed, parser, forced_calls(tools, parser))


def _calls(i: int, message: dict[str, Any]) -> list[tuple[str | None, str, dict[str, Any]]]:
    """An assistant message's past calls: (id, name, arguments as an object)."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise InvalidRequestError(f"messages[{i}].tool_calls: a list", param="messages")
    out = []
    for k, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{k}]"
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise InvalidRequestError(
                f'{where}: expected {{"function": {{"name": ..., "arguments": ...}}}}',
                param="messages",
            )
        arguments = function.get("arguments", {})  # type: ignore[union-attr]
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise InvalidRequestError(
                    f"{where}.function.arguments: not valid JSON ({e})", param="messages"
                ) from None
        if not isinstance(arguments, dict):
            raise InvalidRequestError(
                f"{where}.function.arguments: a JSON object", param="messages"
            )
        out.append((call.get("id"), name, arguments))
    return out


def _template_message(i: int, message: dict[str, Any]) -> dict[str, Any]:
    """A message for a template that renders calls: arguments as objects, and a caller's
    content (null beside calls) as a string."""
    if not message.get("tool_calls"):
        return message
    calls = [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
        for call_id, name, args in _calls(i, message)
    ]
    return {**message, "content": message.get("content") or "", "tool_calls": calls}


def _written_out(messages: list[dict[str, Any]], parser: ToolParser) -> list[dict[str, Any]]:
    """Past calls and results as plain messages: calls in the assistant's text, consecutive
    results in one user message."""
    out: list[dict[str, Any]] = []
    results: list[str] = []
    for i, m in enumerate(messages):
        if m.get("role") == "tool":
            results.append(m.get("content") or "")
            continue
        if results:
            out.append({"role": "user", "content": parser.tool_results(results)})
            results = []
        calls = _calls(i, m) if m.get("tool_calls") else []
        if calls:
            written = parser.separator.join(parser.format_call(n, a) for _, n, a in calls)
            text = m.get("content") or ""
            m = {"role": m["role"], "content": f"{text}\n{written}" if text else written}
        out.append(m)
    if results:
        out.append({"role": "user", "content": parser.tool_results(results)})
    return out


def _with_tools_prompt(messages: list[dict[str, Any]], prompt: str) -> list[dict[str, Any]]:
    """The tools' description at the end of the system message (a new one if there is none)."""
    if messages and messages[0].get("role") == "system":
        system = messages[0].get("content") or ""
        content = f"{system}\n\n{prompt}" if system else prompt
        return [{**messages[0], "content": content}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]
