"""OpenAI-compatible HTTP server: ``heron serve``."""

from heron.server.app import ServerConfig, build_app
from heron.server.launch import run_server

__all__ = ["ServerConfig", "build_app", "run_server"]
