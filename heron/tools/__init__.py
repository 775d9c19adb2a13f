"""Tool calling on chat requests: OpenAI's ``tools`` and ``tool_choice`` (params), shown to
the model by its chat template or heron's own rendering (chat), calls read back by one
parser per template family (parser, hermes) and forced by a grammar where asked
(grammar). Used by the server and ``LLM.chat``; the engine only sees a prompt and a
constraint."""

from heron.tools.chat import ChatPrompt, prepare_chat
from heron.tools.params import Function, ToolParams
from heron.tools.parser import TOOL_PARSERS, AssistantMessage, ToolCall, ToolParser

__all__ = [
    "TOOL_PARSERS",
    "AssistantMessage",
    "ChatPrompt",
    "Function",
    "ToolCall",
    "ToolParams",
    "ToolParser",
    "prepare_chat",
]
