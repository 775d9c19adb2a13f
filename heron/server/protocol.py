"""OpenAI request bodies as pydantic models, with heron's extras (vLLM's names) beside them.

Field types and the API's own limits (temperature <= 2, ...) are checked here, so a bad value
is a 400 naming the field before any work starts; the sampling values are then checked by
``SamplingParams``, which alone holds the penalties' ranges (shared with LLM and the CLI), the
tools by ``ToolParams`` (shared with LLM.chat). Fields OpenAI defines but heron does not
implement (logit_bias, ...) are refused with a clear message when set, rather than silently
ignored; unknown extra fields are ignored, as vLLM and OpenAI's own server do for forward
compatibility."""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
)

from heron.config import SamplingParams
from heron.errors import InvalidRequestError
from heron.strategies import Strategy, make_strategy
from heron.structured import StructuredOutputsParams
from heron.tokenizer import unicode_error
from heron.tools import ToolParams

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs / logprobs

TokenIds = list[Annotated[StrictInt, Field(ge=0)]]


def _valid_unicode(text: str) -> str:
    why = unicode_error(text)
    if why is not None:
        raise ValueError(why)
    return text


# A request's strings: a lone surrogate is a 400 naming its field, not a tokenizer crash. The
# tags name them "str" and "list[str]" as union members (in an error's location).
Text = Annotated[StrictStr, AfterValidator(_valid_unicode), Tag("str")]
Texts = Annotated[list[Text], Tag("list[str]")]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    n: Annotated[StrictInt, Field(ge=1)] = 1
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: Text | Texts | None = None
    seed: StrictInt | None = None
    presence_penalty: float = 0.0  # the penalties' ranges are SamplingParams'
    frequency_penalty: float = 0.0
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    logit_bias: dict[str, float] | None = None
    # heron / vLLM extras (the openai client sends them through `extra_body`)
    top_k: StrictInt | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: float | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    stop_token_ids: TokenIds | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    # heron: a decoding strategy over the n samples (heron.strategies), e.g. "majority"
    strategy: Text | None = None
    strategy_options: dict[str, Any] | None = None
    # heron: KV-cache compression for this request (heron.kv), e.g. "snapkv" with 0.2
    kv_policy: Text | None = None
    kv_policy_options: dict[str, Any] | None = None  # the policy's options, e.g. {"window": 8}
    kv_budget: float | None = None
    kv_prefix_tokens: StrictInt | None = None  # compress only the prompt's first tokens
    # Constrained output: OpenAI's response_format, or vLLM's structured_outputs (json, regex,
    # choice, grammar, json_object) and its older guided_* fields
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: Texts | None = None
    guided_grammar: Text | None = None

    def decoding_strategy(self) -> Strategy | None:
        if self.strategy is None:
            if self.strategy_options:
                raise InvalidRequestError(
                    "strategy_options: set strategy too", param="strategy_options"
                )
            return None
        return make_strategy(self.strategy, self.n, self.strategy_options)

    def _refuse_unsupported(self) -> None:
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported by heron", param="logit_bias")

    def _sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        self._refuse_unsupported()
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            kv_policy=self.kv_policy,
            kv_policy_options=self.kv_policy_options,
            kv_budget=self.kv_budget,
            kv_prefix_tokens=self.kv_prefix_tokens,
            structured_outputs=self._structured_outputs(),
        )

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """The one output constraint the body asks for (or None); two at once are a 400."""
        given: dict[str, dict[str, Any]] = {}
        fmt = self.response_format
        if fmt is not None:
            given["response_format"] = response_format_spec(fmt)
        if self.structured_outputs is not None:
            given["structured_outputs"] = self.structured_outputs
        guided = {
            "json": self.guided_json,
            "regex": self.guided_regex,
            "choice": self.guided_choice,
            "grammar": self.guided_grammar,
        }
        for kind, value in guided.items():
            if value is not None:
                given[f"guided_{kind}"] = {kind: value}
        given = {name: spec for name, spec in given.items() if spec}
        if len(given) > 1:
            raise InvalidRequestError(
                f"{' and '.join(given)}: give one output constraint", param=next(iter(given))
            )
        if not given:
            return None
        ((name, spec),) = given.items()
        kinds = [f.name for f in fields(StructuredOutputsParams)]
        unknown = set(spec) - set(kinds)
        if unknown:
            raise InvalidRequestError(
                f"{name}: unknown {', '.join(sorted(unknown))}; one of {', '.join(kinds)}",
                param=name,
            )
        return StructuredOutputsParams(**spec)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Text | Texts | TokenIds | list[TokenIds]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False
    suffix: Text | None = None
    best_of: StrictInt | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            items: list[str | list[int]] = [p]
        elif not p:
            raise InvalidRequestError("prompt: must not be empty", param="prompt")
        elif isinstance(p[0], int):
            items = [p]  # type: ignore[list-item]
        else:
            items = list(p)  # type: ignore[arg-type]
        for item in items:
            if len(item) == 0:
                raise InvalidRequestError("prompt: must not be empty", param="prompt")
        return items

    def sampling_params(self) -> SamplingParams:
        if self.suffix:
            raise InvalidRequestError("suffix is not supported by heron", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError(
                "best_of other than n is not supported; use n", param="best_of"
            )
        # echo with logprobs also lists the prompt's tokens, as OpenAI's legacy API does.
        prompt_lp = self.logprobs if self.echo and self.logprobs is not None else None
        return self._sampling_params(self.max_tokens, self.logprobs, prompt_lp)


class ContentPart(BaseModel):
    type: Literal["text"]
    text: Text


class ToolCallFunction(BaseModel):
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it


class MessageToolCall(BaseModel):
    """A call an assistant message made (a past turn)."""

    model_config = ConfigDict(extra="ignore")

    id: Text | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's calls
    tool_call_id: Text | None = None  # a tool result's call

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Any] | None = None  # checked by ToolParams
    tool_choice: Text | dict[str, Any] | None = None
    # heron / vLLM extras
    add_generation_prompt: StrictBool = True

    def conversation(self) -> list[dict[str, Any]]:
        return conversation(self.messages)

    def tool_params(self) -> ToolParams | None:
        """The tools offered and how the model may use them (None: no tools field)."""
        if self.tools is None and self.tool_choice is None:
            return None
        return ToolParams(self.tools, self.tool_choice)

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens or self.max_tokens
        return self._sampling_params(max_tokens, logprobs)


def response_format_spec(fmt: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``response_format`` as StructuredOutputsParams fields (empty for text)."""
    kind = fmt.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidRequestError(
                "response_format.json_schema: expected {'name': ..., 'schema': {...}}",
                param="response_format.json_schema",
            )
        # A json_schema without its schema asks for any JSON object.
        return {"json": spec["schema"]} if "schema" in spec else {"json_object": True}
    raise InvalidRequestError(
        f"response_format.type: one of text, json_object, json_schema; got {kind!r}",
        param="response_format.type",
    )


def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as plain dicts, in OpenAI's form (heron.tools.chat makes them what the chat
    template expects); "developer" is OpenAI's new name for the system role."""
    out = []
    for m in messages:
        message: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": m.text(),
        }
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


class TokenizeRequest(BaseModel):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(BaseModel):
    model: Text | None = None
    tokens: TokenIds
