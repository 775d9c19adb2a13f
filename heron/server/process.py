"""`heron serve` as a child process on a free local port: for benchmarks and tests that need
a real server, started and stopped around their work."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time

from heron.errors import HeronError


class ServerProcess:
    """Starts ``heron serve ARGS --port <free>`` and waits until ``/health`` answers.

    Output goes to a temporary log file (``output()`` gives its tail), so a busy server never
    blocks on a full pipe. ``stop()`` sends SIGTERM (graceful shutdown) and returns the exit
    status."""

    def __init__(self, *args: str, ready_timeout: float = 300.0) -> None:
        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "heron.cli", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise HeronError(
                    f"heron serve exited with {self.proc.returncode}:\n{self.output()}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise HeronError(f"heron serve not ready after {ready_timeout}s:\n{self.output()}")
            time.sleep(0.5)

    def output(self, tail: int = 5000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-tail:]

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
