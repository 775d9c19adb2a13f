"""Tool-call parsers by name (``parser.TOOL_PARSERS``), one per template family, for the
server and ``LLM.chat``. Importing this module registers every parser."""

import heron.tools.hermes  # noqa: F401  (each parser registers in its module)
from heron.tools.parser import TOOL_PARSERS

__all__ = ["TOOL_PARSERS"]
