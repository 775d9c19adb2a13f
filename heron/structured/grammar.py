"""Compiling a request's constraint into an xgrammar grammar over the model's vocabulary, once
per (tokenizer, spec): later requests with the same schema reuse it."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING

from heron.errors import InvalidRequestError
from heron.structured.params import PARAM, StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar

    from heron.tokenizer import Tokenizer

# A pathological regex or schema may take long to compile: the request is refused instead of
# holding the engine. The compile goes on in its worker and is cached if it ever finishes.
COMPILE_TIMEOUT_S = 10.0
_compile_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="heron-grammar")
# xgrammar prefixes its errors with "[hh:mm:ss] /path/file.cc:123: "
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def xgrammar_module():
    """xgrammar, or a clear error where it is not installed."""
    try:
        import xgrammar
    except ImportError:
        raise InvalidRequestError(
            f"{PARAM}: constrained decoding needs xgrammar: pip install xgrammar==0.2.8",
            param=PARAM,
        ) from None
    return xgrammar


def xgrammar_message(error: RuntimeError) -> str:
    """The first line of an xgrammar error, without its time and source location."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return _XGRAMMAR_PREFIX.sub("", lines[0])


class GrammarCompiler:
    """One engine's compiler: the tokenizer's vocabulary as xgrammar sees it, and its cache."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        xgr = xgrammar_module()
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer.hf, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2)
        self.stop_token_ids = stop_token_ids

    def compile(self, spec: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        """The compiled grammar; a spec that does not compile, or not within
        ``COMPILE_TIMEOUT_S``, is an ``InvalidRequestError`` naming its field."""
        param = f"{PARAM}.{spec.kind}"
        future = _compile_pool.submit(self._compile, spec)
        try:
            return future.result(timeout=COMPILE_TIMEOUT_S)
        except FutureTimeout:
            raise InvalidRequestError(
                f"{param}: did not compile within {COMPILE_TIMEOUT_S:.0f} s; simplify it",
                param=param,
            ) from None
        except RuntimeError as e:  # xgrammar's parse and conversion errors
            raise InvalidRequestError(f"{param}: {xgrammar_message(e)}", param=param) from None

    def _compile(self, spec: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        c = self.compiler
        if spec.json is not None:
            return c.compile_json_schema(spec.json)
        if spec.json_object:
            return c.compile_builtin_json_grammar()
        if spec.regex is not None:
            return c.compile_regex(spec.regex)
        if spec.choice is not None:
            return c.compile_grammar(choice_grammar(spec.choice))
        if spec.structural_tag is not None:
            return c.compile_structural_tag(spec.structural_tag)
        return c.compile_grammar(spec.grammar)

    def matcher(self, grammar: xgrammar.CompiledGrammar) -> xgrammar.GrammarMatcher:
        """A fresh matcher that ends on the engine's own stop tokens."""
        xgr = xgrammar_module()
        return xgr.GrammarMatcher(grammar, override_stop_tokens=self.stop_token_ids)


def choice_grammar(choices: list[str]) -> str:
    """EBNF for exactly one of ``choices`` (JSON string escapes are the grammar's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=True) for c in choices)
