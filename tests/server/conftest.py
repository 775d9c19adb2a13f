"""Fixtures of the server tests: one real `heron serve` for the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from heron.server.process import ServerProcess
from tests.support.server import SERVER_MAX_BYTES, start_server


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    proc = start_server("--max-num-seqs", "64", "--max-request-bytes", str(SERVER_MAX_BYTES))
    yield proc
    proc.stop()
