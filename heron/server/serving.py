"""OpenAI completions and chat completions on top of the engine loop (an ``AsyncEngine``, or
a ``ReplicaRouter`` over replicas: heron.server.served_model.RequestLoop).

One HTTP request becomes one engine request per prompt (``n`` samples each share the prompt's
KV blocks inside the engine). Choices are numbered ``prompt_index * n + sample_index`` as
OpenAI does. Non-streaming requests wait for the final outputs while watching for a client
disconnect; streaming requests turn each engine step into Server-Sent Events. Either way a
request whose client goes away is aborted and its KV blocks freed.

A chat request with tools (heron.tools) has each choice's text read for calls: whole, or as
it streams, where text outside calls streams as content and each call goes out in one delta
once its closing tag arrives."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

from heron.config import SamplingParams
from heron.errors import InvalidRequestError
from heron.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from heron.server.async_engine import EngineDeadError, RequestStream
from heron.server.metrics import ServerMetrics
from heron.server.protocol import ChatCompletionRequest, CompletionRequest
from heron.server.served_model import RequestLoop
from heron.strategies import Strategy, StrategyRun
from heron.tokenizer import Tokenizer
from heron.tools import ToolParser, prepare_chat

logger = logging.getLogger(__name__)

_DISCONNECT_POLL_S = 0.25

Disconnected = Callable[[], Awaitable[bool]]  # Starlette's Request.is_disconnected


class ClientDisconnected(Exception):
    """The client closed the connection before its response was ready."""


class GenerationFailed(Exception):
    """A sample of the request ended with finish_reason "error" (its logits became NaN or
    infinite): the HTTP request fails, the other requests in the batch go on."""

    code = "generation_failed"


@dataclass
class _Prompt:
    ids: list[int]
    text: str


@dataclass
class _Job:
    """One HTTP request's engine requests and what its responses need."""

    kind: str  # "completion" | "chat"
    id: str
    created: int
    model: str
    params: SamplingParams
    prompts: list[_Prompt]
    streams: list[RequestStream]
    echo: bool = False
    logprobs: int | None = None
    start: float = field(default_factory=time.monotonic)
    first_token: list[float | None] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # engine steps per prompt
    # A per-token strategy (context-aware, entropy-adaptive) the engine applies to the
    # request: reported with each whole choice.
    token_strategy: Strategy | None = None
    tool_parser: ToolParser | None = None  # a chat with tools: choices are read for calls

    @property
    def n(self) -> int:
        return self.params.n


