"""What a new process that uses heron starts with: importing heron sets OpenMP's spinning
(see heron/__init__.py) before PyTorch loads, and building the real model does not import
torch._dynamo (seconds of every process's start-up)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_building_a_model_does_not_import_dynamo(model_path):
    """The random init that ``empty_embedding`` skips imported torch._dynamo (~2 s of every
    process's start-up) when run on the meta device, where models are built."""
    code = (
        "import sys; from heron import LLM; "
        f"LLM({str(model_path)!r}, kv_cache_memory=2**27, device='cpu'); "
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("preset", [None, "PASSIVE"])
def test_importing_heron_keeps_openmp_workers_spinning_unless_told_otherwise(preset):
    """libgomp reads these when PyTorch loads (see heron/__init__.py): heron sets them before
    that, and leaves a user's own setting alone."""

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = "import heron, os; print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [preset or "ACTIVE", "300000"]
