"""``heron serve``: load the engine, then run the app under uvicorn until SIGINT/SIGTERM.

On SIGTERM uvicorn stops accepting connections and lets in-flight responses finish for up to
``shutdown_timeout`` seconds; the app's shutdown then aborts whatever is left (those streams
end with an error event) and the process exits 0."""

from __future__ import annotations

import logging
import signal

from heron.server.app import ServerConfig, build_app
from heron.server.served_model import ServedModel

logger = logging.getLogger(__name__)


def run_server(
    model: ServedModel,
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    shutdown_timeout: float = 30.0,
) -> None:
    import uvicorn

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
        timeout_graceful_shutdown=shutdown_timeout,
        access_log=log_level == "debug",
    )
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler that
    # was installed before it ran; a no-op handler there makes that a clean exit 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.Server(uv_config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    logger.info("server stopped")
