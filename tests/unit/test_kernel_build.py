"""How heron builds its kernels (heron.kernels.build), without compiling them: torch's
``load`` and the import of the built module are stand-ins here, so these run in seconds on a
machine with or without a compiler. A build left by a killed process does not block a start,
two processes building at once build once, each torch build has its own cache key, and a
build that fails leaves one warning and the PyTorch ops. The real build runs in
tests/unit/test_kernels.py; `heron kernels` in tests/integration/test_cli.py."""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension
from torch.utils.file_baton import FileBaton

from heron import kernels
from heron.layers.norm import RMSNorm

BUILT = object()  # what the stand-in import returns


class Records(logging.Handler):
    """heron.kernels' log records; ``seen`` is set once one contains ``wait_for``."""

    def __init__(self, wait_for: str = "") -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.wait_for = wait_for
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.wait_for and self.wait_for in record.getMessage():
            self.seen.set()

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


@pytest.fixture
def records() -> Iterator[Records]:
    log = logging.getLogger("heron.kernels")
    handler, level = Records(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    yield handler
    log.removeHandler(handler)
    log.setLevel(level)


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """This machine's build folder under a temporary TORCH_EXTENSIONS_DIR."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return kernels.build_folder()


@pytest.fixture
def loads(folder, monkeypatch) -> list[Path]:
    """Stands in for torch's ``load``, taking torch's ``lock`` as torch does (where one is
    there, torch would wait forever; here it fails), and for the import of the result. Lists
    the folders it built."""
    built: list[Path] = []

    def load(name: str, build_directory: str, extra_ldflags: list[str], **kwargs: object) -> object:
        extra_ldflags.append("-ltorch")  # as torch does
        baton = FileBaton(os.path.join(build_directory, "lock"))
        assert baton.try_acquire(), "torch would wait forever on this lock"
        built.append(Path(build_directory))
        baton.release()
        return BUILT

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    monkeypatch.setattr(kernels, "_check_tools", lambda: None)
    monkeypatch.setattr(kernels, "_import", lambda folder, name: BUILT)
    return built


def python(code: str, cwd: Path | None = None, *argv: str) -> subprocess.Popen:
    """A Python process running ``code`` that has said "ready" on stdout; it reads stdin."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        cwd=cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


# A heron process in the middle of a build: it holds the build lock (its pid written in it)
# and torch's lock, as _build_lock and torch's load leave them while ninja runs.
BUILDING = """
import fcntl, os, sys
folder = sys.argv[1]
f = open(os.path.join(folder, "heron.lock"), "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.write(str(os.getpid())); f.flush()
open(os.path.join(folder, "lock"), "x").close()
print("ready", flush=True)
sys.stdin.readline()  # then "finishes" its build
open(os.path.join(folder, "built.json"), "w").close()
os.remove(os.path.join(folder, "lock"))
"""


def test_a_lock_left_by_a_killed_build_does_not_block_a_start(folder, loads, records):
    folder.mkdir(parents=True)
    builder = python(BUILDING, None, str(folder))
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    assert (folder / "lock").exists()

    assert kernels.build() is BUILT
    assert loads == [folder] and kernels.is_built(folder)
    assert kernels.build_folder() == folder  # the key is the same after torch's load
    removed = [m for m in records.messages() if "interrupted" in m]
    assert removed == [f"removed {folder / 'lock'}, left by an interrupted kernel build"]


def test_a_second_process_waits_for_the_first_ones_build_and_loads_it(folder, loads, records):
    folder.mkdir(parents=True)
    builder = python(BUILDING, None, str(folder))
    records.wait_for = "waiting for another heron process"
    result: list[object] = []
    start = threading.Thread(target=lambda: result.append(kernels.build()), daemon=True)
    start.start()
    assert records.seen.wait(timeout=120)
    assert f"(pid {builder.pid})" in records.messages()[-1]
    assert not result

    builder.communicate("done\n")
    start.join()
    assert result == [BUILT] and loads == []  # built by the other process, only loaded here
    assert not any("interrupted" in m for m in records.messages())


def test_compilers_left_running_by_a_killed_build_are_stopped(folder, loads, records):
    """A killed heron's ninja and compilers carry on in the build folder, for nothing (ninja
    logs none of their work); a build beside them would write the same files at once."""
    folder.mkdir(parents=True)
    waits = "print('ready', flush=True); input()"
    compiler = python(waits, folder, "-c", "layer_ops.cpp", "-o", "layer_ops.o")
    linker = python(waits, folder, "layer_ops.o", "bindings.o", "-o", f"{folder.name}.so")
    elsewhere = python(waits, None, "-o", "layer_ops.o")
    assert kernels._builders(folder) == {
        compiler.pid: ["layer_ops.cpp"],
        linker.pid: [kernels._LINK],
    }  # what the progress lines say the build is doing

    assert kernels.build() is BUILT
    assert compiler.wait() == linker.wait() == -signal.SIGKILL and loads == [folder]
    stopped = [m for m in records.messages() if "stopping" in m]
    assert stopped == [
        "stopping the compilers of an interrupted kernel build "
        f"(pid {', '.join(map(str, sorted([compiler.pid, linker.pid])))})"
    ]
    assert elsewhere.poll() is None  # a process outside the folder is not a build of it
    elsewhere.communicate("done\n")


def test_each_torch_build_python_and_compile_flags_get_their_own_cache_key():
    parts = {
        "sources": "0123456789ab",
        "cpu": "flags : fpu avx2",
        "torch": "2.13.0+cpu cf30153c debug=False cxx11_abi=True",
        "torch_dir": "/venv-a/lib/python3.11/site-packages/torch",
        "python": "cpython-311 cpython-311-x86_64-linux-gnu",
        "compiler": "c++",
        "cflags": "-O3 -march=native",
        "ldflags": "-fopenmp",
    }
    others = [
        {**parts, "torch": "2.13.0+cpu 5a1e0b77 debug=False cxx11_abi=True"},
        {**parts, "torch": "2.13.0+cpu cf30153c debug=True cxx11_abi=True"},
        {**parts, "torch_dir": "/venv-b/lib/python3.11/site-packages/torch"},
        {**parts, "python": "cpython-312 cpython-312-x86_64-linux-gnu"},
        {**parts, "compiler": "clang++"},
        {**parts, "cflags": "-O2 -march=native"},
        {**parts, "ldflags": "-fopenmp -g"},
        {**parts, "cpu": "flags : fpu avx2 avx512f"},
    ]
    keys = {kernels.cache_key(p) for p in [parts, *others]}
    assert len(keys) == 1 + len(others)
    assert kernels.cache_key(dict(reversed(parts.items()))) == kernels.cache_key(parts)


def test_the_key_follows_this_torch_build_and_the_compile_flags(monkeypatch):
    key = kernels.cache_key(kernels.identity())
    with monkeypatch.context() as m:
        m.setattr(torch.version, "git_version", "0" * 40)
        assert kernels.cache_key(kernels.identity()) != key
    with monkeypatch.context() as m:
        m.setattr(torch.version, "debug", not torch.version.debug)
        assert kernels.cache_key(kernels.identity()) != key
    with monkeypatch.context() as m:
        m.setattr(kernels, "_CFLAGS", [*kernels._CFLAGS, "-g"])
        assert kernels.cache_key(kernels.identity()) != key
    with monkeypatch.context() as m:
        m.setenv("CXX", "clang++")
        assert kernels.cache_key(kernels.identity()) != key
    assert kernels.cache_key(kernels.identity()) == key


def test_no_compiler_gives_one_warning_and_the_pytorch_ops(folder, records, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("HERON_CPU_KERNELS", "1")
    monkeypatch.setattr(kernels, "_module", functools.cache(kernels._load))
    norm = RMSNorm(64, eps=1e-6)
    x = torch.randn(3, 64)
    with warnings.catch_warnings(record=True) as python_warnings:
        warnings.simplefilter("always")
        y = norm(x)
        assert not kernels.available() and not kernels.usable(x)
    assert python_warnings == []
    (warning,) = records.messages(logging.WARNING)
    assert "using PyTorch ops instead (no C++ compiler: '/nonexistent/c++' not found" in warning
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(y, want)
    assert not kernels.is_built(folder)


def test_a_failed_compile_gives_one_warning_naming_the_first_error(folder, records, monkeypatch):
    output = (
        "Error building extension 'heron_kernels_x': [1/9] c++ -MMD -c layer_ops.cpp -o "
        "layer_ops.o\nFAILED: layer_ops.o\nlayer_ops.cpp:3:5: error: expected ';' before '}'\n"
        "layer_ops.cpp:9:1: error: 'x' was not declared\nninja: build stopped: subcommand failed."
    )

    def load(**kwargs: object) -> None:
        raise RuntimeError(output)

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    monkeypatch.setattr(kernels, "_check_tools", lambda: None)
    assert kernels._load() is None
    (warning,) = records.messages(logging.WARNING)
    assert "(build failed: layer_ops.cpp:3:5: error: expected ';' before '}';" in warning
    assert output in records.messages()[-1]  # the whole output at debug level
    assert not kernels.is_built(folder)
