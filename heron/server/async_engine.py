"""The engine loop of the server: one thread owns the ``Engine`` and steps it; HTTP handlers
talk to it through a command queue and get each request's outputs on an ``asyncio.Queue``.

The engine is not thread-safe, so nothing but the loop thread touches it. Adding a request
is a command whose validation error (an ``InvalidRequestError``) comes back to the caller's
await; an abort is a command too, so a disconnected client's KV blocks are freed before the
next step. If a step itself raises, every in-flight request gets the error and the loop goes
on serving new requests."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass

from heron.config import SamplingParams
from heron.engine.engine import Engine
from heron.errors import HeronError
from heron.outputs import RequestOutput

logger = logging.getLogger(__name__)


class QueueFullError(HeronError):
    """Too many requests are waiting for a slot; the client should retry later."""


class EngineDeadError(HeronError):
    """The engine loop stopped (server shutting down)."""


@dataclass
class _Add:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    prompt_text: str | None
    sink: Callable[[RequestOutput | BaseException], None]
    done: Future


@dataclass
class _Abort:
    request_id: str


def refuse_if_full(num_waiting: int, max_waiting: int) -> None:
    """A new request is refused (HTTP 429) once ``max_waiting`` are already waiting."""
    if num_waiting >= max_waiting:
        raise QueueFullError(
            f"{num_waiting} requests are already waiting (--max-waiting {max_waiting}); retry later"
        )


class RequestStream:
    """One request's outputs (cumulative, as ``Engine.step`` gives them) as an async iterator
    that ends after the finished output. Leaving it early (a client went away) aborts the
    request, which frees its KV blocks before the engine's next step."""

    def __init__(self, abort: Callable[[str], None], request_id: str) -> None:
        self._abort = abort  # the loop's abort(request_id)
        self.request_id = request_id
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            self.abort()

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._abort(self.request_id)


class AsyncEngine:
    """Drives ``engine`` from a background thread, one ``RequestStream`` per request."""

    def __init__(self, engine: Engine, max_waiting: int = 256) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._sinks: dict[str, Callable[[RequestOutput | BaseException], None]] = {}
        self._pending_adds = 0
        self._thread: threading.Thread | None = None
        self._stopped = False
        # Set by abort_all(): new requests are refused from then on.
        self._closing = False
        # The streams handed out, read on the event loop by abort_all(); a finished one goes
        # with its route.
        self._streams: weakref.WeakSet[RequestStream] = weakref.WeakSet()
        # Read by /metrics from the event loop; written by the loop thread after each step.
        self.last_stats: dict[str, float] = engine.stats()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="heron-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Abort everything in flight and join the loop thread."""
        if self._thread is None or self._stopped:
            return
        self._stopped = True
        self._commands.put(None)
        self._thread.join(timeout=30)

    def abort_all(self, error: BaseException) -> None:
        """Refuse new requests and fail every one in flight with ``error`` now, from the event
        loop: their routes answer at once (503, or an error event and ``[DONE]``) instead of
        waiting for the engine thread to finish its step. The engine drops them after it."""
        self._closing = True
        for stream in list(self._streams):
            if not stream.finished:
                stream.queue.put_nowait(error)
                self.abort(stream.request_id)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopped

    @property
    def num_waiting(self) -> int:
        return int(self.last_stats["num_waiting"]) + self._pending_adds

    # ------------------------------------------------------------------ requests
    async def add(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        prompt_text: str | None = None,
    ) -> RequestStream:
        """Submit one request. Raises at once if it is refused (the engine's
        ``InvalidRequestError``, a full queue, shutdown); otherwise returns its stream."""
        if self._stopped or self._closing or self._thread is None:
            raise EngineDeadError("the server is shutting down")
        refuse_if_full(self.num_waiting, self.max_waiting)
        await asyncio.to_thread(self.engine.prepare_request, params)
        loop = asyncio.get_running_loop()
        stream = RequestStream(self.abort, request_id)

        def sink(item: RequestOutput | BaseException) -> None:
            loop.call_soon_threadsafe(stream.queue.put_nowait, item)

        done: Future = Future()
        self._pending_adds += 1
        self._commands.put(_Add(prompt_ids, params, request_id, prompt_text, sink, done))
        try:
            await asyncio.wrap_future(done)
        finally:
            self._pending_adds -= 1
        if self._closing:  # abort_all() ran while the engine thread took it
            self.abort(request_id)
            raise EngineDeadError("the server is shutting down")
        self._streams.add(stream)
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    # ------------------------------------------------------------------ the loop thread
    def _loop(self) -> None:
        engine = self.engine
        while True:
            # Block for work when idle; otherwise take what is queued and step.
            block = not engine.has_unfinished_requests()
            try:
                while True:
                    cmd = self._commands.get(block=block)
                    block = False
                    if cmd is None:
                        self._shutdown()
                        return
                    self._apply(cmd)
            except queue.Empty:
                pass
            if not engine.has_unfinished_requests():
                self.last_stats = engine.stats()
                continue
            try:
                outs = engine.step()
            except Exception as e:  # a bug, not a user error: fail in-flight requests only
                logger.exception("engine step failed; aborting %d requests", len(self._sinks))
                for rid, sink in list(self._sinks.items()):
                    engine.abort_request(rid)
                    sink(e)
                self._sinks.clear()
                continue
            self.last_stats = engine.stats()
            for out in outs:
                sink = self._sinks.get(out.request_id)
                if sink is not None:
                    sink(out)
                    if out.finished:
                        del self._sinks[out.request_id]

    def _apply(self, cmd: _Add | _Abort) -> None:
        if isinstance(cmd, _Abort):
            if self._sinks.pop(cmd.request_id, None) is not None:
                self.engine.abort_request(cmd.request_id)
                self.last_stats = self.engine.stats()
            return
        try:
            req = self.engine.add_request(cmd.prompt_ids, cmd.params, cmd.request_id)
        except Exception as e:
            cmd.done.set_exception(e)
            return
        req.prompt = cmd.prompt_text
        self._sinks[cmd.request_id] = cmd.sink
        self.last_stats = self.engine.stats()  # counts it as waiting before the future resolves
        cmd.done.set_result(None)

    def _shutdown(self) -> None:
        err = EngineDeadError("the server shut down before this request finished")
        for rid, sink in self._sinks.items():
            self.engine.abort_request(rid)
            sink(err)
        self._sinks.clear()
