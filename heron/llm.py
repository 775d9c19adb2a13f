"""LLM: the offline Python API, named like vLLM's so users switch in one line."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from heron.config import EngineConfig, SamplingParams
from heron.engine.engine import Engine
from heron.errors import InvalidRequestError
from heron.methods import check_engine_methods
from heron.outputs import RequestOutput
from heron.strategies import Strategy, StrategyRun, make_strategy
from heron.tools import ToolParams, prepare_chat

Prompt = str | list[int] | dict[str, Any]


class LLM:
    """``LLM(model=None)`` loads the default model (SmolLM2-135M-Instruct).

    Keyword arguments are EngineConfig fields (block_size, kv_cache_memory, max_num_seqs,
    max_num_batched_tokens, max_model_len, enable_prefix_caching, seed)."""

    def __init__(
        self, model: str | None = None, dtype: str = "auto", device: str = "auto", **kwargs: Any
    ) -> None:
        try:
            config = EngineConfig(model=model, dtype=dtype, device=device, **kwargs)
        except TypeError as e:
            raise InvalidRequestError(f"LLM(): {e}") from None
        check_engine_methods(config)  # before the model loads
        self.engine = Engine(config)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        strategy: str | Strategy | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt, batched; outputs come back in input order.

        ``strategy`` (a name from ``heron.strategies.STRATEGIES`` with ``n`` from the sampling
        params, or an instance) draws samples and returns only the one it chose, with its
        report (answer, votes, samples, tokens, engine steps) in ``RequestOutput.strategy``."""
        prompt_list = as_prompt_list(prompts)
        params_list = as_params_list(sampling_params, len(prompt_list))
        if strategy is not None:
            return self._run_strategy(prompt_list, params_list, strategy, use_tqdm)
        return self._run(prompt_list, params_list, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        strategy: str | Strategy | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them.

        ``tools`` and ``tool_choice`` as in OpenAI's chat API (heron.tools.ToolParams): each
        completion's ``message`` then holds its content and parsed ``tool_calls``."""
        conversations = as_conversations(messages)
        offered = None if tools is None and tool_choice is None else ToolParams(tools, tool_choice)
        tok = self.engine.tokenizer
        chats = [prepare_chat(tok, c, offered) for c in conversations]
        encoded = [tok.encode_chat(c.messages, add_generation_prompt, tools=c.tools) for c in chats]
        params = [
            chat.sampling_params(p)
            for chat, p in zip(chats, as_params_list(sampling_params, len(chats)), strict=True)
        ]
        outs = self.generate([ids for _, ids in encoded], params, use_tqdm, strategy)
        for out, (text, _), chat in zip(outs, encoded, chats, strict=True):
            out.prompt = text
            if chat.parser is not None:
                for c in out.outputs:
                    c.message = chat.parser.parse(c.text)
        return outs

    def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None
    ) -> Iterator[str]:
        """Yield the new text of a single request as it is generated."""
        req = self.engine.add_request(_prompt_value(prompt), sampling_params)
        sent = 0
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == req.request_id:
                        text = out.outputs[0].text
                        if len(text) > sent:
                            yield text[sent:]
                            sent = len(text)
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(req.request_id)

    def _run(
        self, prompts: list[Prompt], params: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        engine = self.engine
        order: dict[str, int] = {}
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            try:
                req = engine.add_request(_prompt_value(prompt), p)
            except Exception:
                for rid in order:
                    engine.abort_request(rid)
                raise
            order[req.request_id] = i
        results: list[RequestOutput | None] = [None] * len(prompts)
        steps = dict.fromkeys(order, 0)  # engine steps each request took part in
        with tqdm(total=len(prompts), desc="generating", disable=not use_tqdm, unit="req") as bar:
            while any(r is None for r in results):
                for out in engine.step():
                    if out.request_id not in order:
                        continue
                    steps[out.request_id] += 1
                    if out.finished:
                        out.metrics["engine_steps"] = steps[out.request_id]
                        results[order[out.request_id]] = out
                        bar.update(1)
        return results  # type: ignore[return-value]

    def _run_strategy(
        self,
        prompts: list[Prompt],
        params: list[SamplingParams],
        strategy: str | Strategy,
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        """Each round draws what every unfinished prompt's strategy still wants, all prompts
        in one batched engine run; a prompt's later rounds hit its prompt in the prefix
        cache."""
        runs = [StrategyRun(make_strategy(strategy, p.n)) for p in params]
        last: list[RequestOutput | None] = [None] * len(prompts)
        while todo := [i for i, run in enumerate(runs) if run.wanted()]:
            outs = self._run(
                [prompts[i] for i in todo],
                [runs[i].round_params(params[i]) for i in todo],
                use_tqdm,
            )
            for i, out in zip(todo, outs, strict=True):
                runs[i].add(out.outputs, int(out.metrics["engine_steps"]))
                last[i] = out
        return [run.result(out) for run, out in zip(runs, last, strict=True)]  # type: ignore[arg-type]


def as_params_list(
    sampling_params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int
) -> list[SamplingParams]:
    """One SamplingParams per prompt: the given list (of the right length) or one for all."""
    if isinstance(sampling_params, Sequence):
        if len(sampling_params) != num_prompts:
            raise InvalidRequestError(
                f"sampling_params: {len(sampling_params)} given for {num_prompts} prompts"
            )
        return list(sampling_params)
    return [sampling_params or SamplingParams()] * num_prompts


def as_conversations(messages: list[dict] | list[list[dict]]) -> list[list[dict]]:
    """One conversation (a list of message dicts) or a list of them, as a list of them."""
    if not messages:
        raise InvalidRequestError("messages: must not be empty", param="messages")
    return [messages] if isinstance(messages[0], dict) else messages  # type: ignore[list-item]


def as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str | dict):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InvalidRequestError("prompts: must not be empty", param="prompts")
    if all(isinstance(t, int) for t in prompts):  # one prompt given as token ids
        return [prompts]
    return prompts


def _prompt_value(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise InvalidRequestError("prompt dicts need 'prompt' or 'prompt_token_ids'", "prompts")
    if isinstance(prompt, str | list):
        return prompt
    raise InvalidRequestError(
        f"prompts: expected a string or a list of token ids, got {type(prompt).__name__}",
        param="prompts",
    )
