"""``heron serve``: load the engine, then run the app under uvicorn until SIGINT/SIGTERM.

On SIGTERM uvicorn stops accepting connections and lets in-flight responses finish for up to
``shutdown_timeout`` seconds. Then heron fails what is still running itself, so each client
gets an answer it can read (a 503 with OpenAI's error body, or a stream's error event and
``[DONE]``) rather than uvicorn's cancellation (a stream cut mid-chunk, a plain-text 500);
the process exits 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import uvicorn

from heron.server.app import ServerConfig, build_app
from heron.server.async_engine import EngineDeadError
from heron.server.served_model import RequestLoop, ServedModel

logger = logging.getLogger(__name__)

# What the responses aborted at the deadline get to reach their clients before uvicorn cancels
# whatever is left; they normally go out at once (the abort does not wait for an engine step).
_FLUSH_S = 5.0


class _Server(uvicorn.Server):
    """uvicorn's server, with heron's abort at the end of the grace period."""

    def __init__(self, config: uvicorn.Config, loop: RequestLoop, grace: float) -> None:
        super().__init__(config)
        self.request_loop, self.grace = loop, grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        deadline = asyncio.get_running_loop().call_later(self.grace, self._abort_in_flight)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    def _abort_in_flight(self) -> None:
        logger.warning("--shutdown-timeout %gs passed; aborting what is still running", self.grace)
        self.request_loop.abort_all(
            EngineDeadError(
                f"the server is shutting down: this request did not finish within its "
                f"--shutdown-timeout of {self.grace:g}s"
            )
        )


def run_server(
    model: ServedModel,
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    shutdown_timeout: float = 30.0,
) -> None:
    app = build_app(model, config)
    logger.info(
        "serving %r on http://%s:%d (OpenAI API under /v1, docs at /docs)",
        config.served_model_name,
        host,
        port,
    )
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_timeout + _FLUSH_S,
        access_log=log_level == "debug",
    )
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler that
    # was installed before it ran; a no-op handler there makes that a clean exit 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        _Server(uv_config, model.loop, shutdown_timeout).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    logger.info("server stopped")
