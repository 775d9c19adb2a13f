"""The llama.cpp baseline's plumbing, with stand-in binaries (the real ones are optional)."""

from __future__ import annotations

import json
import stat

from heron.bench import llama_cpp


def _fake_tool(folder, name: str, stdout: str, exit_code: int = 0) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\ncat <<'JSON'\n{stdout}\nJSON\nexit {exit_code}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_llama_bench_results_are_parsed(tmp_path, monkeypatch):
    rows = [
        {"n_prompt": 512, "n_gen": 0, "avg_ts": 300.5},
        {"n_prompt": 0, "n_gen": 128, "avg_ts": 70.25},
    ]
    _fake_tool(tmp_path, "llama-bench", json.dumps(rows))
    batched = {"t_pp": 40.0, "t_tg": 60.0, "pl": 64}
    _fake_tool(tmp_path, "llama-batched-bench", "log line\n" + json.dumps(batched))
    monkeypatch.setenv("HERON_LLAMA_CPP_DIR", str(tmp_path))
    results = llama_cpp.llama_bench(tmp_path / "m.gguf", [512], 128)
    assert [(r.prompt_tokens, r.gen_tokens, r.tokens_per_second) for r in results] == [
        (512, 0, 300.5),
        (0, 128, 70.25),
    ]
    b = llama_cpp.batched_bench(tmp_path / "m.gguf", 64, 128, 128)
    assert b.seconds == 100.0 and b.generated_tokens_per_second == 64 * 128 / 100.0


def test_missing_or_failing_llama_cpp_is_skipped_not_fatal(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HERON_LLAMA_CPP_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(llama_cpp.sys, "prefix", str(tmp_path))
    assert llama_cpp.llama_bench(tmp_path / "m.gguf", [128], 16) is None
    assert "make bench-deps" in caplog.text
    _fake_tool(tmp_path, "llama-bench", "boom", exit_code=1)
    assert llama_cpp.llama_bench(tmp_path / "m.gguf", [128], 16) is None
    assert "failed" in caplog.text


def test_crash_with_repacking_is_retried_without(tmp_path, monkeypatch, caplog):
    """llama.cpp's AMX kernels segfault on some CPUs: the tool runs again with repacking
    off, and its results are used."""
    rows = [{"n_prompt": 0, "n_gen": 16, "avg_ts": 90.0}]
    path = tmp_path / "llama-bench"
    path.write_text(
        '#!/bin/sh\ncase "$*" in\n*"--repack 0"*) cat <<\'JSON\'\n'
        + json.dumps(rows)
        + "\nJSON\n;;\n*) kill -SEGV $$ ;;\nesac\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("HERON_LLAMA_CPP_DIR", str(tmp_path))
    results = llama_cpp.llama_bench(tmp_path / "m.gguf", [], 16)
    assert [r.tokens_per_second for r in results] == [90.0]
    assert "crashed" in caplog.text
