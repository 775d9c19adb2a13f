"""The FastAPI application: routes, API-key check, CORS, and OpenAI-style errors for every
failure.

Every error leaves as ``{"error": {"message", "type", "param", "code"}}``: FastAPI's 422
validation errors become 400 naming the field, heron's ``InvalidRequestError`` 400, an unknown
model 404, a bad API key 401 (checked before the body is read), a body over
``max_request_bytes`` 413 (before it is read), a full waiting queue 429, shutdown 503, a
sample whose logits became NaN/inf 500 (``generation_failed``), a bug 500 (logged with its
traceback; the other requests carry on)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from heron import __version__
from heron.errors import InvalidRequestError
from heron.server.async_engine import EngineDeadError, QueueFullError
from heron.server.metrics import CONTENT_TYPE, ServerMetrics
from heron.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    conversation,
)
from heron.server.served_model import ServedModel
from heron.server.serving import ClientDisconnected, GenerationFailed, OpenAIServing, error_body
from heron.tools import prepare_chat

logger = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    served_model_name: str
    model_aliases: tuple[str, ...] = ()
    api_key: str | None = None
    max_waiting: int = 256
    # CORS for browsers on other origins: off while allowed_origins is empty; "*" allows all.
    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    max_request_bytes: int = 4 * 2**20  # larger bodies get 413 before they are parsed


class _ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def build_app(model: ServedModel, config: ServerConfig) -> FastAPI:
    """``model``: ``ServedModel.local(engine, config.max_waiting)``, or replicas on Ray
    (heron.scaleout.router)."""
    loop = model.loop
    metrics = ServerMetrics(lambda: loop.last_stats, config.served_model_name)
    serving = OpenAIServing(
        loop,
        model.tokenizer,
        config.served_model_name,
        metrics,
        model.max_model_len,
        model.max_num_seqs,
    )
    names = {config.served_model_name, *config.model_aliases}
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop.start()
        try:
            yield
        finally:
            loop.stop()

    app = FastAPI(title="heron", version=__version__, lifespan=lifespan)
    app.state.loop = loop

    # -------------------------------------------------------------- model check
    def check_model(model: str | None) -> None:
        if model and model not in names:
            raise _ApiError(
                404,
                f"the model {model!r} does not exist; this server serves "
                f"{config.served_model_name!r} (see GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    # -------------------------------------------------------------- errors
    def error(status: int, exc: BaseException | str, param=None, code=None) -> JSONResponse:
        return JSONResponse(error_body(exc, status, param, code), status_code=status)

    @app.exception_handler(_ApiError)
    async def _api_error(request: Request, exc: _ApiError) -> JSONResponse:
        return error(exc.status, exc, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # A validator's verdict (a lone surrogate) over the other union members' type errors.
        errors = exc.errors()
        first = next((e for e in errors if e["type"] == "value_error"), errors[0] if errors else {})
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            msg = f"the body is not valid JSON: {first.get('msg')}"
            return error(400, msg, code="json_invalid")
        # The top-level field names the culprit; the full location (union members and list
        # indices included) goes into the message.
        param = loc[0] if loc else None
        msg = "field required" if first.get("type") == "missing" else first.get("msg", "invalid")
        return error(400, f"{'.'.join(loc)}: {msg}" if loc else msg, param)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return error(400, exc)

    @app.exception_handler(QueueFullError)
    async def _full(request: Request, exc: QueueFullError) -> JSONResponse:
        return error(429, exc, code="queue_full")

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return error(503, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(GenerationFailed)
    async def _failed(request: Request, exc: GenerationFailed) -> JSONResponse:
        return error(500, exc)  # the engine logged why

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        logger.info("%s: client disconnected; request aborted", exc)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    # The last added runs first: CORS answers preflights (which carry no key), the count
    # includes the 401s and 413s, a client without the key is refused before its body's size
    # is looked at.
    app.add_middleware(_LimitBody, max_bytes=config.max_request_bytes)
    if config.api_key is not None:
        app.add_middleware(_RequireApiKey, key=config.api_key)
    app.add_middleware(_CountRequests, metrics=metrics)
    if config.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.allowed_origins,
            allow_methods=config.allowed_methods,
            allow_headers=config.allowed_headers,
            allow_credentials=config.allow_credentials,
        )

    # -------------------------------------------------------------- routes
    @app.get("/health")
    async def health() -> Response:
        if not loop.alive:
            return error(503, "the engine loop is not running")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": config.served_model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "heron",
                    "max_model_len": model.max_model_len,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        result = await serving.completions(body, request.is_disconnected)
        return _to_response(result)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        result = await serving.chat(body, request.is_disconnected)
        return _to_response(result)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(body.model)
        tok = model.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages", param="prompt")

        def encode() -> list[int]:  # in a worker thread: megabytes take seconds
            if body.messages is not None:
                chat = prepare_chat(tok, conversation(body.messages), None)
                return tok.encode_chat(chat.messages, body.add_generation_prompt)[1]
            if body.add_special_tokens:
                return tok.encode(body.prompt)
            return tok.hf.encode(body.prompt, add_special_tokens=False)

        ids = await asyncio.to_thread(encode)
        return {"tokens": ids, "count": len(ids), "max_model_len": model.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(body.model)
        vocab = model.vocab_size
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise InvalidRequestError(f"tokens: ids must be < {vocab}; got {bad[:5]}", "tokens")
        text = await asyncio.to_thread(model.tokenizer.decode, body.tokens, False)
        return {"prompt": text}

    return app


# Open without the API key, as the probes and the docs need: all else asks for it.
_OPEN_PATHS = frozenset(
    {"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)


class _RequireApiKey:
    """Checks 'Authorization: Bearer KEY' before any route reads the body, so a client without
    the key learns nothing from validation errors; compared in constant time, so response
    times do not leak how much of a guess was right."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS or self._authorized(scope):
            return await self.app(scope, receive, send)
        message = "missing or wrong API key: send it as 'Authorization: Bearer <key>'"
        response = JSONResponse(
            error_body(message, 401, code="invalid_api_key"),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        # Starlette decodes headers as latin-1: encoding back gives the bytes that were sent.
        sent = token.strip().encode("latin-1")
        return scheme.lower() == "bearer" and hmac.compare_digest(sent, self.key)


class _CountRequests:
    """Counts finished requests by route and status (a plain ASGI middleware: Starlette's
    BaseHTTPMiddleware would get between a stream and the client's disconnect)."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "other")
            self.metrics.requests.labels(endpoint, str(status)).inc()


class _LimitBody:
    """HTTP 413 for a body over ``max_bytes`` before anything parses it (parsing a huge body
    blocks the event loop): a larger Content-Length is refused unread, a chunked body as
    soon as the bytes received pass the limit. The body read here (Starlette reads it whole
    anyway) is handed on to the app."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal body
            if body is None:
                return await receive()  # on to the disconnect
            message, body = body, None
            return message

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        message = (
            f"the request body is over {self.max_bytes} bytes (the server's --max-request-bytes)"
        )
        response = JSONResponse(
            error_body(message, 413, code="request_too_large"),
            status_code=413,
            headers={"connection": "close"},  # the rest of the body is left unread
        )
        await response(scope, receive, send)


def _to_response(result) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(
        result,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
