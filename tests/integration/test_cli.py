"""The ``heron`` command line, run as a real subprocess (``python -m heron.cli``).

Commands that load the model take ~5-15 s each on CPU, so only a handful do; the error paths
fail before the model loads. ``heron kernels`` runs on an empty build folder."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tests.support.cli import assert_user_error, heron

FAST = ["--max-tokens", "5", "--temperature", "0", "--dtype", "float32", "--device", "cpu"]


@pytest.mark.parametrize(
    "command, flags",
    [
        ([], ["generate", "chat", "models", "bench"]),
        (
            ["generate"],
            ["--model", "--max-tokens", "--temperature", "--top-p", "--top-k", "--min-p",
             "--seed", "--stop", "--n", "--dtype", "--device", "--chat", "--no-chat",
             "--stream", "--no-stream", "--quiet", "default: 128"],
        ),
        (["chat"], ["--model", "--system", "--max-tokens", "--temperature", "/reset", "/exit"]),
        (["models"], ["installed"]),
        (["bench"], ["throughput"]),
        (
            ["bench", "throughput"],
            ["--num-prompts", "--input-len", "--output-len", "--dtype", "--hf-batch-size",
             "--skip-hf", "--skip-llama-cpp", "--quantization", "--json", "default: 64",
             "--data-parallel-size", "--cpus-per-replica"],
        ),
        (
            ["bench", "latency"],
            ["--quantizations", "--input-len", "--output-len", "--repeats",
             "--perplexity-tokens", "--skip-hf", "--skip-llama-cpp", "--json", "--png"],
        ),
    ],
    ids=["heron", "generate", "chat", "models", "bench", "bench-throughput", "bench-latency"],
)  # fmt: skip
def test_help(command, flags):
    proc = heron(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in flags:
        assert flag in proc.stdout, flag


def test_serve_help_lists_cors_and_reads_defaults_right():
    proc = heron("serve", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for flag in ("--allowed-origins", "--allowed-methods", "--allowed-headers"):
        assert flag in text, flag
    # A flag that takes no value has no "(default: ...)": --no-prefix-caching is not the default.
    no_prefix = text.split("--no-prefix-caching ", 1)[1].split(" --", 1)[0]
    assert "default" not in no_prefix, no_prefix


def test_no_command_is_a_usage_error():
    proc = heron()
    assert proc.returncode == 2
    assert "usage:" in proc.stderr


def test_models_lists_the_default_as_installed():
    proc = heron("models")
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0].split()
    for column in ("NAME", "FAMILY", "PARAMS", "QUANT", "LICENSE", "INSTALLED"):
        assert column in header
    line = next(ln for ln in proc.stdout.splitlines() if "smollm2-135m-instruct" in ln)
    assert line.startswith("*")  # the default
    assert "yes" in line.split()
    assert ".gguf" in line
    for name, family in (("qwen2.5-coder-0.5b-instruct", "qwen2"), ("gemma-3-270m", "gemma3")):
        row = next(ln for ln in proc.stdout.splitlines() if ln.split()[:1] == [name])
        assert family in row.split()


def test_models_install_unknown_name_is_a_user_error():
    assert_user_error(heron("models", "--install", "no-such-model"), "no-such-model")


def test_generate_prints_text():
    proc = heron("generate", "Hello", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "loaded" in proc.stderr  # model-loading logs go to stderr, not stdout
    assert "loaded" not in proc.stdout


def test_generate_empty_prompt_is_a_user_error():
    assert_user_error(heron("generate", "", *FAST), "prompt")


def test_generate_bad_sampling_value_is_a_user_error():
    assert_user_error(heron("generate", "Hi", "--temperature", "-1"), "temperature")


def test_generate_missing_model_is_a_user_error():
    assert_user_error(heron("generate", "Hi", "--model", "/nonexistent", *FAST), "/nonexistent")


def test_chat_reads_stdin_until_exit():
    proc = heron("chat", *FAST, "-q", stdin="Hi\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert ">>>" not in proc.stdout  # no prompt when stdin is not a terminal
    assert "Traceback" not in proc.stderr


def test_bench_throughput_heron_only(tmp_path):
    """heron alone, then the same work on two engine replicas (Ray, heron.scaleout)."""
    out = tmp_path / "bench.json"
    proc = heron(
        "bench", "throughput", "--num-prompts", "4", "--input-len", "16", "--output-len", "4",
        "--skip-hf", "--skip-llama-cpp", "--dtype", "float32", "--device", "cpu",
        "--data-parallel-size", "2", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "tok/s" in proc.stdout
    assert "heron" in proc.stdout and "transformers" not in proc.stdout.split("tok/s", 1)[1]
    assert "heron x2 (Ray) / heron:" in proc.stdout
    import json

    data = json.loads(out.read_text())
    assert data["heron"]["generated_tokens"] == 4 * 4
    assert data["data_parallel"]["generated_tokens"] == 4 * 4
    assert data["data_parallel_over_heron"] > 0
    assert data["transformers"] is None
    assert data["machine"]["torch_version"]


@pytest.mark.parametrize(
    "command, message",
    [
        (["bench", "throughput", "--data-parallel-size", "0"], "--data-parallel-size: must be"),
        (["serve", "--data-parallel-size", "0"], "--data-parallel-size: must be >= 1"),
        (["serve", "--cpus-per-replica", "0"], "--cpus-per-replica: must be >= 1"),
        (["serve", "--max-request-bytes", "0"], "--max-request-bytes: must be >= 1"),
    ],
)
def test_bad_scale_out_and_serve_flags(command, message):
    proc = heron(*command)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_kv_and_spec_cli(tmp_path):
    """The KV and speculative benchmarks run from the command line (tiny settings)."""
    out = tmp_path / "kv.json"
    proc = heron(
        "bench", "kv", "--lengths", "300", "--depths", "0.5", "--policies", "snapkv",
        "--budgets", "0.5", "--max-tokens", "4", "--kv-cache-memory", str(64 * 2**20),
        "--settings", "query_agnostic", "--cache-dtypes", "int8,int4",
        "--perplexity-tokens", "16",
        "--dtype", "float32", "--device", "cpu", "--json", str(out),
        "--png", str(tmp_path / "kv"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "snapkv" in proc.stdout and "int8_cache" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert {(r["task"], r["setting"]) for r in results if r["policy"] == "snapkv"} == {
        ("passkey", "query_agnostic"),
        ("needle", "query_agnostic"),
        ("perplexity", "query_agnostic"),
    }
    ppl = {r["policy"]: r["perplexity"] for r in results if r["task"] == "perplexity"}
    assert set(ppl) == {"full", "int8_cache", "int4_cache", "snapkv"}
    assert all(1 < p < 1000 for p in ppl.values())
    rows = {r["policy"]: r for r in results if r["task"] == "passkey"}
    assert rows["int8_cache"]["kv_bytes_per_seq"] < rows["full"]["kv_bytes_per_seq"] / 3
    # int4: 6.4x less per token, less one full-precision block per sequence at 300 tokens
    assert rows["int4_cache"]["kv_bytes_per_seq"] < rows["full"]["kv_bytes_per_seq"] / 3
    if importlib.util.find_spec("matplotlib") is not None:  # the [bench] extra
        assert (tmp_path / "kv_summary.png").exists() and (tmp_path / "kv_snapkv.png").exists()
    spec_json = tmp_path / "spec.json"
    proc = heron(
        "bench", "spec", "--methods", "ngram", "--tasks", "chat", "--batch-size", "1",
        "--batch1-prompts", "1", "--max-tokens", "8", "--dtype", "float32", "--device", "cpu",
        "--quantization", "int8", "--json", str(spec_json),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "speed-up" in proc.stdout and "ngram" in proc.stdout
    assert json.loads(spec_json.read_text())["config"]["engine_kwargs"] == {"quantization": "int8"}
    proc = heron("bench", "spec", "--methods", "draft")
    assert proc.returncode != 0 and "--draft-model" in proc.stderr


def test_bench_latency_and_prefill_cli(tmp_path):
    """Latency per weight format with perplexity; prefill against transformers (tiny)."""
    import json

    out = tmp_path / "latency.json"
    proc = heron(
        "bench", "latency", "--quantizations", "none,int8", "--input-len", "16",
        "--output-len", "4", "--repeats", "1", "--perplexity-tokens", "64", "--skip-hf",
        "--skip-llama-cpp", "--dtype", "float32", "--device", "cpu", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["engine"], r["weights"]) for r in rows] == [("heron", "none"), ("heron", "int8")]
    assert all(r["decode_tokens_per_second"] > 0 and r["perplexity"] > 1 for r in rows)
    assert rows[1]["weight_mib"] < rows[0]["weight_mib"]  # packed int8 weights
    proc = heron(
        "bench", "prefill", "--lengths", "64", "--num-passkey", "0", "--num-needle", "0",
        "--skip-llama-cpp", "--dtype", "float32", "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "dense" in proc.stdout and "transformers" in proc.stdout
    proc = heron("bench", "latency", "--quantizations", "int3")
    assert_user_error(proc, "quantization")


# ---------------------------------------------------------------------------- heron kernels
def test_heron_kernels_status_shows_the_cache_folder_and_what_its_key_hashes(tmp_path):
    proc = heron("kernels", "status", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["folder", str(tmp_path / lines[0].split("/")[-1])]
    assert lines[0].split("/")[-1].startswith("heron_kernels_")
    assert lines[1].startswith("built      no")
    assert f"  torch     {torch.__version__} {torch.version.git_version}" in proc.stdout


def test_heron_kernels_build_without_a_compiler_fails_with_a_clear_message(tmp_path):
    proc = heron("kernels", "build", TORCH_EXTENSIONS_DIR=str(tmp_path), CXX="/nonexistent/c++")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(
        "error: heron's CPU kernels did not build: no C++ compiler: '/nonexistent/c++' not found"
    )
    assert "Traceback" not in proc.stderr and proc.stdout == ""