class OpenAIServing:
    def __init__(
        self,
        engine: RequestLoop,
        tokenizer: Tokenizer,
        model_name: str,
        metrics: ServerMetrics,
        max_model_len: int,
        max_n: int,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.metrics = metrics
        self.max_model_len = max_model_len
        self.max_n = max_n

    # ------------------------------------------------------------------ entry points
    async def completions(self, body: CompletionRequest, is_disconnected: Disconnected):
        params = body.sampling_params()
        strategy = body.decoding_strategy()
        prompts = await asyncio.to_thread(self._prompts, body.prompts())
        job_id = f"cmpl-{uuid.uuid4().hex}"
        if strategy is not None and not strategy.per_token:
            shown = self._job("completion", job_id, params, prompts, body.echo, body.logprobs)
            return await self._respond_strategy(
                shown, strategy, body.stream, body.include_usage, is_disconnected
            )
        if strategy is not None:
            params = strategy.request_params(params)
        job = await self._submit("completion", job_id, params, prompts)
        job.echo, job.logprobs, job.token_strategy = body.echo, body.logprobs, strategy
        return await self._respond(job, body.stream, body.include_usage, is_disconnected)

    async def chat(self, body: ChatCompletionRequest, is_disconnected: Disconnected):
        params = body.sampling_params()
        strategy = body.decoding_strategy()

        def encode():
            chat = prepare_chat(self.tokenizer, body.conversation(), body.tool_params())
            text, ids = self.tokenizer.encode_chat(
                chat.messages, body.add_generation_prompt, self.max_model_len, chat.tools
            )
            return chat, text, ids

        chat, text, ids = await asyncio.to_thread(encode)
        params = chat.sampling_params(params)
        job_id, prompts = f"chatcmpl-{uuid.uuid4().hex}", [_Prompt(ids, text)]
        if strategy is not None and not strategy.per_token:
            shown = self._job("chat", job_id, params, prompts, logprobs=params.logprobs)
            shown.tool_parser = chat.parser
            return await self._respond_strategy(
                shown, strategy, body.stream, body.include_usage, is_disconnected
            )
        if strategy is not None:
            params = strategy.request_params(params)
        job = await self._submit("chat", job_id, params, prompts)
        job.logprobs, job.token_strategy, job.tool_parser = params.logprobs, strategy, chat.parser
        return await self._respond(job, body.stream, body.include_usage, is_disconnected)

    # ------------------------------------------------------------------ submission
    def _prompts(self, items: list[str | list[int]]) -> list[_Prompt]:
        """Each prompt as ids and text. Run in a worker thread, like all tokenizing and chat
        templating here: megabytes take seconds, which would stall every other client."""
        return [
            _Prompt(self.tokenizer.encode(p, self.max_model_len), p)
            if isinstance(p, str)
            else _Prompt(list(p), self.tokenizer.decode(p, False))
            for p in items
        ]

    async def _submit(
        self, kind: str, job_id: str, params: SamplingParams, prompts: list[_Prompt]
    ) -> _Job:
        if params.n > self.max_n:
            raise InvalidRequestError(
                f"n: at most {self.max_n} samples per prompt (the server's --max-num-seqs), "
                f"got {params.n}",
                param="n",
            )
        for p in prompts:
            wanted = len(p.ids) + (params.max_tokens or 1)
            if len(p.ids) < self.max_model_len and wanted > self.max_model_len:
                raise InvalidRequestError(
                    f"this model's context is {self.max_model_len} tokens, but {wanted} were "
                    f"requested ({len(p.ids)} in the prompt, {params.max_tokens} in max_tokens); "
                    "shorten the prompt or lower max_tokens",
                    param="max_tokens",
                )
        job = self._job(kind, job_id, params, prompts)
        try:
            for i, p in enumerate(prompts):
                rid = job_id if len(prompts) == 1 else f"{job_id}-{i}"
                job.streams.append(await self.engine.add(p.ids, params, rid, p.text))
        except BaseException:
            for s in job.streams:
                s.abort()
            raise
        job.first_token = [None] * len(prompts)
        job.steps = [0] * len(prompts)
        return job

    def _job(
        self,
        kind: str,
        job_id: str,
        params: SamplingParams,
        prompts: list[_Prompt],
        echo: bool = False,
        logprobs: int | None = None,
    ) -> _Job:
        return _Job(
            kind, job_id, int(time.time()), self.model_name, params, prompts, [], echo, logprobs
        )

    async def _respond(
        self, job: _Job, stream: bool, include_usage: bool, is_disconnected: Disconnected
    ):
        if stream:
            return self._stream(job, include_usage)
        finals = await self._collect(job, is_disconnected)
        if job.token_strategy is not None:
            finals = [
                StrategyRun.single(job.token_strategy, out, steps)
                for out, steps in zip(finals, job.steps, strict=True)
            ]
        return self._response(job, finals)

    # ------------------------------------------------------------------ strategies
    async def _respond_strategy(
        self,
        shown: _Job,
        strategy: Strategy,
        stream: bool,
        include_usage: bool,
        is_disconnected: Disconnected,
    ):
        """A decoding strategy per prompt: rounds of engine requests with n = k samples
        until the strategy decides. The response has one choice per prompt, the chosen
        sample, with the strategy's report in ``choice["strategy"]``; streaming sends each
        choice whole once decided (the pick needs every sample). Every prompt's first round
        is submitted before responding, so bad input is still a 400."""
        runs = [StrategyRun(strategy) for _ in shown.prompts]
        first: list[_Job] = []
        try:
            for i, (run, p) in enumerate(zip(runs, shown.prompts, strict=True)):
                first.append(await self._round(shown, i, run, p))
        except BaseException:
            for job in first:
                for s in job.streams:
                    s.abort()
            raise
        # A stream's disconnect ends the generator below (aborting the rounds); polling
        # the connection while the response streams is Starlette's job.
        watch = _never_disconnected if stream else is_disconnected

        async def decide(i: int) -> tuple[int, RequestOutput]:
            job, run = first[i], runs[i]
            while True:
                out = (await self._collect(job, watch))[0]
                run.add(out.outputs, job.steps[0])
                if not run.wanted():
                    return i, run.result(out)
                job = await self._round(shown, i, run, shown.prompts[i])

        async def decided() -> AsyncIterator[tuple[int, RequestOutput]]:
            tasks = [asyncio.create_task(decide(i)) for i in range(len(first))]
            try:
                for next_done in asyncio.as_completed(tasks):
                    yield await next_done
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        view = replace(shown, params=replace(shown.params, n=1))  # one choice per prompt
        if stream:
            return self._stream(view, include_usage, decided())
        finals: list[RequestOutput | None] = [None] * len(first)
        async for i, out in decided():
            finals[i] = out
        return self._response(view, finals)  # type: ignore[arg-type]

    async def _round(self, shown: _Job, i: int, run: StrategyRun, prompt: _Prompt) -> _Job:
        params = run.round_params(shown.params)
        return await self._submit(shown.kind, f"{shown.id}-{i}-{run.rounds}", params, [prompt])

    # ------------------------------------------------------------------ outputs
    async def _outputs(self, job: _Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """All of the job's engine outputs as they come, tagged with their prompt index;
        records metrics when each engine request finishes. Leaving early aborts them all."""
        merged: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, s: RequestStream) -> None:
            try:
                async for out in s:
                    merged.put_nowait((i, out))
            except Exception as e:
                merged.put_nowait((i, e))
            finally:
                merged.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(job.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await merged.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                self._track(job, i, item)
                failed = [c.index for c in item.outputs if c.finish_reason == "error"]
                if failed:
                    raise GenerationFailed(
                        f"{item.request_id}: generation failed (sample {failed[0]}): the "
                        "model's logits became NaN or infinite; the request was stopped"
                    )
                yield i, item
        finally:
            for t in tasks:
                t.cancel()
            for s in job.streams:
                s.abort()

    def _track(self, job: _Job, i: int, out: RequestOutput) -> None:
        now = time.monotonic()
        job.steps[i] += 1
        if job.first_token[i] is None and any(c.token_ids for c in out.outputs):
            job.first_token[i] = now
        if out.finished:
            ttft = job.first_token[i] - job.start if job.first_token[i] is not None else None
            generated = sum(len(c.token_ids) for c in out.outputs)
            self.metrics.observe_request(
                len(out.prompt_token_ids), generated, ttft, now - job.start
            )
            logger.info(
                "%s: %d prompt tokens, %d generated, %.2fs (first token %.2fs), finish %s",
                out.request_id,
                len(out.prompt_token_ids),
                generated,
                now - job.start,
                ttft if ttft is not None else float("nan"),
                ",".join(str(c.finish_reason) for c in out.outputs),
            )

    async def _collect(self, job: _Job, is_disconnected: Disconnected) -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(job.streams)

        async def consume() -> None:
            async for i, out in self._outputs(job):
                if out.finished:
                    finals[i] = out

        task = asyncio.create_task(consume())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
                if done:
                    task.result()
                    return finals  # type: ignore[return-value]
                if await is_disconnected():
                    raise ClientDisconnected(job.id)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    # ------------------------------------------------------------------ whole responses
    def _response(self, job: _Job, finals: list[RequestOutput]) -> dict:
        choices = []
        for i, out in enumerate(finals):
            for c in out.outputs:
                choice = self._choice(job, i, out, c)
                if out.strategy is not None:
                    choice["strategy"] = out.strategy.summary()
                choices.append(choice)
        return {
            "id": job.id,
            "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": job.created,
            "model": job.model,
            "choices": choices,
            "usage": _usage(job, finals),
        }

    def _choice(self, job: _Job, i: int, out: RequestOutput, c: CompletionOutput) -> dict:
        index = i * job.n + c.index
        finish = _finish_reason(c)
        if job.kind == "chat":
            logprobs = None
            if job.logprobs is not None:
                logprobs = {"content": _chat_logprobs(c.token_ids, c.logprobs, job.logprobs)}
            message = {"role": "assistant", "content": c.text}
            if job.tool_parser is not None:
                message = job.tool_parser.parse(c.text).to_openai()
                finish = _finish_reason(c, called="tool_calls" in message)
            return {
                "index": index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        text = c.text
        logprobs = None
        if job.echo:
            text = job.prompts[i].text + text
        if job.logprobs is not None:
            ids, positions, offset = list(c.token_ids), list(c.logprobs or []), 0
            if job.echo:
                ids = out.prompt_token_ids + ids
                positions = list(out.prompt_logprobs or [None] * len(out.prompt_token_ids)) + (
                    positions
                )
            logprobs = _completion_logprobs(self.tokenizer, ids, positions, job.logprobs, offset)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    # ------------------------------------------------------------------ streaming
    async def _stream(
        self,
        job: _Job,
        include_usage: bool,
        outputs: AsyncIterator[tuple[int, RequestOutput]] | None = None,
    ) -> AsyncIterator[str]:
        """Server-Sent Events: one chunk per choice that moved in an engine step (or in
        ``outputs``, e.g. a strategy's decisions), then the usage chunk (when asked for) and
        ``[DONE]``. An error after the headers went out is sent as an ``error`` event, since
        the status code can no longer change."""
        n = job.n
        sent_text = [[0] * n for _ in job.prompts]
        sent_tokens = [[0] * n for _ in job.prompts]
        text_offset = [[0] * n for _ in job.prompts]
        done = [[False] * n for _ in job.prompts]
        echoed = [[not job.echo] * n for _ in job.prompts]
        parser = job.tool_parser
        readers = [[parser.reader() for _ in range(n)] for _ in job.prompts] if parser else None
        finals: list[RequestOutput | None] = [None] * len(job.prompts)
        base = {
            "id": job.id,
            "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
            "created": job.created,
            "model": job.model,
        }
        if include_usage:
            base["usage"] = None

        def event(choices: list[dict]) -> str:
            return f"data: {json.dumps({**base, 'choices': choices})}\n\n"

        try:
            if job.kind == "chat":
                first = [
                    {
                        "index": i * n + j,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(len(job.prompts))
                    for j in range(n)
                ]
                yield event(first)
            async for i, out in self._outputs(job) if outputs is None else outputs:
                finals[i] = out
                choices = []
                for c in out.outputs:
                    j = c.index
                    if done[i][j]:
                        continue
                    new_text = c.text[sent_text[i][j] :]
                    new_ids = c.token_ids[sent_tokens[i][j] :]
                    new_lps = (c.logprobs or [])[sent_tokens[i][j] :]
                    prefix = "" if echoed[i][j] else job.prompts[i].text
                    echoed[i][j] = True
                    if not (new_text or new_ids or prefix or c.finished):
                        continue
                    text, calls, reader = prefix + new_text, [], None
                    if readers is not None:
                        reader = readers[i][j]
                        first = len(reader.calls)
                        text, calls = reader.feed(text)
                        if c.finished:
                            text += reader.finish()
                    chunk = self._chunk(job, i, j, text, new_ids, new_lps, c)
                    if calls:
                        chunk["delta"]["tool_calls"] = [
                            {"index": first + k, **call.to_openai()} for k, call in enumerate(calls)
                        ]
                    if reader is not None and c.finished:
                        chunk["finish_reason"] = _finish_reason(c, called=bool(reader.calls))
                    if c.finished and out.strategy is not None:
                        chunk["strategy"] = out.strategy.summary()
                    if chunk.get("logprobs") and job.kind == "completion":
                        lp = chunk["logprobs"]
                        lp["text_offset"] = [text_offset[i][j] + o for o in lp["text_offset"]]
                        text_offset[i][j] += sum(len(t) for t in lp["tokens"])
                    choices.append(chunk)
                    sent_text[i][j] = len(c.text)
                    sent_tokens[i][j] = len(c.token_ids)
                    done[i][j] = c.finished
                if choices:
                    yield event(choices)
            if include_usage:
                usage = _usage(job, finals)  # type: ignore[arg-type]
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
        except Exception as e:
            logger.warning("%s: stream ended by an error: %s", job.id, e)
            status = 503 if isinstance(e, EngineDeadError) else 500  # as the non-streaming path
            yield f"data: {json.dumps(error_body(e, status))}\n\n"
        yield "data: [DONE]\n\n"

    def _chunk(
        self,
        job: _Job,
        i: int,
        j: int,
        text: str,
        ids: list[int],
        lps: list[PositionLogprobs],
        c: CompletionOutput,
    ) -> dict:
        index = i * job.n + j
        finish = _finish_reason(c) if c.finished else None
        logprobs = None
        if job.kind == "chat":
            if job.logprobs is not None and ids:
                logprobs = {"content": _chat_logprobs(ids, lps, job.logprobs)}
            delta = {"content": text} if text else {}
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if job.logprobs is not None and ids:
            logprobs = _completion_logprobs(self.tokenizer, ids, lps, job.logprobs, 0)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


# ---------------------------------------------------------------------------- helpers
def _finish_reason(c: CompletionOutput, called: bool = False) -> str | None:
    """OpenAI's finish_reason: "tool_calls" when a reply that made calls ended on its own."""
    if c.finish_reason == "length":
        return "length"
    if not c.finished:
        return None
    return "tool_calls" if called else "stop"


def _usage(job: _Job, finals: list[RequestOutput]) -> dict:
    prompt = sum(len(p.ids) for p in job.prompts)
    completion = sum(
        out.strategy.num_tokens if out.strategy else sum(len(c.token_ids) for c in out.outputs)
        for out in finals
        if out
    )
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def _never_disconnected() -> bool:
    return False


def _top(pos: PositionLogprobs, k: int) -> list[tuple[int, float, str]]:
    """The k most likely entries of one position: (token id, logprob, text)."""
    ranked = sorted((e.rank, tid, e) for tid, e in pos.items() if e.rank <= k)
    return [(tid, e.logprob, e.decoded_token or "") for _, tid, e in ranked]


def _chat_logprobs(ids: list[int], positions: list[PositionLogprobs], k: int) -> list[dict]:
    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for tid, pos in zip(ids, positions, strict=False):
        chosen = pos[tid]
        item = entry(chosen.decoded_token or "", chosen.logprob)
        item["top_logprobs"] = [entry(text, lp) for _, lp, text in _top(pos, k)]
        content.append(item)
    return content


def _completion_logprobs(
    tokenizer: Tokenizer,
    ids: list[int],
    positions: list[PositionLogprobs | None],
    k: int,
    offset: int,
) -> dict:
    """OpenAI's legacy logprobs: tokens, their logprobs, top alternatives, text offsets.
    A prompt's first token has no logprob (nothing precedes it): null, as OpenAI gives."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for tid, pos in zip(ids, positions, strict=False):
        if pos is None:
            text, lp, top = tokenizer.id_to_piece(tid), None, None
        else:
            chosen = pos[tid]
            text, lp = chosen.decoded_token or "", chosen.logprob
            top = {t: v for _, v, t in _top(pos, k)}
            top.setdefault(text, lp)
        tokens.append(text)
        token_logprobs.append(lp)
        top_logprobs.append(top)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def error_body(
    exc: BaseException | str, status: int, param: str | None = None, code: str | None = None
) -> dict:
    """OpenAI's error object. Its type follows the status: a 4xx without a type of its own
    (405, 413, 422...) is the client's mistake, an ``invalid_request_error``. A message
    quoting the request's own text (an unknown option's name) has its lone surrogates
    escaped, or the body could not be encoded as UTF-8."""
    types = {
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
        503: "service_unavailable",
    }
    default = "invalid_request_error" if 400 <= status < 500 else "internal_server_error"
    message = str(exc) if not isinstance(exc, str) else exc
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if param is None and isinstance(exc, InvalidRequestError):
        param = exc.param
    if code is None:
        code = getattr(exc, "code", None)
    return {
        "error": {
            "message": message,
            "type": types.get(status, default),
            "param": param,
            "code": code,
        }
    }
