"""Structured output: constrain what a request generates to a JSON schema, a regular
expression, a list of choices or a grammar (xgrammar), as an engine plugin."""

from heron.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
