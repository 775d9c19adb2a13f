"""Reading tool calls out of what a model wrote: one parser per template family (how its
chat template tells the model to write a call), registered by name in ``TOOL_PARSERS``.

A parser reads text as it streams: text outside calls is content, passed on as it comes;
from a call's opening tag on, text is held until its closing tag, then the whole call is
parsed (a body that does not parse stays content, as written). The whole text read at once
goes through the same reader, so streamed and whole responses give the same calls."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from heron.registry import Registry

if TYPE_CHECKING:
    from heron.tools.params import Function

TOOL_PARSERS: Registry[ToolParser] = Registry("tool_parser", "heron.tools")


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class AssistantMessage:
    """A reply read for calls: the text outside them (None if there is none beside calls)
    and the calls, in order."""

    content: str | None
    tool_calls: list[ToolCall]

    def to_openai(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return message


class ToolParser:
    """A family's call syntax: ``call_begin(name) + arguments JSON + call_end``, between
    ``start`` and ``end`` tags, calls separated by ``separator``. Subclasses are dataclasses
    registered with ``@TOOL_PARSERS.register(name)``."""

    name: ClassVar[str]
    start: ClassVar[str]  # a call's opening tag
    end: ClassVar[str]  # its closing tag
    separator: ClassVar[str]  # between two calls
    call_end: ClassVar[str]  # a call's text after its arguments

    def writes_calls(self, template: str) -> bool:
        """Whether a chat template (its source) tells the model to write calls this way."""
        raise NotImplementedError

    def call_begin(self, name: str) -> str:
        """A call's text up to its arguments (a forced call's fixed part)."""
        raise NotImplementedError

    def parse_call(self, body: str) -> ToolCall | None:
        """The call between ``start`` and ``end``, or None if it is malformed."""
        raise NotImplementedError

    def tools_prompt(self, functions: list[Function]) -> str:
        """For templates that do not render tools: the system prompt's part that lists the
        functions and shows how to call them."""
        raise NotImplementedError

    def tool_results(self, results: list[str]) -> str:
        """For templates that do not render tool results: consecutive results as one user
        message's text."""
        raise NotImplementedError

    def format_call(self, name: str, arguments: dict[str, Any]) -> str:
        """A past call as the model would have written it."""
        return self.call_begin(name) + json.dumps(arguments, ensure_ascii=False) + self.call_end

    def reader(self) -> ToolCallReader:
        return ToolCallReader(self)

    def parse(self, text: str) -> AssistantMessage:
        """A whole reply's content and calls."""
        reader = self.reader()
        content, _ = reader.feed(text)
        return reader.message(content + reader.finish())


class ToolCallReader:
    """Reads one reply as it streams. ``feed`` returns the content that can be passed on and
    the calls completed, ``finish`` the content held until the end. Whitespace between
    content and a call (the newlines around tags) is not content; a call's opening tag, or
    what may be its start at the end of the text so far, is held back, and so is trailing
    whitespace until what follows it is known."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.calls: list[ToolCall] = []
        self._pending = ""  # text not yet read (a tag may be starting)
        self._in_call = False
        self._space = ""  # whitespace held: content if text follows, dropped if a call does
        self._after_call = False  # a call came after the last content
        self._wrote = False  # some content was passed on

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        p = self.parser
        self._pending += text
        out: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self._in_call:
                at = self._pending.find(p.end)
                if at < 0:
                    break
                body, self._pending = self._pending[:at], self._pending[at + len(p.end) :]
                self._in_call = False
                call = p.parse_call(body)
                if call is None:  # malformed: the text stays, as written
                    out.append(self._content(p.start + body + p.end))
                else:
                    calls.append(call)
                    self._space, self._after_call = "", True
                continue
            at = self._pending.find(p.start)
            if at >= 0:
                out.append(self._content(self._pending[:at]))
                self._pending = self._pending[at + len(p.start) :]
                self._in_call = True
                continue
            keep = _partial_suffix(self._pending, p.start)
            out.append(self._content(self._pending[: len(self._pending) - keep]))
            self._pending = self._pending[len(self._pending) - keep :]
            break
        self.calls += calls
        return "".join(out), calls

    def finish(self) -> str:
        """The end of the reply: what was held is content (an unclosed call included), but
        for whitespace after the last call."""
        rest = (self.parser.start if self._in_call else "") + self._pending
        self._pending, self._in_call = "", False
        content = self._content(rest) + ("" if self._after_call else self._space)
        self._space = ""
        return content

    def message(self, content: str) -> AssistantMessage:
        """The reply whose content was ``content`` (all ``feed`` and ``finish`` gave)."""
        return AssistantMessage(content if content or not self.calls else None, list(self.calls))

    def _content(self, text: str) -> str:
        text = self._space + text
        if self._after_call and not self._wrote:
            text = text.lstrip()  # a reply that opened with calls: no leading newline
        stripped = text.rstrip()
        self._space = text[len(stripped) :]
        if stripped:
            self._wrote, self._after_call = True, False
        return stripped


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
