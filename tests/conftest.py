"""Shared fixtures. The real default model (SmolLM2-135M-Instruct GGUF) is loaded once per
session in float32, the precision the parity tests need."""

from __future__ import annotations

import pytest

from heron import LLM
from heron.models.catalog import DEFAULT_MODEL, KNOWN_MODELS


@pytest.fixture(scope="session")
def model_path():
    path = KNOWN_MODELS[DEFAULT_MODEL].locate()
    if path is None:
        pytest.fail(f"default model missing: {KNOWN_MODELS[DEFAULT_MODEL].install_hint}")
    return path


@pytest.fixture(scope="session")
def llm(model_path) -> LLM:
    return LLM(str(model_path), dtype="float32", device="cpu", kv_cache_memory=512 * 2**20)


def make_llm(**kwargs) -> LLM:
    """A separate engine with its own settings (small KV budgets, tiny chunks...)."""
    path = KNOWN_MODELS[DEFAULT_MODEL].locate()
    kwargs.setdefault("kv_cache_memory", 256 * 2**20)
    return LLM(str(path), dtype="float32", device="cpu", **kwargs)


# ---------------------------------------------------------------------------- server
class ServerProcess:
    """A real `heron serve` subprocess on a free local port."""

    def __init__(self, *args: str) -> None:
        import socket
        import subprocess
        import sys

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(f"/tmp/heron-test-server-{self.port}.log", "w+")  # noqa: SIM115
        cmd = [sys.executable, "-m", "heron.cli", "serve", "--port", str(self.port)]
        cmd += ["--dtype", "float32", "--device", "cpu", "--kv-cache-memory", str(256 * 2**20)]
        self.proc = subprocess.Popen([*cmd, *args], stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 180.0) -> None:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"heron serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"heron serve did not become ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-5000:]

    def stop(self) -> int:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server():
    proc = ServerProcess("--max-num-seqs", "64")
    yield proc
    proc.stop()
