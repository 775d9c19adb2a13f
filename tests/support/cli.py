"""The ``heron`` command line run as a real subprocess (``python -m heron.cli``)."""

from __future__ import annotations

import os
import subprocess
import sys

TIMEOUT = 300


def heron(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """``heron *args`` with ``stdin`` (empty if not given) and ``env`` added to this process's
    environment."""
    return subprocess.run(
        [sys.executable, "-m", "heron.cli", *args],
        input=stdin if stdin is not None else "",
        env={**os.environ, **env} if env else None,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "error:" in proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
